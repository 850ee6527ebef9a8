"""Stage `pipeline`: chain stage YAMLs into one run directory, once or per round, reusing completed steps.

Overrides may use {run} (the pipeline's run directory), {r} / {r-1} (this / the previous round) and {policy} (the
latest output of a step named in `policy_steps`, i.e. the current best policy).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from mm.config import PipelineConfig

POLICY_STEPS = ("sft0", "sft", "dpo")  # steps whose output becomes the current policy


def _fill(text: str, run_dir: Path, r: int, policy: str | None) -> str:
    if "{policy}" in text and policy is None:
        raise ValueError(f"pipeline override {text!r} uses {{policy}} before any step produced one")
    return (text.replace("{run}", str(run_dir)).replace("{r-1}", str(r - 1)).replace("{r}", str(r))
            .replace("{policy}", policy or ""))


def run(cfg: PipelineConfig, run_dir: Path, resume: bool = False, redo_changed: bool = False,
        break_lock: bool = False, run_config: Callable[..., dict] | None = None) -> dict:
    """Run every step through `run_config` (the runner's, which passes itself; each step reused when its config and
    inputs match; with redo_changed, `mm run --force`, retrained when they do not); returns {step_dir: result} plus
    the final policy."""
    if run_config is None:
        raise ValueError("pipeline: run it through the runner (mm run), which runs its steps")
    results, policy = {}, None
    once = [s for s in cfg.steps if not s.per_round]
    each = [s for s in cfg.steps if s.per_round]
    plan = [(s, 0, run_dir / s.name) for s in once]
    plan += [(s, r, run_dir / f"r{r}" / s.name) for r in range(1, cfg.rounds + 1) for s in each]
    t_all = time.perf_counter()
    for i, (step, r, out) in enumerate(plan, 1):
        overrides = [_fill(o, run_dir, r, policy) for o in step.overrides]
        print(f"[pipeline {i}/{len(plan)}] {out.relative_to(run_dir)}: {step.config}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = run_config(step.config, overrides, out, resume=resume, redo_changed=redo_changed, break_lock=break_lock)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[pipeline {i}/{len(plan)}] {out.relative_to(run_dir)}: "
              f"{'reused' if res.get('reused') else 'done'} in {res['wall_s']} s "
              f"({time.perf_counter() - t_all:.0f} s so far)", file=sys.stderr, flush=True)
        if res.get("stopped_at") is not None:
            return {"stage": "pipeline", "stopped_at": str(out), "steps": results}
        results[str(out.relative_to(run_dir))] = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
        if step.name in POLICY_STEPS:
            policy = str(out)
    peaks = [r["peak_rss_mb"] for r in results.values() if "peak_rss_mb" in r]  # each step's, when it was made
    return {"stage": "pipeline", "rounds": cfg.rounds, "policy": policy, "steps": results,
            "reused": all(r.get("reused", False) for r in results.values()),  # every step was reused
            **({"peak_rss_mb": max(peaks)} if peaks else {})}
