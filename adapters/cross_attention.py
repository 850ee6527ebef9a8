"""Gated cross-attention from the LM's text stream to media tokens (PAPER.md §4, §4.1), and its fusion schedule.

One `CrossAttentionAdapter` holds a projection from the encoder width to the LM width, shared by all blocks (the
released Llama 3.2 code has one 7,680 -> d `vision_projection` before all cross-attention layers; we follow it), and
one `GatedCrossAttentionBlock` per insertion point. Blocks mirror the trunk's shape (heads, GQA, FFN size) and
start as the identity: both tanh gates are 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.masks import ATTEND_MODES
from llm.model import FeedForward, LlamaConfig

SCHEDULES = ("from_top", "from_bottom")


def fusion_schedule(n_layers: int, every: int = 4, schedule: str | list[int] = "from_top",
                    n_xattn: int | None = None) -> list[int]:
    """LM layer indices i (ascending) such that a cross-attention block runs right before `layers[i]`.

    "from_top" is the released code's rule: k = ceil(n_layers / n_xattn), layers[::-1][::k][:n_xattn][::-1], with
    n_xattn = ceil(n_layers / every) by default (32 layers, every 4 -> [3, 7, ..., 31]); it always fuses before the
    top layer. "from_bottom" is torchtune's `fusion_interval`: every i with (i + 1) % every == 0 (optionally the first
    n_xattn of them). A list is taken as the indices themselves.
    """
    if not isinstance(schedule, str):
        idx = sorted(int(i) for i in schedule)
    elif schedule == "from_top":
        n_x = n_xattn if n_xattn is not None else math.ceil(n_layers / every)
        k = math.ceil(n_layers / n_x)
        idx = list(range(n_layers))[::-1][::k][:n_x][::-1]
    elif schedule == "from_bottom":
        idx = [i for i in range(n_layers) if (i + 1) % every == 0][:n_xattn]
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a list of layer indices, got {schedule!r}")
    if not idx or len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= n_layers:
        raise ValueError(f"fusion schedule {idx} is not a non-empty set of layer indices in [0, {n_layers})")
    return idx


class GatedCrossAttentionBlock(nn.Module):
    """Pre-norm GQA cross-attention (per-head RMSNorm on q and k, no RoPE) then a SwiGLU FFN, each scaled by tanh of
    a scalar gate initialised to 0. Text rows that see no media get exactly zero from both halves.

    `media_kv(media)` computes the keys/values once per media batch; `forward(x, kv, mask)` reuses them.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)
        self.q_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps)
        self.k_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.init_std = cfg.init_std
        self.keep_read = False  # when set, forward keeps its pre-gate attention output in `read` (auxiliary losses)
        self.read: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, unit norms, gates 0 (so the block starts as the identity)."""
        for name, p in self.named_parameters():
            if name.startswith("gate_"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                nn.init.normal_(p, std=self.init_std)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected media (B, M, N, D) -> keys, values, each (B, n_kv_heads, M*N, head_dim); k is RMS-normed."""
        B, M, N, _ = media.shape
        k, v = self.wkv(media.reshape(B, M * N, -1)).split(self.n_kv * self.hd, dim=-1)  # (B, M*N, Hkv*hd) x2
        k = self.k_norm(k.view(B, M * N, self.n_kv, self.hd)).transpose(1, 2)  # (B, Hkv, M*N, hd)
        v = v.view(B, M * N, self.n_kv, self.hd).transpose(1, 2)
        return k, v

    def attention_weights(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                          mask: torch.Tensor) -> torch.Tensor:
        """The softmax weights (B, H, T, M*N) this block's attention puts on the media tokens for the inputs of a
        forward call (the same scores scaled_dot_product_attention softmaxes); rows that see no media are zero."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(self.attention_norm(x)).view(B, T, self.n_heads, self.hd)).transpose(1, 2)
        k = kv[0].to(q.dtype).repeat_interleave(self.n_heads // self.n_kv, dim=1)  # GQA: (B, H, M*N, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)  # (B, H, T, M*N)
        w = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return torch.nan_to_num(w, nan=0.0)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) text states; kv from `media_kv`; mask (B, T, M*N) bool (which media tokens each row sees)."""
        B, T, _ = x.shape
        k, v = kv
        row = mask.any(dim=-1, keepdim=True)  # (B, T, 1): rows that see at least one media token
        # a fully masked softmax row is NaN; let such rows see everything, then zero their output
        safe = (mask | ~row)[:, None]  # (B, 1, T, M*N)
        q = self.wq(self.attention_norm(x)).view(B, T, self.n_heads, self.hd)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=safe, enable_gqa=True)
        out = self.wo(out.transpose(1, 2).reshape(B, T, -1)) * row  # (B, T, D), zero on rows without media
        if self.keep_read:
            self.read = (out, row)  # (B, T, D), (B, T, 1)
        x = x + (torch.tanh(self.gate_attn) * out).to(x.dtype)
        return x + (torch.tanh(self.gate_ffn) * (self.feed_forward(self.ffn_norm(x)) * row)).to(x.dtype)


class CrossAttentionAdapter(nn.Module):
    """One modality's cross-attention adapter: the shared media projection (media_dim -> LM width, with bias) and a
    block before each scheduled LM layer (`blocks[str(i)]` runs before `layers[i]`)."""

    def __init__(self, cfg: LlamaConfig, media_dim: int, layer_ids: list[int]):
        super().__init__()
        self.projection = nn.Linear(media_dim, cfg.dim, bias=True)
        nn.init.normal_(self.projection.weight, std=cfg.init_std)
        nn.init.zeros_(self.projection.bias)
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttentionBlock(cfg) for i in layer_ids})
        self.layer_ids = list(layer_ids)

    @torch.no_grad()
    def gate_values(self, prefix: str = "gate") -> dict[str, float]:
        """tanh of every block's gates, {f"{prefix}/{layer}.attn": v, f"{prefix}/{layer}.ffn": v} (for logging)."""
        def value(p: torch.Tensor) -> float:
            return float(torch.tanh(p.full_tensor() if hasattr(p, "full_tensor") else p))  # DTensor under FSDP

        return {f"{prefix}/{i}.{g}": value(getattr(self.blocks[str(i)], f"gate_{g}"))
                for i in self.layer_ids for g in ("attn", "ffn")}

    def media_kv(self, media: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Encoder features (B, M, N, media_dim) -> {layer index: (k, v)}, projected once and shared by all blocks."""
        projected = self.projection(media)  # (B, M, N, D)
        return {i: self.blocks[str(i)].media_kv(projected) for i in self.layer_ids}


@dataclass
class GatedCrossAttentionConfig:
    """The paper's image adapter: a gated cross-attention block before every `every`-th LM layer (`fusion_schedule`);
    attend "last" (each text token sees the latest image) or "all_previous" (adapters.masks)."""

    every: int = 4
    schedule: Any = "from_top"  # "from_top" | "from_bottom" | a list of layer indices
    n_xattn: int | None = None
    attend: Literal["last", "all_previous"] = "last"


class GatedCrossAttention(CrossAttentionAdapter):
    """Image design `gated_xattn` (the default, PAPER.md §4): a CrossAttentionAdapter on the encoder's tokens."""

    Config = GatedCrossAttentionConfig
    join = "xattn"

    def __init__(self, cfg: GatedCrossAttentionConfig, lm_cfg: LlamaConfig, media_dim: int):
        if cfg.attend not in ATTEND_MODES:
            raise ValueError(f"attend must be one of {ATTEND_MODES}, got {cfg.attend!r}")
        super().__init__(lm_cfg, media_dim, fusion_schedule(lm_cfg.n_layers, cfg.every, cfg.schedule, cfg.n_xattn))
        self.attend = cfg.attend

    def valid_after(self, valid: torch.Tensor) -> torch.Tensor:
        """Validity (B, M, N) of the media tokens the blocks attend to: the encoder's own."""
        return valid
