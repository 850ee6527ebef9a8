"""Running one stage config into a run directory: one writer at a time (a lock), reuse only a completed run made
with the same config and inputs (a fingerprint), resume only a matching interrupted one, never clobber silently."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from data.atomic import atomic_write_text
from data.decode import set_media_caps
from mm.config import load_config, to_yaml
from mm.train.resources import measured
from mm.train.rundir import ConfigDrift, RunLock, check_matches, fingerprint, read_fingerprint, write_fingerprint

CLEARED_BY_FORCE = ("checkpoints", "final", "metrics.jsonl", "tb", "result.json", "tokenizer.json", "tokens",
                    "model_config.json", "benchmarks", "report.md", "shards"
                    )  # what stages derive in their run directory (herd_report, lm_rs too): --force clears it; image_sft
# members stay: image_sft reuses a member only when its own key (LMs, init weights, seed, lr, config) matches


ORCHESTRATORS = ("pipeline", "ablation")  # stages that run other stages: never reused whole, each step checked


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    """After a stage, wait for rank 0's writes (result.json, final/) before any rank reads them in the next step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _clear(run_dir: Path) -> None:
    for sub in CLEARED_BY_FORCE:
        p = run_dir / sub
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_config(config: str | Path, overrides: list[str], run_dir: Path, *, resume: bool = False,
               force: bool = False, redo_changed: bool = False, break_lock: bool = False) -> dict:
    """Run the stage a YAML describes into run_dir under its lock (rank 0 holds it).

    A completed run (result.json) is reused when its fingerprint matches; otherwise ConfigDrift names the first
    differing key, unless force (retrain) or redo_changed (retrain only because it differs: pipelines' --force).
    An interrupted run needs resume (checked the same way, safe keys excepted) or force. Pipelines are never reused
    whole: each of their steps is checked on its own."""
    cfg = load_config(config, overrides)
    run_dir = Path(run_dir)
    lock = RunLock(run_dir, break_lock) if is_main() else contextlib.nullcontext()
    with lock:
        result = _run_unlocked(cfg, run_dir, resume, force, redo_changed, break_lock)
    _barrier()
    return result


def _run_unlocked(cfg, run_dir: Path, resume: bool, force: bool, redo_changed: bool, break_lock: bool) -> dict:
    from mm.stages import stage_runner

    pipeline = cfg.stage in ORCHESTRATORS
    done = run_dir / "result.json"
    fp = fingerprint(cfg, run_dir, read_fingerprint(run_dir))
    if done.exists() and not force and not pipeline:
        try:
            check_matches(run_dir, fp, "completed")
            return {**json.loads(done.read_text()), "reused": True, "run_dir": str(run_dir)}
        except ConfigDrift as e:
            if not redo_changed:
                raise
            print(f"[mm] retraining: {e}", file=sys.stderr, flush=True)
            force = True
    ckpts = run_dir / "checkpoints"
    interrupted = ckpts.exists() and any(ckpts.iterdir())
    if interrupted and not resume and not force:
        raise ValueError(f"{run_dir}: holds an interrupted run; pass --resume to continue it or --force to restart")
    # a started run (checkpoints, or caches a stage keeps: tokenizer, token arrays, image_sft members) continues
    # only with the config it was started with
    started = interrupted or (not pipeline and not done.exists() and (run_dir / "fingerprint.json").exists())
    if started and not force:
        try:
            check_matches(run_dir, fp, "--resume of a run made" if resume else "a run started")
        except ConfigDrift as e:
            if not redo_changed:
                raise
            print(f"[mm] restarting: {e}", file=sys.stderr, flush=True)
            force, resume = True, False
    if force and not resume and is_main():
        _clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        write_fingerprint(run_dir, fp)
    extra = {"redo_changed": force or redo_changed, "break_lock": break_lock, "run_config": run_config} if pipeline \
        else {}
    caps = set_media_caps(cfg.media) if hasattr(cfg, "media") else None  # the stage's per-file media caps
    try:
        with measured(memory=not pipeline) as cost:  # wall time and peak RSS, kept in result.json (the report's stage table)
            result = stage_runner(cfg.stage)(cfg, run_dir, resume=resume, **extra)
        result = {**result, **cost, "run_dir": str(run_dir)}
    finally:
        if caps is not None:
            set_media_caps(caps)
    if result.get("stopped_at") is not None:  # train.stop_after: not complete, so no result.json; --resume continues
        return result
    if is_main():
        write_fingerprint(run_dir, fingerprint(cfg, run_dir, fp))  # inputs a stage built itself (e.g. the text kit)
        atomic_write_text(done, json.dumps(result, indent=1))
    return result
