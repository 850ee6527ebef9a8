"""One save format and one load path for every composed model: stage runs (image, video, speech), `mm compose`,
chat, eval, benchmarks, the report and the notebooks.

A model folder (RUN/final or a step checkpoint) holds model.safetensors with every stream tensor under the composed
model's keys ("image.encoder.*", "image.adapter.*", "video.aggregator.*", "speech.adapter.*", ...; never the LM's),
tokenizer.json and meta.json: {"kind": "composed", "format": 2, "lm": the LM's model folder, "lm_sha256": a hash of
its weights (checked on load), "lm_config", "streams": {name: its record}} plus the stage's own fields. A stream's
record is {"encoder": {kind, config}?, "adapter": {kind, config}, ...} (mm.model.streams). Composing runs is loading
their streams onto one LM: refused when the runs' LM weights differ.
Runs written before this format (meta kind "image" / "speech" / "herd") load through `_legacy`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from adapters import registry
from adapters.speech import SpeechTokens
from encoders.speech import ConformerConfig, ConformerEncoder
from encoders.vision import VisionConfig, VisionEncoder, resample_positions
from llm.tokenizer import Tokenizer
from mm.model.checkpoint import CheckpointError, load_into, load_meta, load_tensors, save_weights
from mm.model.composed import STREAMS, ComposedLM
from mm.model.runs import load_lm, model_dir
from mm.model.streams import ImageStream, SpeechStream, VideoStream

KIND, FORMAT = "composed", 2
TILE_KEYS = ("pre_tile_embed", "tile_pos_embed", "post_tile_embed")


def lm_fingerprint(lm: nn.Module) -> str:
    """sha256 over an LM's state dict (sorted keys, dtype, shape and bytes of every tensor): equal iff the weights
    are bitwise equal (whatever folder they were read from)."""
    h = hashlib.sha256()
    for k, t in sorted(lm.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _file_stat(lm: str | Path) -> dict | None:
    """{"size", "mtime_ns"} of an LM folder's weights file (None when it is not there)."""
    try:
        st = (model_dir(lm) / "model.safetensors").stat()
    except (CheckpointError, OSError):
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Identical tokenizers: the same serialized vocabulary, merges and special tokens."""
    return a.hf.to_str() == b.hf.to_str()


# ---- saving ---------------------------------------------------------------------------------------------------------

def save_model(directory: Path, model: ComposedLM, tok: Tokenizer, meta: dict) -> Path:
    """Write a model folder (module doc); meta must name the LM folder ("lm")."""
    if "lm" not in meta:
        raise ValueError("save_model: meta must name the LM folder ('lm')")
    meta = {**meta, "kind": KIND, "format": FORMAT, "lm": str(meta["lm"]), "lm_sha256": lm_fingerprint(model.lm),
            "lm_file": _file_stat(meta["lm"]), "lm_config": model.cfg.to_dict(),
            "streams": {n: s.record() for n, s in model.streams().items()}}
    out = save_weights(Path(directory), {"model": model.stream_state_dict()}, meta)
    tok.save(out / "tokenizer.json")
    return out


# ---- building streams from records ----------------------------------------------------------------------------------

def _design(modality: str, spec: dict, where: Path) -> dict:
    try:
        registry.parse(modality, spec)
    except registry.DesignError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return spec


def build_stream(model: ComposedLM, tok: Tokenizer, name: str, rec: dict, where: Path,
                 respec: dict | None = None) -> nn.Module:
    """A fresh (untrained) stream of the record `rec`, attached to model; respec: adapter config fields to change
    (e.g. a video run's aggregation factor, which its weights do not depend on)."""
    adapter = dict(rec["adapter"])
    if respec:
        adapter = {"kind": adapter["kind"], "config": {**adapter["config"], **respec}}
    adapter = _design(name, adapter, where)
    lm = model.lm
    if name == "image":
        enc = VisionEncoder(VisionConfig(**rec["encoder"]["config"]))
        stream = ImageStream.build(lm, tok.special_id("<|image|>"), enc, adapter)
    elif name == "video":
        stream = VideoStream.build(lm, tok.special_id("<|video|>"), model.image, adapter, rec["every"],
                                   rec["num_frames"])
    elif name == "speech":
        enc = ConformerEncoder(ConformerConfig(**rec["encoder"]["config"]))
        stream = SpeechStream(enc, registry.build("speech", adapter), SpeechTokens.of(tok))
    else:
        raise CheckpointError(f"{where}: unknown stream {name!r} (known: {', '.join(STREAMS)})")
    return model.attach(stream)


def load_streams(model: ComposedLM, state: dict[str, torch.Tensor], path: Path, new: tuple[str, ...] = ()) -> None:
    """Load stream tensors into model: every stream key must be in `state` (except keys starting with one of `new`,
    which keep their fresh values) and every key of `state` must be a stream key; one line naming the file."""
    want = model.stream_state_dict()
    missing = sorted(k for k in set(want) - set(state) if not k.startswith(new or ("\0",)))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CheckpointError(f"{path}: does not fit the model: {what} ({len(missing)} missing, {len(extra)} "
                              "unexpected)")
    load_into(model, state, path, strict=False)


# ---- loading --------------------------------------------------------------------------------------------------------

def read_run(ckpt: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(model folder, meta in the current format, stream tensors under the current keys) of a composed run's final/
    (or a compose run); a run of the older formats is converted; CheckpointError naming the file for anything else."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    state = load_tensors(d / "model.safetensors")
    if meta.get("kind") != KIND:
        meta, state = _legacy(meta, state, d)
    if not isinstance(meta.get("streams"), dict) or not meta.get("lm"):
        raise CheckpointError(f"{d / 'meta.json'}: a composed model without {'lm' if meta.get('streams') else 'streams'}"
                              "; re-run its stage")
    return d, meta, state


def load_model(ckpt: str | Path, device: str | torch.device = "cpu", *, lm: str | Path | None = None,
               respec: dict[str, dict] | None = None, new: tuple[str, ...] = ()
               ) -> tuple[ComposedLM, Tokenizer, dict]:
    """(ComposedLM in eval mode, tokenizer, meta) of a composed run (an image, video or speech stage's final/, or a
    composed herd). The LM is meta "lm" (its weights checked against lm_sha256) unless `lm` names another (a
    hot-swap); respec {stream: adapter config fields} changes a design's weight-free settings; `new`: key prefixes
    that may be absent from the file (tables a respec adds) and keep their init."""
    d, meta, state = read_run(ckpt)
    base, _, _ = load_lm(lm or meta["lm"])
    if lm is None and meta.get("lm_sha256") and (meta.get("lm_file") is None or meta["lm_file"] != _file_stat(meta["lm"])):
        fp = lm_fingerprint(base)  # the LM file changed on disk since the save (or its stat was not recorded)
        if fp != meta["lm_sha256"]:
            raise CheckpointError(f"{model_dir(meta['lm']) / 'model.safetensors'}: its weights (sha256 {fp[:12]}) are "
                                  f"not the LM {d} was trained on ({d / 'meta.json'}: lm_sha256 "
                                  f"{meta['lm_sha256'][:12]}); re-run the stage on this LM")
    tok = Tokenizer.load(d / "tokenizer.json")
    model = ComposedLM(base)
    for name in STREAMS:
        if name in meta["streams"]:
            try:
                build_stream(model, tok, name, meta["streams"][name], d / "meta.json", (respec or {}).get(name))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{d / 'meta.json'}: its {name} stream record does not build ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}); re-run its stage") from None
    load_streams(model, state, d / "model.safetensors", new)
    return model.to(device).eval(), tok, meta


def _lm_file(meta: dict) -> Path:
    return model_dir(meta["lm"]).resolve() / "model.safetensors"


def runs_of(video: str | None, image: str | None, speech: str | None) -> list:
    """`mm compose`'s runs: the video run (all its streams) or the image run (its image stream only, even from a
    video run), then the speech run; ValueError unless exactly one of video / image is given."""
    if bool(video) == bool(image):
        raise ValueError("mm compose needs exactly one of --video RUN / --image RUN (a video run holds the image "
                         "stream too)")
    return [r for r in (video, (image, ("image",)) if image else None, speech) if r]


def hot_swap(model: ComposedLM, tok: Tokenizer, ckpt) -> None:
    """Hot-swap (DESIGN.md invariant 6): the model's LM weights become those of the LM run `ckpt` (streams
    untouched); its tokenizer must be the one the streams were trained with (same ids, same special tokens)."""
    other, otok, _ = load_lm(ckpt)
    probe = "Describe the image. 0123 yes no"
    if (otok.vocab_size, otok.encode(probe), otok.special_id("<|image|>")) != (
            tok.vocab_size, tok.encode(probe), tok.special_id("<|image|>")):
        raise CheckpointError(f"{model_dir(ckpt)}: its tokenizer differs from the model's; cannot hot-swap")
    model.load_lm_weights(other.state_dict())


def compose(runs: list, out: str | Path, meta: dict | None = None) -> dict:
    """`mm compose`: the streams of every run loaded onto ONE LM and written to out/final; a run given as (run,
    names) brings only those streams. ValueError naming both LM files when two runs' LM weights differ, or when two
    runs bring the same stream."""
    if not runs:
        raise ValueError("mm compose needs at least one run")
    runs = [r if isinstance(r, tuple) else (r, None) for r in runs]
    loaded = [(model_dir(r).resolve(), *load_model(r), names) for r, names in runs]
    d0, m0, tok0, meta0, _ = loaded[0]
    fp0 = meta0.get("lm_sha256") or lm_fingerprint(m0.lm)  # load_model checked a recorded hash against the LM
    model = ComposedLM(m0.lm)
    sources = {}
    for d, m, tok, meta, names in loaded:
        fp = meta.get("lm_sha256") or lm_fingerprint(m.lm)
        if fp != fp0:
            raise ValueError(f"cannot compose: the LMs differ: {_lm_file(meta0)} (sha256 {fp0[:12]}, LM of {d0}) vs "
                             f"{_lm_file(meta)} (sha256 {fp[:12]}, LM of {d}); all runs must be on one frozen LM")
        if not same_tokenizer(tok, tok0):
            raise ValueError(f"cannot compose: {d0 / 'tokenizer.json'} and {d / 'tokenizer.json'} differ")
        for name, stream in m.streams().items():
            if names is not None and name not in names:
                continue
            if getattr(model, name) is not None:
                raise ValueError(f"cannot compose: two runs bring {'an' if name == 'image' else 'a'} {name} stream "
                                 f"({sources[name]} and {d})")
            model.attach(stream)
            sources[name] = str(d)
    lm_path = str(model_dir(meta0["lm"]).resolve())
    final = save_model(Path(out) / "final", model.eval(), tok0,
                       {**(meta or {}), "stage": "compose", "lm": lm_path, "sources": sources})
    params = {"lm": sum(p.numel() for p in model.lm.parameters()),
              **{n: sum(p.numel() for p in s.parameters()) for n, s in model.streams().items()}}
    return {"out": str(final), "lm": lm_path, "lm_sha256": fp0, "streams": sorted(model.streams()), "params": params}


# ---- encoders of runs that are not composed models ------------------------------------------------------------------

def _encoder_state(run: str | Path, stream: str, config_key: str, prefix: str, what: str
                   ) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, encoder config, encoder tensors without their prefix) of a composed run's `stream`, or of a run that
    holds the encoder alone (meta `config_key`, tensors under `prefix`: clip / vision / speech_pretrain runs)."""
    d = model_dir(run)
    meta = load_meta(d)
    if meta.get("kind") in (KIND, "image", "speech", "herd"):
        d, meta, state = read_run(d)
        if stream not in meta["streams"]:
            raise CheckpointError(f"{d / 'meta.json'}: no {stream} stream")
        cfg, prefix = meta["streams"][stream]["encoder"]["config"], f"{stream}.encoder."
    elif config_key in meta:
        cfg, state = meta[config_key], load_tensors(d / "model.safetensors")
    else:
        raise CheckpointError(f"{d / 'meta.json'}: no {config_key} (not {what})")
    return d, cfg, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_vision(run: str | Path, max_tiles: int | None = None, thumbnail: bool | None = None,
                tile_size: int | None = None) -> VisionEncoder:
    """The image encoder of a clip / vision run ("vision.*") or of a composed run's image stream, optionally with
    another max_tiles / thumbnail (tile tables whose shape changes start from init and their gates from 0) or another
    tile side (tile_size: the ViT's and the tile tables' position embeddings resampled to the new patch grid, the
    resolution raise of Qwen-VL's second stage; beyond the paper, whose anneal adds tiles)."""
    d, cfg, sd = _encoder_state(run, "image", "vision_config", "vision.", "a clip, vision or image run")
    if tile_size is not None and (tile_size <= 0 or tile_size % cfg["patch_size"]):
        raise ValueError(f"{d}: tile_size {tile_size} is not a positive multiple of the encoder's patch size "
                         f"{cfg['patch_size']}")
    over = {k: v for k, v in (("max_tiles", max_tiles), ("thumbnail", thumbnail), ("image_size", tile_size))
            if v is not None}
    enc = VisionEncoder(VisionConfig(**{**cfg, **over}))
    if enc.cfg.image_size != cfg["image_size"]:
        sd = resample_positions(sd, enc.cfg.grid, cfg["image_size"] // cfg["patch_size"])
    own = enc.state_dict()
    for k in [k for k in TILE_KEYS if k in sd and sd[k].shape != own[k].shape]:
        sd[k] = own[k]
        sd[k.replace("_embed", "_gate")] = torch.zeros(1)
    load_into(enc, sd, d / "model.safetensors")
    return enc


def load_speech_encoder(run: str | Path) -> ConformerEncoder:
    """The Conformer of a speech_pretrain run ("encoder.*", meta encoder_config) or of a composed run's speech
    stream."""
    d, cfg, sd = _encoder_state(run, "speech", "encoder_config", "encoder.", "a speech run")
    enc = ConformerEncoder(ConformerConfig(**cfg))
    load_into(enc, sd, d / "model.safetensors")
    return enc


# ---- runs written before format 2 -----------------------------------------------------------------------------------

_OLD_KEYS = {  # old key prefix -> current
    "vision.": "image.encoder.", "fused.new_tokens.": "image.token.", "fused.image_adapter.": "image.adapter.",
    "fused.video_adapter.aggregator.": "video.aggregator.", "fused.video_adapter.xattn.": "video.xattn.",
    "fused.video_adapter.token.": "video.token.", "speech_encoder.": "speech.encoder.",
    "speech_adapter.": "speech.adapter.", "encoder.": "speech.encoder.", "adapter.": "speech.adapter."}


def _legacy(meta: dict, state: dict, d: Path) -> tuple[dict, dict]:
    """An image / video / speech / herd run of the first format -> (meta, state) of format 2."""
    kind = meta.get("kind")
    if kind not in ("image", "speech", "herd"):
        raise CheckpointError(f"{d / 'meta.json'}: not a composed model run (kind={kind!r}): an image, video, speech "
                              "or compose run was expected")
    streams = {}
    try:
        if kind in ("image", "herd"):
            adapter = meta.get("image_adapter") or (  # a run written before designs were plug-ins
                {"kind": "gated_xattn", "config": {"every": 1, "schedule": meta["image_layers"], "attend": meta["attend"],
                                                   "n_xattn": None}} if "image_layers" in meta else
                {"kind": "gated_xattn", "config": {"every": meta.get("every", 4), "attend": meta.get("attend", "last"),
                                                   "schedule": meta.get("schedule", "from_top"), "n_xattn": None}})
            streams["image"] = {"encoder": {"kind": "vit", "config": meta["vision_config"]}, "adapter": adapter}
            if meta.get("video"):
                v = meta["video"]
                agg = v["aggregator"]
                agg = agg if set(agg) == {"kind", "config"} else {"kind": "perceiver", "config": agg}
                streams["video"] = {"adapter": agg, "every": v["every"], "num_frames": int(v.get("num_frames") or 16)}
        if kind in ("speech", "herd"):
            spec = meta.get("speech_adapter") or {"kind": "conv_rotary", "config": meta["adapter_config"]}
            streams["speech"] = {"encoder": {"kind": "conformer", "config": meta["encoder_config"]}, "adapter": spec}
    except KeyError as e:
        raise CheckpointError(f"{d / 'meta.json'}: {'an' if kind == 'image' else 'a'} {kind} run without {e}: cannot "
                              "load it; re-run its stage") from None
    renamed = {}
    for k, v in state.items():
        old = next((p for p in _OLD_KEYS if k.startswith(p)), None)
        if old is None:
            raise CheckpointError(f"{d / 'model.safetensors'}: unexpected key {k!r} for a {kind} run; re-run its stage")
        renamed[_OLD_KEYS[old] + k[len(old):]] = v
    return {**meta, "kind": KIND, "format": 1, "streams": streams}, renamed
