"""Stage registry: a config's `stage` name -> the function that runs it."""
from __future__ import annotations

from typing import Callable


def stage_runner(name: str) -> Callable:
    """The run(cfg, run_dir, resume) function of a stage (imported lazily to keep the CLI start fast)."""
    if name == "lm_pretrain":
        from mm.stages.lm_pretrain import run

        return run
    raise KeyError(f"no runner for stage {name!r}")
