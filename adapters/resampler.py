"""Image design `perceiver_xattn` (Flamingo): a perceiver resampler turns an image's N encoder tokens into
`n_latents` learned-latent summaries, which the paper's gated cross-attention blocks then read (fewer keys/values
per block: n_latents instead of N). The layers are adapters.temporal.PerceiverLayer (latents attend to
concat(media, latents)); each image is resampled on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from adapters.cross_attention import CrossAttentionAdapter, fusion_schedule
from adapters.masks import ATTEND_MODES
from adapters.temporal import PerceiverLayer
from llm.model import LlamaConfig


@dataclass
class ResampledCrossAttentionConfig:
    """Resampler shape (n_latents, depth, heads, width: 0 = the encoder's width, ff_mult) + the cross-attention
    schedule of `gated_xattn` (every, schedule, n_xattn, attend)."""

    n_latents: int = 16
    depth: int = 2
    heads: int = 4
    width: int = 0
    ff_mult: int = 2
    every: int = 4
    schedule: str = "from_top"
    n_xattn: int | None = None
    attend: Literal["last", "all_previous"] = "last"


class ResampledCrossAttention(nn.Module):
    """media (B, M, N, Dm) -> resampled (B, M, n_latents, width) -> gated cross-attention blocks (keys "resampler.*",
    "xattn.*"). Encoder tokens are all attended (image media carries no padding tokens)."""

    Config = ResampledCrossAttentionConfig
    join = "xattn"

    def __init__(self, cfg: ResampledCrossAttentionConfig, lm_cfg: LlamaConfig, media_dim: int):
        super().__init__()
        if cfg.attend not in ATTEND_MODES:
            raise ValueError(f"attend must be one of {ATTEND_MODES}, got {cfg.attend!r}")
        width = cfg.width or media_dim
        self.attend = cfg.attend
        self.proj = nn.Linear(media_dim, width) if width != media_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, width))
        self.layers = nn.ModuleList(PerceiverLayer(width, cfg.heads, cfg.ff_mult) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(width)
        ids = fusion_schedule(lm_cfg.n_layers, cfg.every, cfg.schedule, cfg.n_xattn)
        self.xattn = CrossAttentionAdapter(lm_cfg, width, ids)

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.xattn.blocks

    @property
    def layer_ids(self) -> list[int]:
        return self.xattn.layer_ids

    def gate_values(self, prefix: str = "gate") -> dict[str, float]:
        """tanh of every block's gates (CrossAttentionAdapter.gate_values)."""
        return self.xattn.gate_values(prefix)

    def resample(self, media: torch.Tensor) -> torch.Tensor:
        """(B, M, N, Dm) -> (B, M, n_latents, width)."""
        B, M, N, _ = media.shape
        x = self.proj(media.reshape(B * M, N, -1))  # (B*M, N, W)
        lat = self.latents.expand(B * M, -1, -1).to(x.dtype)  # (B*M, L, W)
        for layer in self.layers:
            lat = layer(x, lat)
        return self.norm(lat).view(B, M, lat.shape[1], -1)

    def media_kv(self, media: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Encoder features (B, M, N, Dm) -> {layer: (k, v)} over the n_latents resampled tokens."""
        return self.xattn.media_kv(self.resample(media))

    def valid_after(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, M, N) -> (B, M, n_latents): an item's latents are valid when the item is."""
        return valid.any(-1, keepdim=True).expand(-1, -1, self.latents.shape[0])
