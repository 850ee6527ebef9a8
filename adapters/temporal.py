"""The video temporal aggregators (PAPER.md §5): the perceiver resampler (design `perceiver`, the default) that merges
every `factor` consecutive frames into one "effective frame", and mean pooling over time (`mean_pool`, the baseline).

Perceiver, per video: frame features (F, N, Dm) are projected to the aggregator width and get the embedding of their
frame index and of their token index within the frame. For every token position of a window of `factor` frames,
`n_latents` latents attend to concat(that token in the window's frames, latents) as in Flamingo, `depth` times
(attention + FFN, pre-LN), so an effective frame keeps a frame's token layout (N * n_latents tokens), each token
summarising its place over time; 64 frames with factor 32 give 2 effective frames. Options beyond the paper (their
measurements: experiments/video/NOTES.md): `spatial_depth` self-attention layers across an effective frame's tokens;
`summary_tokens` G learned tokens appended to each effective frame before those layers; `out_positions` learned
(effective frame, place) embeddings added after the final norm, zero at init (a softmax read returns where and when
only if the values carry it); `positions: sincos` geometric initial tables instead of N(0, 1).
Written by hand: timm and torchvision have no perceiver resampler.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AggregatorConfig:
    """Shape of the perceiver resampler: `factor` frames -> one effective frame of N * n_latents tokens of `width`."""

    factor: int = 16
    width: int = 64
    n_latents: int = 1  # latents per token position of an effective frame
    depth: int = 2
    heads: int = 4
    max_frames: int = 64
    max_tokens: int = 4 * 1025  # tokens per frame the position table covers (4 tiles of 448 px)
    ff_mult: int = 4
    spatial_depth: int = 0  # self-attention layers across an effective frame's tokens after the temporal merge
    summary_tokens: int = 0  # learned tokens joining each effective frame in the spatial layers (0: none)
    positions: str = "normal"  # init of the frame / token position tables: "normal" N(0, 1) or "sincos" (geometric)
    out_positions: bool = False  # add learned (effective frame, token) positions to the output, after the final norm

    def to_dict(self) -> dict:
        """Plain dict (meta.json)."""
        return asdict(self)


def sincos_1d(n: int, width: int) -> torch.Tensor:
    """(n, width) sin-cos table of positions 0..n-1 (Transformer style), scaled to unit RMS like an N(0, 1) table.
    Frequencies run from 1 to ~1 / (4 n) (temperature 4 n, not 10^4: over 8-64 places most 10^4 channels are flat)."""
    if width % 2:
        raise ValueError(f"sin-cos positions need an even width, got {width}")
    omega = float(4 * max(n, 2)) ** (-torch.arange(width // 2, dtype=torch.float64) / (width // 2))  # (width/2,)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * omega  # (n, width/2)
    return (torch.cat([ang.sin(), ang.cos()], dim=1) * 2 ** 0.5).float()


def tile_grid_positions(n_tokens: int, width: int, init: torch.Tensor) -> torch.Tensor:
    """(n_tokens, width) position table for tiles of [CLS, g x g patches] (the vision encoder's layout): each patch
    gets the 2-D sin-cos of its (row, column), half the channels each, the same in every tile, so places that are
    near or in the same row / column share structure (left of, above) the aggregator need not learn from scratch;
    CLS rows keep `init` (N(0, 1)). The tile count is the smallest n with n_tokens / n - 1 a square."""
    if width % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {width}")
    for n in range(1, n_tokens + 1):
        g = round((n_tokens / n - 1) ** 0.5) if n_tokens % n == 0 and n_tokens // n > 1 else 0
        if g and g * g + 1 == n_tokens // n:
            break
    else:
        raise ValueError(f"{n_tokens} tokens per frame are not tiles of [CLS, g x g patches]: use positions 'normal'")
    rows = torch.arange(g).repeat_interleave(g)  # (g*g,) row of each patch, row-major
    cols = torch.arange(g).repeat(g)
    grid = torch.cat([sincos_1d(g, width // 2)[rows], sincos_1d(g, width // 2)[cols]], dim=1)  # (g*g, W)
    table = init.detach().clone().view(n, g * g + 1, width)
    table[:, 1:] = grid
    return table.view(n_tokens, width)


class PerceiverLayer(nn.Module):
    """Latents attend to concat(media, latents) (pre-LN, no bias), then a GELU FFN; both residual."""

    def __init__(self, width: int, heads: int, ff_mult: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"aggregator width {width} must divide by heads {heads}")
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.wq = nn.Linear(width, width, bias=False)
        self.wkv = nn.Linear(width, 2 * width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_mult * width, bias=False), nn.GELU(),
                                nn.Linear(ff_mult * width, width, bias=False))

    def forward(self, x: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor:
        """x (B, S, W) window tokens, latents (B, L, W) -> latents (B, L, W); x None: self-attention over latents."""
        B, L, W = latents.shape
        lat = self.norm_latents(latents)
        kv_in = lat if x is None else torch.cat([self.norm_media(x), lat], dim=1)  # (B, S+L, W)
        q = self.wq(lat).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, W/H)
        k, v = (t.view(B, kv_in.shape[1], self.heads, -1).transpose(1, 2) for t in self.wkv(kv_in).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        latents = latents + self.wo(out)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Video design `perceiver` (the default): (B, F, N, media_dim) frame features -> (B, F // factor,
    N * n_latents, width) effective frames (module doc)."""

    Config = AggregatorConfig

    def __init__(self, cfg: AggregatorConfig, media_dim: int):
        super().__init__()
        self.width = cfg.width
        if cfg.factor < 1 or cfg.max_frames % cfg.factor:
            raise ValueError(f"aggregator factor {cfg.factor} must be >= 1 and divide max_frames {cfg.max_frames}")
        self.cfg = cfg
        self.proj = nn.Linear(media_dim, cfg.width)
        self.frame_embed = nn.Parameter(torch.randn(cfg.max_frames, cfg.width))  # learned frame positions
        self.token_embed = nn.Parameter(torch.randn(cfg.max_tokens, cfg.width))  # learned token positions
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.width))
        self.layers = nn.ModuleList(PerceiverLayer(cfg.width, cfg.heads, cfg.ff_mult) for _ in range(cfg.depth))
        self.spatial = nn.ModuleList(PerceiverLayer(cfg.width, cfg.heads, cfg.ff_mult)
                                     for _ in range(cfg.spatial_depth))
        if cfg.summary_tokens and not cfg.spatial_depth:
            raise ValueError(f"aggregator summary_tokens {cfg.summary_tokens} need spatial_depth >= 1 (only the "
                             "spatial layers write into them)")
        self.summary = nn.Parameter(torch.randn(cfg.summary_tokens, cfg.width)) if cfg.summary_tokens else None
        self.norm = nn.LayerNorm(cfg.width)
        if cfg.out_positions:  # zero at init: the output starts as without them
            self.out_frame_embed = nn.Parameter(torch.zeros(cfg.max_frames, 1, cfg.width))  # per effective frame
            self.out_token_embed = nn.Parameter(torch.zeros(cfg.max_tokens * cfg.n_latents + cfg.summary_tokens,
                                                            cfg.width))  # per token of an effective frame
        if cfg.positions == "sincos":
            with torch.no_grad():
                self.frame_embed.copy_(sincos_1d(cfg.max_frames, cfg.width))
                self.token_embed.copy_(tile_grid_positions(cfg.max_tokens, cfg.width, self.token_embed))
        elif cfg.positions != "normal":
            raise ValueError(f"aggregator positions must be 'normal' or 'sincos', got {cfg.positions!r}")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, F, N, media_dim), F a multiple of factor and <= max_frames, N <= max_tokens
        -> (B, F/factor, N * n_latents + summary_tokens, W)."""
        B, Fr, N, _ = frames.shape
        k, L = self.cfg.factor, self.cfg.n_latents
        if Fr % k or Fr > self.cfg.max_frames:
            raise ValueError(f"{Fr} frames: need a multiple of the aggregation factor {k} and <= {self.cfg.max_frames}")
        if N > self.cfg.max_tokens:
            raise ValueError(f"{N} tokens per frame > the aggregator's max_tokens {self.cfg.max_tokens}")
        x = self.proj(frames) + self.frame_embed[:Fr, None] + self.token_embed[:N]  # (B, F, N, W)
        E = Fr // k
        x = x.view(B, E, k, N, -1).transpose(2, 3).reshape(B * E * N, k, -1)  # one token's `factor` frames each
        lat = self.latents.expand(B * E * N, -1, -1).to(x.dtype)  # (B*E*N, L, W)
        for layer in self.layers:
            lat = layer(x, lat)
        lat = lat.reshape(B * E, N * L, -1)  # an effective frame's tokens, each summarising its place over time
        if self.summary is not None:  # (B*E, N*L + G, W)
            lat = torch.cat([lat, self.summary.expand(B * E, -1, -1).to(lat.dtype)], dim=1)
        for layer in self.spatial:
            lat = layer(None, lat)
        out = self.norm(lat).view(B, E, lat.shape[1], -1)  # (B, E, S, W)
        if self.cfg.out_positions:
            S = out.shape[2] - self.cfg.summary_tokens
            tok = torch.cat([self.out_token_embed[:S], self.out_token_embed[-self.cfg.summary_tokens:]]) \
                if self.cfg.summary_tokens else self.out_token_embed[:S]
            out = out + self.out_frame_embed[:E] + tok  # (B, E, S, W)
        return out

    def pooled(self, agg: torch.Tensor, num_frames: int) -> torch.Tensor:
        """This aggregator's output for num_frames-frame videos (B, M, E * (N * n_latents + G), W) -> one vector per
        video (B, M, W): the mean of the summary tokens when there are any, else of all tokens."""
        G = self.cfg.summary_tokens
        if not G:
            return agg.mean(dim=2)
        B, M, S, W = agg.shape
        E = num_frames // self.cfg.factor
        return agg.view(B, M, E, S // E, W)[:, :, :, -G:].mean(dim=(2, 3))


@dataclass
class MeanPoolConfig:
    """Mean over each window of `factor` consecutive frames (no parameters)."""

    factor: int = 16
    max_frames: int = 64


class TemporalMeanPool(nn.Module):
    """Video design `mean_pool` (the baseline): (B, F, N, media_dim) -> (B, F // factor, N, media_dim), each token the
    mean of its place over a window of frames; the video cross-attention's projection does the rest."""

    Config = MeanPoolConfig

    def __init__(self, cfg: MeanPoolConfig, media_dim: int):
        super().__init__()
        if cfg.factor < 1 or cfg.max_frames % cfg.factor:
            raise ValueError(f"mean_pool factor {cfg.factor} must be >= 1 and divide max_frames {cfg.max_frames}")
        self.cfg, self.width = cfg, media_dim

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        B, Fr, N, D = frames.shape
        if Fr % self.cfg.factor or Fr > self.cfg.max_frames:
            raise ValueError(f"{Fr} frames: need a multiple of the aggregation factor {self.cfg.factor} and "
                             f"<= {self.cfg.max_frames}")
        return frames.view(B, Fr // self.cfg.factor, self.cfg.factor, N, D).mean(2)  # (B, E, N, D)

    def pooled(self, agg: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, M, E*N, D) -> (B, M, D): the mean of all tokens."""
        return agg.mean(dim=2)
