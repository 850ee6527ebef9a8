"""`mm import open_clip|timm`: a pretrained ViT checkpoint (encoders.import_vit) written as a vision run directory.

RUN/final/{model.safetensors ("vision.*" = the VisionEncoder; "visual_proj.weight" (E, width) when the checkpoint has
open_clip's image projection), meta.json (kind "vision", stage "import", vision_config, source: kind, arch, file,
sha256, native image size, pooling)} plus RUN/result.json. Image stages take RUN as `vision=`; clip_pretrain starts
from it with `vision_from=RUN`; mm.model.store.load_vision reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

from mm.model.checkpoint import file_sha256, save_weights
from mm.train.rundir import RunLock
from mm.model.runs import FINAL


def import_vision_run(kind: str, model: str | Path, arch: str, out: str | Path, image_size: int | None = None,
                      taps: list[int] | None = None, n_gated: int | None = None, max_tiles: int = 1, seed: int = 0,
                      force: bool = False) -> dict:
    """Import `model` (an open_clip or timm ViT checkpoint of `arch`) into run directory `out`; returns the result
    dict (also written to out/result.json). Refuses an existing out/final unless force; holds out's lock."""
    out = Path(out)
    with RunLock(out):
        return _import(kind, model, arch, out, image_size, taps, n_gated, max_tiles, seed, force)


def _import(kind, model, arch, out: Path, image_size, taps, n_gated, max_tiles, seed, force) -> dict:
    from encoders.import_vit import import_vit

    if (out / FINAL).exists() and not force:
        raise ValueError(f"{out / FINAL}: exists; pass --force to overwrite it")
    imp = import_vit(kind, model, arch, image_size=image_size, taps=taps, n_gated=n_gated, max_tiles=max_tiles,
                     seed=seed)
    enc = imp.encoder
    state = {f"vision.{k}": v for k, v in enc.state_dict().items()}
    if imp.visual_proj is not None:
        state["visual_proj.weight"] = imp.visual_proj
    source = {**imp.info, "file": str(Path(model).resolve()), "sha256": file_sha256(Path(model))}
    meta = {"kind": "vision", "stage": "import", "vision_config": enc.cfg.to_dict(), "source": source, "seed": seed}
    save_weights(out / FINAL, {"model": state}, meta)
    result = {"stage": "import", "run_dir": str(out), "source": source, "vision_config": enc.cfg.to_dict(),
              "params": sum(p.numel() for p in enc.parameters()),
              "params_imported": sum(p.numel() for p in enc.vit.parameters())}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result
