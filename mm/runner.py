"""Running one stage config into a run directory: reuse when complete, refuse to clobber an interrupted run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mm.config import load_config, to_yaml


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_config(config: str | Path, overrides: list[str], run_dir: Path, *, resume: bool = False,
               force: bool = False) -> dict:
    """Run the stage a YAML describes into run_dir; a completed run (result.json) is reused unless force."""
    from mm.stages import stage_runner

    cfg = load_config(config, overrides)
    run_dir = Path(run_dir)
    done = run_dir / "result.json"
    if done.exists() and not force:
        return {**json.loads(done.read_text()), "reused": True, "run_dir": str(run_dir)}
    ckpts = run_dir / "checkpoints"
    if ckpts.exists() and any(ckpts.iterdir()) and not resume and not force:
        raise ValueError(f"{run_dir}: holds an interrupted run; pass --resume to continue it or --force to restart")
    if force and not resume:
        for sub in ("checkpoints", "final", "metrics.jsonl", "tb", "result.json"):
            p = run_dir / sub
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    result = {**stage_runner(cfg.stage)(cfg, run_dir, resume=resume), "run_dir": str(run_dir)}
    if result.get("stopped_at") is not None:  # train.stop_after: not complete, so no result.json; --resume continues
        return result
    if is_main():
        done.write_text(json.dumps(result, indent=1))
    return result
