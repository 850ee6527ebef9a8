"""Stage `compose` (mm.config.ComposeConfig): `mm compose` as a pipeline step: the streams of a video (or image) run
and a speech run loaded onto their one LM (mm.model.store.compose) into run_dir/final."""
from __future__ import annotations

from pathlib import Path

from mm.config import ComposeConfig
from mm.model.store import compose, runs_of


def run(cfg: ComposeConfig, run_dir: Path, resume: bool = False) -> dict:
    """compose(...) into run_dir, so a pipeline can chain it."""
    return {"stage": "compose", **compose(runs_of(cfg.video, cfg.image, cfg.speech), run_dir)}
