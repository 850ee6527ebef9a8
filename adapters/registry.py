"""Adapter designs as plug-ins: a design is one class with a `Config` dataclass (its YAML schema), picked in YAML by
`kind` (a registered name, or `some.module:ClassName` importable from the user's path).

Contract of a design class, per modality (the composed model calls only these):
- every design: `__init__(cfg, **ctx)` builds it from its Config and the context the modality gives (below); all of
  its parameters train (the LM never belongs to a design); `Config` is a dataclass whose fields are the YAML keys.
- image (ctx: lm_cfg, media_dim): `join` is "xattn" (gated cross-attention blocks before `layer_ids`; `blocks`,
  `media_kv(media (B, M, N, Dm)) -> {layer: (k, v)}`, `valid_after(valid (B, M, N)) -> (B, M, N')`,
  `gate_values(prefix)`, `attend`) or "embeds" (`tokens_per_item(n_media_tokens) -> int` placeholders per image in
  the prompt, `embed(media (B, M, N, Dm)) -> (B, M, n, D_lm)` written over them).
- video (ctx: media_dim): an aggregator, `forward(frames (B, F, N, Dm)) -> (B, E, S, width)`, `width`,
  `pooled(agg (B, M, E*S, W), num_frames) -> (B, M, W)`.
- speech (ctx: none; the Config holds in_dim / out_dim): `forward(enc (B, T', in_dim), lens (B,)) -> (B, N, out_dim),
  lens (B,)`, `n_out(enc_frames) -> frames`, `markers` ((2, out_dim) or None).
Saved runs record each design as {"kind": kind, "config": {...}} (`spec_of`) and are rebuilt with `build`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODALITIES = ("image", "video", "speech")
# the designs that ship with the stack: kind -> "module:Class" (imported on first use, so registering is lazy)
BUILTIN: dict[str, dict[str, str]] = {
    "image": {"gated_xattn": "adapters.cross_attention:GatedCrossAttention",
              "perceiver_xattn": "adapters.resampler:ResampledCrossAttention",
              "mlp_concat": "adapters.projector:MLPProjector"},
    "video": {"perceiver": "adapters.temporal:PerceiverResampler",
              "mean_pool": "adapters.temporal:TemporalMeanPool"},
    "speech": {"conv_rotary": "adapters.speech:SpeechAdapter",
               "frame_stack_mlp": "adapters.frame_stack:FrameStackProjector"},
}
DEFAULT = {"image": "gated_xattn", "video": "perceiver", "speech": "conv_rotary"}
_EXTRA: dict[str, dict[str, type]] = {m: {} for m in MODALITIES}  # registered at runtime (`register`)


class DesignError(ValueError):
    """A design spec that cannot be resolved or does not fit its design's Config (one line)."""


def register(modality: str, kind: str):
    """Class decorator: make `kind` name this design for `modality` (e.g. a toy design in a test or a notebook)."""
    _check_modality(modality)

    def deco(cls: type) -> type:
        _check_class(cls, kind)
        _EXTRA[modality][kind] = cls
        return cls

    return deco


def kinds(modality: str) -> list[str]:
    """Every registered kind of a modality (built-in first)."""
    _check_modality(modality)
    return list(BUILTIN[modality]) + [k for k in _EXTRA[modality] if k not in BUILTIN[modality]]


def design_class(modality: str, kind: str) -> type:
    """The class a kind names: a registered name, or "package.module:ClassName" importable from sys.path."""
    _check_modality(modality)
    if kind in _EXTRA[modality]:
        return _EXTRA[modality][kind]
    target = BUILTIN[modality].get(kind) or (kind if ":" in kind else None)
    if target is None:
        raise DesignError(f"unknown {modality} adapter kind {kind!r}; registered: {', '.join(kinds(modality))} "
                          "(or name a class as package.module:ClassName)")
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DesignError(f"{modality} adapter kind {kind!r}: cannot import {target}: {e}") from None
    return _check_class(cls, kind)


def parse(modality: str, spec: dict | None) -> tuple[type, Any]:
    """A YAML spec {kind: ..., **fields} (kind defaults to the modality's default) or a saved {kind, config} record
    -> (design class, its Config); DesignError naming the key on an unknown key or a wrong type."""
    spec = dict(spec or {})
    if set(spec) == {"kind", "config"} and isinstance(spec["config"], dict):
        spec = {"kind": spec["kind"], **spec["config"]}
    kind = str(spec.pop("kind", None) or DEFAULT[modality])
    cls = design_class(modality, kind)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), spec)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        raise DesignError(f"{modality} adapter {kind}: " + (f"key {key!r}: " if key else "") + msg) from None
    return cls, cfg


def spec_of(module: Any) -> dict:
    """The save format of a built design: {"kind": kind, "config": its Config as a dict}."""
    return {"kind": module.kind, "config": dataclasses.asdict(module.cfg)}


def build(modality: str, spec: dict | None, **ctx):
    """Build a design from a YAML spec, a saved {"kind", "config"} record or a design's Config instance; the module
    gets `kind` and `cfg`."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = {"kind": kind_of(modality, spec), **dataclasses.asdict(spec)}
    cls, cfg = parse(modality, spec)
    module = cls(cfg, **ctx)
    module.kind = str((spec or {}).get("kind") or DEFAULT[modality])
    module.cfg = cfg
    return module


def kind_of(modality: str, cfg: Any) -> str:
    """The registered kind whose design's Config is type(cfg)."""
    for kind in kinds(modality):
        if design_class(modality, kind).Config is type(cfg):
            return kind
    raise DesignError(f"{type(cfg).__name__} is the Config of no registered {modality} adapter design")


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise DesignError(f"unknown modality {modality!r}; one of {MODALITIES}")


def _check_class(cls: Any, kind: str) -> type:
    if not isinstance(cls, type) or not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise DesignError(f"adapter kind {kind!r}: {cls!r} is not a class with a dataclass `Config`")
    return cls
