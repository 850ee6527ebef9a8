"""The image encoder (PAPER.md §3, §3.1): a timm ViT + multi-layer feature taps + tanh-gated self-attention layers +
image tiling with gated tile / aspect-ratio embeddings.

Per image: `tile_image` fits it to the best grid of <= max_tiles square tiles; each tile is patch-embedded, gets a
gated pre-tile embedding, a CLS token and its position embedding (local, mixed with a gated per-grid embedding as in
the released code), then ALL tiles of an image run through the ViT as one sequence (padding tiles masked out). Taps
are the outputs of chosen blocks; after the ViT come ln_post, a gated post-tile embedding and N gated layers. The
output concatenates [gated-stack output, tap_0, tap_1, ...] per token: D_out = width * (1 + len(taps)).

Tap index convention: `taps` holds 0-based block indices and a tap is the OUTPUT of that block. The paper's "4th, 8th,
16th, 24th, 31st layers" (1-based) are therefore taps [3, 7, 15, 23, 30]. The released code uses the same list but
taps the INPUT of those blocks (one layer earlier): set taps to [2, 6, 14, 22, 29] to match it.
Every gate is a scalar g used as tanh(g), initialised to 0, so at init the tile embeddings and the gated layers add
exactly nothing (bitwise). The ViT itself is timm's `VisionTransformer` built with explicit arguments (no weights).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GroupNorm1, HybridEmbed, LayerNorm, QuickGELU, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from timm.models.vision_transformer_hybrid import ConvStem

from llm.shapes import shape_overrides

ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # QuickGELU: x * sigmoid(1.702 x), OpenAI CLIP's
# CLIP's pixel statistics (PAPER.md §3.1 "Normalisation")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Shape of the image encoder. `image_size` is the tile side; `taps` are 0-based block indices (module doc).

    act / qkv_bias / pre_norm / norm_eps describe the ViT trunk so imported checkpoints (encoders.import_vit) fit:
    pre_norm=True is CLIP style (ln_pre, patch conv without bias), False timm style (patch bias, no ln_pre)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 256
    taps: list[int] = field(default_factory=lambda: [1, 2])
    n_gated: int = 2
    max_tiles: int = 1
    act: str = "gelu"  # gelu | quick_gelu (the trunk's MLPs; the gated layers keep GELU)
    qkv_bias: bool = False
    pre_norm: bool = True
    norm_eps: float = 1e-6
    stem: Literal["patch", "conv"] = "patch"  # patch: one patch conv (ViT); conv: stride-2 3x3 convs (Xiao et al. 2021)
    thumbnail: bool = False  # beyond the paper: a tiled image also gets the whole image as one extra tile, first

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Patches + CLS per tile."""
        return self.grid * self.grid + 1

    @property
    def tile_slots(self) -> int:
        """Tiles per image the encoder takes: max_tiles, + 1 for the thumbnail when tiling is on."""
        return with_thumbnail(self.max_tiles, self.thumbnail)

    @property
    def out_dim(self) -> int:
        """Channels per output token: width * (1 + len(taps))."""
        return self.width * (1 + len(self.taps))

    def to_dict(self) -> dict:
        """Plain dict (meta.json)."""
        return asdict(self)


VISION_SHAPES: dict[str, dict] = {
    "tiny": dict(image_size=64, patch_size=8, width=64, layers=4, heads=4, mlp_dim=256, taps=[1, 2], n_gated=2,
                 max_tiles=1),
    "small": dict(image_size=64, patch_size=8, width=192, layers=8, heads=6, mlp_dim=768, taps=[1, 3, 5], n_gated=4,
                  max_tiles=1),
    # ViT-H/14 at the released 448-px tiles, <= 4 tiles, paper taps (layers 4/8/16/24/31, 1-based), 8 gated layers
    "paper": dict(image_size=448, patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120,
                  taps=[3, 7, 15, 23, 30], n_gated=8, max_tiles=4),
}


def vision_config(shape: str = "tiny", **overrides) -> VisionConfig:
    """A named shape with field overrides (None values are ignored)."""
    if shape not in VISION_SHAPES:
        raise KeyError(f"unknown vision shape {shape!r}; known: {sorted(VISION_SHAPES)}")
    known = {f.name for f in fields(VisionConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise KeyError(f"unknown VisionConfig field {bad[0]!r}")
    cfg = VisionConfig(**{**VISION_SHAPES[shape], **{k: v for k, v in overrides.items() if v is not None}})
    cfg.taps = [int(t) for t in cfg.taps]
    if cfg.image_size % cfg.patch_size or cfg.width % cfg.heads:
        raise ValueError(f"image_size must divide by patch_size and width by heads: {cfg}")
    if cfg.act not in ACTIVATIONS:
        raise ValueError(f"act {cfg.act!r} unknown; known: {sorted(ACTIVATIONS)}")
    if any(not 0 <= t < cfg.layers for t in cfg.taps):
        raise ValueError(f"taps {cfg.taps} must be block indices in [0, {cfg.layers})")
    return cfg


# a stage YAML's `vision:` block: {shape, any VisionConfig field}
VisionShape = shape_overrides(VisionConfig, vision_config, "VisionShape")


# ---- tiling -----------------------------------------------------------------------------------------------------

def supported_grids(max_tiles: int) -> list[tuple[int, int]]:
    """All (rows, cols) with rows * cols <= max_tiles, rows-major; the aspect-ratio id is the index in this list
    (max_tiles=4: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1), the released set)."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def best_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The released canvas choice: the aspect-preserving scale that fits the image into each grid's canvas; take the
    smallest upscale (>= 1) if any, else the largest downscale; among equal scales, the smallest canvas."""
    grids = supported_grids(max_tiles)
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in grids]
    up = [s for s in scales if s >= 1.0]
    target = min(up) if up else max(scales)
    return min((g for g, s in zip(grids, scales) if s == target), key=lambda g: g[0] * g[1])


class Tiles(NamedTuple):
    """One image cut into tiles: tiles (n_tiles, 3, t, t) row-major, its aspect-ratio id and (rows, cols) grid."""

    tiles: torch.Tensor
    aspect_id: int
    grid: tuple[int, int]


def tile_image(img, tile_size: int, max_tiles: int, fill: float = 0) -> Tiles:
    """Resize an image (3, H, W) tensor or (H, W, 3) uint8 array to its best grid (aspect kept), pad right/bottom
    with `fill`, and cut it into rows * cols tiles (n_tiles, 3, t, t) of the input dtype."""
    from torchvision.transforms.v2 import functional as TF

    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W)
    _, h, w = img.shape
    rows, cols = best_grid(h, w, tile_size, max_tiles)
    scale = min(rows * tile_size / h, cols * tile_size / w)
    new_h = min(rows * tile_size, max(1, round(h * scale)))
    new_w = min(cols * tile_size, max(1, round(w * scale)))
    if (new_h, new_w) != (h, w):
        img = TF.resize(img, [new_h, new_w], antialias=True)
    canvas = F.pad(img, (0, cols * tile_size - new_w, 0, rows * tile_size - new_h), value=fill)  # (3, r*t, c*t)
    tiles = canvas.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)  # (r, c, 3, t, t)
    return Tiles(tiles.reshape(rows * cols, 3, tile_size, tile_size), supported_grids(max_tiles).index((rows, cols)),
                 (rows, cols))


def per_aspect(table: torch.Tensor, aspect_ids: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Rows of a per-aspect-ratio table (R, max_tiles, ...) for each image: (B, n_tiles, ...).

    index_select, not `table[aspect_ids]`: the backward of advanced indexing is index_put_(accumulate=True), which on
    CPU with > 1 thread and >= 32768 elements adds with float atomics in thread-timing order (many images share an
    aspect id), so the gradient, and every run after it, differed from process to process. index_select's backward
    (index_add_) sums in index order: bitwise the same as the serial path, for any thread count."""
    return table.index_select(0, aspect_ids)[:, :n_tiles]


def with_thumbnail(n_tiles: int, thumbnail: bool) -> int:
    """Tiles of an image cut into n_tiles (or slots for max_tiles = n_tiles): + 1 for a thumbnail when n_tiles > 1."""
    return n_tiles + int(thumbnail and n_tiles > 1)


def tile_batch(images, tile_size: int, max_tiles: int, thumbnail: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile a list of images and pad each to max_tiles (+ 1 with a thumbnail): (B, slots, 3, t, t) of the input
    dtype, aspect ids (B,). thumbnail: an image cut into > 1 tile gets the whole image fitted to one tile (aspect
    kept) as tile 0, before its grid's tiles (the global view of LLaVA-NeXT / InternVL tiling; not in the paper)."""
    out = [tile_image(im, tile_size, max_tiles) for im in images]
    slots = with_thumbnail(max_tiles, thumbnail)
    pixels = torch.zeros(len(out), slots, 3, tile_size, tile_size, dtype=out[0].tiles.dtype)
    for i, (im, t) in enumerate(zip(images, out)):
        tiles = t.tiles
        if thumbnail and len(tiles) > 1:
            tiles = torch.cat([tile_image(im, tile_size, 1).tiles, tiles])  # (1 + r*c, 3, t, t)
        pixels[i, :len(tiles)] = tiles
    return pixels, torch.tensor([t.aspect_id for t in out], dtype=torch.long)


def tile_counts(cfg: VisionConfig, aspect_ids: torch.Tensor) -> torch.Tensor:
    """Real tiles per image (B,) for aspect-ratio ids (B,): rows * cols, + 1 for a thumbnail when that is > 1."""
    n = [with_thumbnail(r * c, cfg.thumbnail) for r, c in supported_grids(cfg.max_tiles)]
    return torch.tensor(n, device=aspect_ids.device)[aspect_ids]


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 with CLIP mean/std."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def stem_args(cfg: VisionConfig) -> dict:
    """timm VisionTransformer arguments for the patch embedding: a patch conv, or the convolutional stem of "Early
    Convolutions Help Transformers See Better" (log2(patch) stride-2 3x3 convs, GELU, per-image GroupNorm so a batch's
    padding tiles change nothing, then a 1x1 projection); both give the same grid of image_size / patch_size."""
    if cfg.stem == "patch":
        return {"patch_size": cfg.patch_size}
    depth = cfg.patch_size.bit_length() - 1
    if cfg.stem != "conv" or cfg.patch_size != 1 << depth or depth < 1:
        raise ValueError(f"vision stem {cfg.stem!r} needs stem 'patch', or 'conv' with a power-of-2 patch_size "
                         f"(got {cfg.patch_size})")
    stem = ConvStem(depth=depth, channels=cfg.width, kernel_size=3, stride=(2,) * depth, padding=1,
                    norm_layer=GroupNorm1, act_layer=nn.GELU)
    return {"patch_size": 1, "embed_layer": partial(HybridEmbed, backbone=stem)}


def resample_positions(sd: dict[str, torch.Tensor], grid: int, old: int) -> dict[str, torch.Tensor]:
    """An encoder state with its position embeddings (vit.pos_embed (1, T, D), tile_pos_embed (R, N, T, D); the CLS
    row first, kept) resampled bicubically from an old x old patch grid to grid x grid (timm's resampler)."""
    def one(p: torch.Tensor) -> torch.Tensor:  # (1, 1 + old*old, D) -> (1, 1 + grid*grid, D)
        return resample_abs_pos_embed(p.float(), [grid, grid], [old, old], num_prefix_tokens=1).to(p.dtype)

    out = dict(sd, **{"vit.pos_embed": one(sd["vit.pos_embed"])})
    if "tile_pos_embed" in sd:
        t = sd["tile_pos_embed"]
        rows = [one(r[None]) for r in t.flatten(0, 1)]  # R*N x (1, T', D)
        out["tile_pos_embed"] = torch.cat(rows).view(*t.shape[:2], -1, t.shape[-1])
    return out


# ---- modules ----------------------------------------------------------------------------------------------------

class GatedBlock(nn.Module):
    """A pre-LN timm transformer block whose attention and MLP residuals are scaled by tanh(gate), gates init 0.

    The block's parts are timm's; only the scalar tanh gating is ours (timm offers per-channel LayerScale, no gate).
    """

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.block = Block(width, heads, mlp_ratio=mlp_dim / width, qkv_bias=False)
        self.block.apply(init_weights_vit_timm)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_mlp = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); attn_mask: additive (B, 1, 1, L) key mask or None."""
        b = self.block
        x = x + self.gate_attn.tanh() * b.attn(b.norm1(x), attn_mask=attn_mask)
        return x + self.gate_mlp.tanh() * b.mlp(b.norm2(x))


class VisionEncoder(nn.Module):
    """ViT (timm) + taps + gated tile embeddings + gated layers: (B, n_tiles, 3, t, t) -> (B, n_tiles*(P+1), D_out)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D, T, R, N = cfg.width, cfg.tokens_per_tile, len(supported_grids(cfg.max_tiles)), cfg.tile_slots
        self.vit = VisionTransformer(
            img_size=cfg.image_size, in_chans=3, num_classes=0, global_pool="token", **stem_args(cfg),
            embed_dim=D, depth=cfg.layers, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / D, qkv_bias=cfg.qkv_bias,
            class_token=True, pre_norm=cfg.pre_norm, final_norm=True, act_layer=ACTIVATIONS[cfg.act],
            norm_layer=partial(LayerNorm, eps=cfg.norm_eps))  # pre_norm: ln_pre, no patch-embed bias (CLIP style)
        # per (aspect ratio, tile) embeddings; tile_pos is per token, mixed with the ViT's own position embedding
        self.pre_tile_embed = nn.Parameter(torch.empty(R, N, D))
        self.tile_pos_embed = nn.Parameter(torch.empty(R, N, T, D))
        self.post_tile_embed = nn.Parameter(torch.empty(R, N, D))
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))
        self.tile_pos_gate = nn.Parameter(torch.zeros(1))
        self.post_tile_gate = nn.Parameter(torch.zeros(1))
        for p in (self.pre_tile_embed, self.tile_pos_embed, self.post_tile_embed):
            nn.init.trunc_normal_(p, std=D ** -0.5)
        self.gated = nn.ModuleList(GatedBlock(D, cfg.heads, cfg.mlp_dim) for _ in range(cfg.n_gated))

    # -- pieces -------------------------------------------------------------------------------------------------
    def tile_counts(self, aspect_ids: torch.Tensor) -> torch.Tensor:
        """Real (non-padding) tiles per image (B,) from the aspect-ratio ids (a thumbnail counts)."""
        return tile_counts(self.cfg, aspect_ids)

    def tile_mask(self, aspect_ids: torch.Tensor, n_tiles: int) -> torch.Tensor:
        """(B, n_tiles) bool: True for real tiles."""
        return torch.arange(n_tiles, device=aspect_ids.device)[None] < self.tile_counts(aspect_ids)[:, None]

    def embed(self, pixels: torch.Tensor, aspect_ids: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, t, t) -> tokens (B, N*T, D) entering the ViT blocks.

        Follows timm's _pos_embed, plus the gated tile terms it lacks (so the pieces are called one by one)."""
        B, N = pixels.shape[:2]
        D, T = self.cfg.width, self.cfg.tokens_per_tile
        vit = self.vit
        x = vit.patch_embed(pixels.flatten(0, 1))  # (B*N, P, D)
        x = x + self.pre_tile_gate.tanh() * per_aspect(self.pre_tile_embed, aspect_ids, N).reshape(B * N, 1, D)
        x = torch.cat([vit.cls_token.expand(B * N, -1, -1), x], dim=1)  # (B*N, T, D)
        g = self.tile_pos_gate.tanh()
        x = x + ((1 - g) * vit.pos_embed + g * per_aspect(self.tile_pos_embed, aspect_ids, N).reshape(B * N, T, D))
        x = vit.norm_pre(x)
        return x.view(B, N * T, D)

    def _attn_mask(self, aspect_ids: torch.Tensor, n_tiles: int, dtype) -> torch.Tensor | None:
        real = self.tile_mask(aspect_ids, n_tiles)  # (B, N)
        if bool(real.all()):
            return None
        keys = real.repeat_interleave(self.cfg.tokens_per_tile, dim=1)  # (B, N*T)
        bias = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, torch.finfo(dtype).min)
        return bias[:, None, None, :]  # (B, 1, 1, N*T), additive over keys

    def local_features(self, pixels: torch.Tensor, aspect_ids: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The ViT part: (ln_post output (B, N*T, D), [tap (B, N*T, D), ...])."""
        x = self.embed(pixels, aspect_ids)
        taps, want = [], set(self.cfg.taps)
        kw = {} if attn_mask is None else {"attn_mask": attn_mask}
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x, **kw)
            if i in want:
                taps.append(x)
        order = sorted(want)
        return self.vit.norm(x), [taps[order.index(t)] for t in self.cfg.taps]

    def pooled(self, pixels: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """The contrastive image feature: (B, 3, t, t) one tile each -> (B, D), CLS token or patch mean of ln_post."""
        x, _ = self.local_features(pixels[:, None], torch.zeros(pixels.shape[0], dtype=torch.long,
                                                                 device=pixels.device))
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)

    def forward(self, pixels: torch.Tensor, aspect_ids: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, n_tiles, 3, t, t) normalised, aspect_ids (B,) -> (B, n_tiles * (P+1), width * (1 + len(taps))).

        Tokens of padding tiles (beyond the aspect ratio's rows*cols) are masked as keys and zeroed in the output."""
        B, N = pixels.shape[:2]
        if N > self.cfg.tile_slots:
            raise ValueError(f"{N} tiles > the encoder's {self.cfg.tile_slots} (max_tiles={self.cfg.max_tiles}, "
                             f"thumbnail={self.cfg.thumbnail})")
        if aspect_ids is None:
            aspect_ids = torch.zeros(B, dtype=torch.long, device=pixels.device)
        mask = self._attn_mask(aspect_ids, N, pixels.dtype if pixels.is_floating_point() else torch.float32)
        x, taps = self.local_features(pixels, aspect_ids, mask)  # (B, N*T, D)
        T = self.cfg.tokens_per_tile
        post = per_aspect(self.post_tile_embed, aspect_ids, N)  # (B, N, D)
        x = x + self.post_tile_gate.tanh() * post.repeat_interleave(T, dim=1)
        for blk in self.gated:
            x = blk(x, mask)
        out = torch.cat([x, *taps], dim=-1)  # (B, N*T, D * (1 + len(taps)))
        if mask is not None:
            out = out * self.tile_mask(aspect_ids, N).repeat_interleave(T, dim=1)[..., None].to(out.dtype)
        return out


def count_params(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def flops_per_image(cfg: VisionConfig, n_tiles: int = 1, gated: bool = True) -> float:
    """Training FLOPs (forward + backward, 6 per MAC) of one image: matmuls + attention scores, all tiles together."""
    L, D = n_tiles * cfg.tokens_per_tile, cfg.width
    blocks = cfg.layers + (cfg.n_gated if gated else 0)
    per_block = 2 * (4 * D * D + 2 * D * cfg.mlp_dim) * L + 2 * 2 * L * L * D
    patch = 2 * 3 * cfg.patch_size ** 2 * D * (L - n_tiles)
    return 3.0 * (blocks * per_block + patch)
