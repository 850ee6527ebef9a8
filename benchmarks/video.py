"""Video benchmark: multiple-choice and short-answer accuracy of a video-stage run per question type, with the paper's
prompts, on the clip ("video_acc"), on its middle frame alone repeated in place of every frame ("single_frame_acc")
and with no video ("blind_acc"); "temporal" sums the direction and order questions (gap = video - single frame).

    python benchmarks/video.py --ckpt runs/video_sft_tiny [--shards VAL_SPEC] [--max-items N] [--frames F]

Prints ONE JSON line (keys of mm.eval.video.video_eval plus shards, clips, skipped, timings). Metric code:
mm/eval/video.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mm.cli import run_reporting  # noqa: E402
from mm.eval.video import eval_video_shards  # noqa: E402
from mm.model.store import load_model  # noqa: E402


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, _ = load_model(args.ckpt)
    model.require("video", args.ckpt)
    out = {"ckpt": str(args.ckpt)}
    out.update(eval_video_shards(model, tok, args.shards, args.frames or None, args.max_items, args.max_new_tokens,
                                 backend=args.backend, seed=args.seed))
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="video-stage run directory (or its final/ folder)")
    p.add_argument("--shards", default=".cache/shards/video/val-*.tar", help="held-out video shards")
    p.add_argument("--max-items", type=int, default=400, help="cap on questions (0: all)")
    p.add_argument("--frames", type=int, default=0, help="frames sampled per clip (0: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0, help="clip order seed")
    return run_reporting(evaluate, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
