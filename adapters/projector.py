"""Image design `mlp_concat` (decoder-only concatenation, LLaVA / NVLM-D style): a 2-layer MLP projects each image's
encoder tokens, average-pooled along the token axis to `n_tokens`, into the LM's embedding space; the outputs replace
a run of `n_tokens` `<|image|>` placeholders in the frozen LM's input (no cross-attention, no gates). The frozen LM's
self-attention does all the reading, so the text sequence is n_tokens longer per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model import LlamaConfig


@dataclass
class MLPProjectorConfig:
    """n_tokens: placeholders per image (the encoder's tokens average-pooled to that many); hidden: the MLP width
    (0: the LM width); out_rms > 0: a final RMSNorm with that initial gain (0: the plain MLP)."""

    n_tokens: int = 16
    hidden: int = 0
    out_rms: float = 0.0


class MLPProjector(nn.Module):
    """media (B, M, N, Dm) -> (B, M, n_tokens, D_lm) input embeddings (keys "mlp.*", "out_norm.*")."""

    Config = MLPProjectorConfig
    join = "embeds"
    attend = "last"

    def __init__(self, cfg: MLPProjectorConfig, lm_cfg: LlamaConfig, media_dim: int):
        super().__init__()
        if cfg.n_tokens < 1:
            raise ValueError(f"mlp_concat n_tokens must be >= 1, got {cfg.n_tokens}")
        hidden = cfg.hidden or lm_cfg.dim
        self.mlp = nn.Sequential(nn.Linear(media_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_cfg.dim))
        self.out_norm = nn.RMSNorm(lm_cfg.dim, eps=lm_cfg.norm_eps) if cfg.out_rms > 0 else None
        if self.out_norm is not None:
            nn.init.constant_(self.out_norm.weight, cfg.out_rms)
        self.n_tokens = cfg.n_tokens

    def tokens_per_item(self) -> int:
        """`<|image|>` placeholders per image in the prompt."""
        return self.n_tokens

    def embed(self, media: torch.Tensor) -> torch.Tensor:
        """(B, M, N, Dm) -> (B, M, n_tokens, D_lm)."""
        B, M, N, D = media.shape
        x = F.adaptive_avg_pool1d(media.reshape(B * M, N, D).transpose(1, 2), self.n_tokens).transpose(1, 2)
        y = self.mlp(x)  # (B*M, n_tokens, D_lm)
        if self.out_norm is not None:
            y = self.out_norm(y)
        return y.view(B, M, self.n_tokens, -1)
