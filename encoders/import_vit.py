"""Pretrained ViT trunks from disk into our VisionEncoder (encoders/vision.py): open_clip and timm checkpoints.

The import fills `vit.*` (patch conv, class token, position embeddings, ln_pre, blocks, ln_post) from the checkpoint;
taps, tile embeddings and the gated layers (gates at 0) stay our own freshly initialised parameters. Position
embeddings are resampled to another tile size with timm's `resample_abs_pos_embed` (the class-token row is kept).

An `arch` says what the weights cannot: heads, activation (QuickGELU for OpenAI CLIP), norm eps, qkv bias, pre-norm.
open_clip: a name in open_clip.list_models() (e.g. "ViT-B-16", "ViT-B-32-quickgelu") or a .json file in open_clip's
model-config format ({"embed_dim", "quick_gelu", "vision_cfg": {...}}). timm: a timm model name whose class is
VisionTransformer (e.g. "vit_base_patch16_224", "vit_base_patch16_clip_224") or a .json file {"model": NAME,
**timm.create_model kwargs}. Files: safetensors, or a torch file read with torch.load(weights_only=True) (a
"state_dict"/"model" wrapper and a "module." prefix are unwrapped). Full CLIP checkpoints: only `visual.*` is read.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from encoders.vision import VisionEncoder, vision_config

KINDS = ("open_clip", "timm")


class VitImportError(ValueError):
    """A checkpoint or arch that cannot become a VisionEncoder: one line naming the file or arch."""


@dataclass
class ImportedVit:
    """The encoder (train mode), open_clip's image projection as a Linear weight (E, width) or None, and facts for
    meta.json (source kind/arch/file, native image size, ignored key count, the checkpoint's pooling cls|mean)."""

    encoder: VisionEncoder
    visual_proj: torch.Tensor | None
    info: dict


def default_taps(layers: int) -> list[int]:
    """The paper's taps scaled to depth: outputs of blocks at 1/8, 1/4, 1/2, 3/4 depth and the second to last
    (32 layers: [3, 7, 15, 23, 30], PAPER.md §3)."""
    return sorted({max(0, round(layers * f) - 1) for f in (0.125, 0.25, 0.5, 0.75)} | {max(0, layers - 2)})


# ---- reading a checkpoint ------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch file, unwrapped (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise VitImportError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VitImportError(f"{path}: unreadable as safetensors or a weights-only torch file "
                             f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    while isinstance(sd, dict) and not any(torch.is_tensor(v) for v in sd.values()):
        inner = next((sd[k] for k in ("state_dict", "model", "module") if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise VitImportError(f"{path}: holds no tensors (expected a state dict)")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---- archs ---------------------------------------------------------------------------------------------------------

def _arch_json(arch: str) -> dict | None:
    p = Path(arch)
    if p.suffix != ".json":
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VitImportError(f"{p}: unreadable arch JSON ({e})") from None


def _square(v, what: str, arch: str) -> int:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a != b:
        raise VitImportError(f"arch {arch}: non-square {what} {v} is not supported")
    return int(a)


def open_clip_trunk(arch: str) -> tuple[dict, dict]:
    """(trunk fields of VisionConfig, extra {pool, proj_dim}) of an open_clip arch name or JSON model config."""
    import open_clip
    from open_clip.model import CLIPVisionCfg

    cfg = _arch_json(arch) or open_clip.get_model_config(arch)
    if not cfg or "vision_cfg" not in cfg:
        raise VitImportError(f"unknown open_clip arch {arch!r}: not in open_clip.list_models() and not a .json "
                             f"model config with vision_cfg")
    try:
        v = CLIPVisionCfg(**cfg["vision_cfg"])
    except TypeError as e:
        raise VitImportError(f"arch {arch}: bad vision_cfg ({e})") from None
    if v.timm_model_name:
        raise VitImportError(f"arch {arch}: its image tower is timm's {v.timm_model_name!r} (use `mm import timm`)")
    if isinstance(v.layers, (list, tuple)):
        raise VitImportError(f"arch {arch}: a ResNet image tower, not a ViT")
    unsupported = [f.name for f in fields(CLIPVisionCfg) if f.name in (
        "ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool", "act_kwargs", "block_type",
        "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
        and getattr(v, f.name) not in (None, False)]
    if v.pool_type not in ("tok", "avg"):
        unsupported.append(f"pool_type={v.pool_type}")
    if set(v.norm_kwargs or {}) - {"eps"}:
        unsupported.append(f"norm_kwargs={v.norm_kwargs}")
    if unsupported:
        raise VitImportError(f"arch {arch}: unsupported open_clip ViT features {unsupported}")
    trunk = dict(image_size=_square(v.image_size, "image_size", arch), patch_size=_square(v.patch_size, "patch",
                 arch), width=v.width, layers=v.layers, heads=v.width // v.head_width,
                 mlp_dim=int(v.width * v.mlp_ratio), act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
                 qkv_bias=True, pre_norm=True, norm_eps=float((v.norm_kwargs or {}).get("eps", 1e-5)))
    return trunk, {"pool": "cls" if v.pool_type == "tok" else "mean", "proj_dim": cfg.get("embed_dim")}


def _vit_of(trunk: dict) -> torch.nn.Module:
    """Our encoder's timm ViT for these trunk fields, on the meta device (shapes and structure only)."""
    with torch.device("meta"):
        return VisionEncoder(vision_config("tiny", **trunk, taps=[0], n_gated=0, max_tiles=1)).vit


def timm_trunk(arch: str) -> tuple[dict, dict]:
    """(trunk fields, extra {pool, proj_dim}) of a timm ViT name or JSON {"model": NAME, **kwargs}; the timm
    model's blocks, patch embedding and norms must print exactly as our encoder's do (same layers, same options)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = _arch_json(arch)
    name, kw = (spec.pop("model", None), spec) if spec is not None else (arch, {})
    try:
        with torch.device("meta"):
            m = timm.create_model(str(name), pretrained=False, **kw)
    except Exception as e:
        raise VitImportError(f"unknown timm arch {arch!r} ({(str(e).strip().splitlines() or [''])[0]})") from None
    if type(m) is not VisionTransformer:
        raise VitImportError(f"arch {arch}: a timm {type(m).__name__}, not a plain VisionTransformer")
    if not m.has_class_token or m.num_reg_tokens or m.no_embed_class or m.pos_embed is None:
        raise VitImportError(f"arch {arch}: needs one class token with a learned position embedding, no registers")
    blk = m.blocks[0]
    act = {"GELU": "gelu", "QuickGELU": "quick_gelu"}.get(type(blk.mlp.act).__name__, type(blk.mlp.act).__name__)
    trunk = dict(image_size=_square(m.patch_embed.img_size, "image_size", arch),
                 patch_size=_square(m.patch_embed.patch_size, "patch", arch), width=m.embed_dim,
                 layers=len(m.blocks), heads=blk.attn.num_heads, mlp_dim=blk.mlp.fc1.out_features, act=act,
                 qkv_bias=blk.attn.qkv.bias is not None, pre_norm=not isinstance(m.norm_pre, torch.nn.Identity),
                 norm_eps=float(getattr(blk.norm1, "eps", 1e-6)))
    if act not in ("gelu", "quick_gelu"):
        raise VitImportError(f"arch {arch}: activation {act} is not supported (gelu, quick_gelu)")
    ours = _vit_of(trunk)
    for part in ("patch_embed", "norm_pre", "blocks", "norm"):
        a, b = str(getattr(m, part)).splitlines(), str(getattr(ours, part)).splitlines()
        if a != b:
            diff = next((d for d in difflib.unified_diff(b, a, lineterm="", n=0) if d[:1] in "+-"
                         and not d.startswith(("+++", "---"))), "")
            raise VitImportError(f"arch {arch}: its {part} differ from our encoder's ({diff.strip()})")
    return trunk, {"pool": "cls" if m.global_pool == "token" else "mean", "proj_dim": None}


# ---- key mapping ---------------------------------------------------------------------------------------------------

_OPEN_CLIP_RULES = [(re.compile(p), r) for p, r in (
    (r"conv1\.weight", "patch_embed.proj.weight"), (r"class_embedding", "cls_token"),
    (r"positional_embedding", "pos_embed"), (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    (r"ln_post\.(weight|bias)", r"norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"))]


_TO_OPEN_CLIP = [(re.compile(p), r) for p, r in (  # timm key -> open_clip key, for error messages
    (r"patch_embed\.proj\.weight", "conv1.weight"), (r"cls_token", "class_embedding"),
    (r"pos_embed", "positional_embedding"), (r"norm_pre\.(\w+)", r"ln_pre.\1"), (r"norm\.(\w+)", r"ln_post.\1"),
    (r"blocks\.(\d+)\.norm1\.(\w+)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"blocks\.(\d+)\.norm2\.(\w+)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(\w+)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"transformer.resblocks.\1.mlp.c_proj.\2"))]


def open_clip_name(key: str) -> str:
    """The open_clip (VisionTransformer) name of one of our timm trunk keys."""
    return next((rule.sub(r, key) for rule, r in _TO_OPEN_CLIP if rule.fullmatch(key)), key)


def map_open_clip(sd: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor | None, int, list[str]]:
    """open_clip VisionTransformer keys -> timm ViT keys: (mapped, proj (width, E) or None, ignored count, unmapped
    keys). A full CLIP state dict is narrowed to `visual.*` (the rest counts as ignored)."""
    ignored = 0
    if any(k.startswith("visual.") for k in sd):
        ignored = sum(not k.startswith("visual.") for k in sd)
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    out, unmapped, proj = {}, [], sd.get("proj")
    for k, v in sd.items():
        if k == "proj":
            continue
        new = next((rule.sub(r, k) for rule, r in _OPEN_CLIP_RULES if rule.fullmatch(k)), None)
        if new is None:
            unmapped.append(k)
        elif new == "cls_token":
            out[new] = v.reshape(1, 1, -1)
        elif new == "pos_embed":
            out[new] = v.reshape(1, *v.shape[-2:]) if v.dim() >= 2 else v
        else:
            out[new] = v
    return out, proj, ignored, unmapped


def map_timm(sd: dict[str, torch.Tensor]) -> tuple[dict, None, int, list[str]]:
    """timm ViT keys are ours already; the classifier / pooling head (head.*, attn_pool.*) is ignored."""
    head = ("head.", "attn_pool.", "head_drop.")
    return {k: v for k, v in sd.items() if not k.startswith(head)}, None, sum(k.startswith(head) for k in sd), []


def check_fit(path, kind: str, arch: str, got: dict, unmapped: list[str], want: dict) -> None:
    """One-line VitImportError listing missing / unexpected keys and shape mismatches against `want` shapes (keys
    named as the checkpoint names them; shapes in our layout)."""
    name = open_clip_name if kind == "open_clip" else str
    missing = sorted(name(k) for k in set(want) - set(got))
    extra = sorted(unmapped + [name(k) for k in got if k not in want])
    shapes = [f"{name(k)} {tuple(got[k].shape)} vs {tuple(want[k])}" for k in sorted(got) if k in want
              and tuple(got[k].shape) != tuple(want[k])]
    parts = [f"{len(x)} {what} ({', '.join(x[:4])}{', ...' if len(x) > 4 else ''})"
             for x, what in ((missing, "missing keys"), (extra, "unexpected keys"), (shapes, "shape mismatches"))
             if x]
    if parts:
        raise VitImportError(f"{path}: does not fit {kind} arch {arch}: {'; '.join(parts)}")


def import_vit(kind: str, path: str | Path, arch: str, image_size: int | None = None, taps: list[int] | None = None,
               n_gated: int | None = None, max_tiles: int = 1, seed: int = 0) -> ImportedVit:
    """A VisionEncoder whose ViT trunk holds the checkpoint's weights at tile side `image_size` (default: the
    checkpoint's own; position embeddings resampled otherwise); taps default to `default_taps`, n_gated to
    max(1, layers // 4); our new parameters are initialised under torch.manual_seed(seed)."""
    if kind not in KINDS:
        raise VitImportError(f"unknown import kind {kind!r}; known: {list(KINDS)}")
    trunk, extra = (open_clip_trunk if kind == "open_clip" else timm_trunk)(arch)
    sd = read_state_dict(path)
    mapped, proj, ignored, unmapped = (map_open_clip if kind == "open_clip" else map_timm)(sd)
    want = {k: v.shape for k, v in _vit_of(trunk).state_dict().items()}
    check_fit(path, kind, arch, mapped, unmapped, want)
    if proj is not None and (proj.dim() != 2 or proj.shape[0] != trunk["width"]):
        raise VitImportError(f"{path}: proj has shape {tuple(proj.shape)}, expected ({trunk['width']}, E)")
    L = trunk["layers"]
    cfg = vision_config("tiny", **{**trunk, "image_size": image_size or trunk["image_size"]},
                        taps=default_taps(L) if taps is None else taps,
                        n_gated=max(1, L // 4) if n_gated is None else n_gated, max_tiles=max_tiles)
    if cfg.grid != trunk["image_size"] // trunk["patch_size"]:
        old = trunk["image_size"] // trunk["patch_size"]
        mapped["pos_embed"] = resample_abs_pos_embed(mapped["pos_embed"].float(), [cfg.grid, cfg.grid], [old, old],
                                                     num_prefix_tokens=1)
    torch.manual_seed(seed)
    enc = VisionEncoder(cfg)
    enc.vit.load_state_dict(mapped, strict=True)
    info = {"kind": kind, "arch": arch, "file": str(path), "native_image_size": trunk["image_size"],
            "ignored_keys": ignored, **extra}
    return ImportedVit(enc, None if proj is None else proj.t().contiguous().float(), info)


__all__ = ["KINDS", "VitImportError", "ImportedVit", "default_taps", "read_state_dict", "open_clip_trunk",
           "timm_trunk", "open_clip_name", "map_open_clip", "map_timm", "check_fit", "import_vit"]
