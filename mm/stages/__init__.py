"""Stage registry: a config's `stage` name -> the function that runs it (imported lazily: fast CLI start)."""
from __future__ import annotations

import importlib
from typing import Callable

RUNNERS = {
    "lm_pretrain": ("mm.stages.lm_pretrain", "run"),
    "lm_sft": ("mm.stages.lm_post", "run_sft"),
    "lm_rm": ("mm.stages.lm_post", "run_rm"),
    "lm_dpo": ("mm.stages.lm_post", "run_dpo"),
    "lm_rs": ("mm.stages.lm_rs", "run"),
    "clip_pretrain": ("mm.stages.clip_pretrain", "run"),
    "image_pretrain": ("mm.stages.image_pretrain", "run"),
    "image_anneal": ("mm.stages.image_pretrain", "run"),
    "image_sft": ("mm.stages.image_sft", "run"),
    "image_dpo": ("mm.stages.image_dpo", "run"),
    "speech_pretrain": ("mm.stages.speech_pretrain", "run"),
    "speech_sft": ("mm.stages.speech_sft", "run"),
    "video_pretrain": ("mm.stages.video", "run"),
    "video_sft": ("mm.stages.video", "run"),
    "pipeline": ("mm.stages.pipeline", "run"),
    "herd_report": ("mm.stages.herd_report", "run"),
    "compose": ("mm.stages.compose", "run"),
    "ablation": ("mm.stages.ablation", "run"),
}


def stage_runner(name: str) -> Callable:
    """The run(cfg, run_dir, resume) function of a stage."""
    if name not in RUNNERS:
        raise KeyError(f"no runner for stage {name!r}; known: {sorted(RUNNERS)}")
    module, fn = RUNNERS[name]
    return getattr(importlib.import_module(module), fn)
