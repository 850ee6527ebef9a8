"""A frame-stacking MLP speech adapter, registry kind "frame_stack_mlp" (SLAM-ASR / Ultravox style; beyond the paper):
`stack` consecutive encoder frames are concatenated (the tail padded with zeros) into one vector, then a two-layer
MLP maps it to the LM width. No attention, no convolution: the cheapest design that still lowers the frame rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.registry import DesignError
from adapters.speech import adapter_frames
from encoders.speech import length_mask

ACTS = {"gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class FrameStackConfig:
    """Input width `in_dim` (the encoder's) and output `out_dim` (the LM's) are set by the stage; `stack` encoder
    frames (40 ms each) per output (2: the paper's 80 ms); MLP width `hidden` and activation `act` (gelu | silu);
    `out_rms` > 0 ends on an RMSNorm with that initial gain (as SpeechAdapter); `learn_markers` as SpeechAdapter."""

    in_dim: int = 96
    out_dim: int = 128
    stack: int = 2
    hidden: int = 256
    act: str = "gelu"
    out_rms: float = 0.0
    learn_markers: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ACTS:
            raise DesignError(f"speech adapter frame_stack_mlp: key 'act': {self.act!r} is not one of {sorted(ACTS)}")
        if self.stack < 1:
            raise DesignError(f"speech adapter frame_stack_mlp: key 'stack': must be >= 1, got {self.stack}")


class FrameStackProjector(nn.Module):
    """forward(enc (B, T', in_dim), lengths (B,)) -> (B, ceil(T'/stack), out_dim), lengths ceil(lengths/stack);
    padded input frames are zeroed before stacking and padded outputs are zeroed, so outputs do not depend on batch
    padding. `markers`: (2, out_dim) embeddings of <|speech_start|> / <|speech_end|> when learn_markers, else None."""

    Config = FrameStackConfig
    kind = "frame_stack_mlp"

    def __init__(self, cfg: FrameStackConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.in_dim * cfg.stack, cfg.hidden)
        self.act = ACTS[cfg.act]()
        self.fc2 = nn.Linear(cfg.hidden, cfg.out_dim)
        self.out_norm = nn.RMSNorm(cfg.out_dim, eps=cfg.norm_eps) if cfg.out_rms > 0 else None
        if self.out_norm is not None:
            nn.init.constant_(self.out_norm.weight, cfg.out_rms)
        self.markers = nn.Parameter(torch.zeros(2, cfg.out_dim)) if cfg.learn_markers else None

    def n_out(self, enc_frames: torch.Tensor | int):
        """Adapter outputs for enc_frames encoder frames (int or tensor): ceil(n / stack)."""
        return adapter_frames(enc_frames, self.cfg.stack)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        k, n_max = self.cfg.stack, self.n_out(t)
        x = x * length_mask(lengths, t)[..., None].to(x.dtype)
        x = F.pad(x, (0, 0, 0, n_max * k - t)).reshape(b, n_max, k * d)  # (B, N, stack * in_dim)
        y = self.fc2(self.act(self.fc1(x)))
        if self.out_norm is not None:
            y = self.out_norm(y)
        n = self.n_out(lengths)
        return y * length_mask(n, n_max)[..., None].to(y.dtype), n
