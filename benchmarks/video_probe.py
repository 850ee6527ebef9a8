"""Where a video run loses the motion: linear probes of the clip's direction label (left / right / up / down, the
kit's `direction` clips) fitted on training clips and scored on held-out ones, from four places along the path:

  agg_flat         the aggregator's output tokens, flattened (what the perceiver keeps)
  agg_mean         their mean (what a uniform cross-attention read would get)
  lm_state         the composed model's final hidden state at the answer position of the short direction question
  lm_state_frame   the same with the middle frame repeated in place of every frame (no motion: the floor)
  agg_read         a 4-head softmax attention read with learned queries over the aggregator's tokens, then a linear
                   layer (the shape of the LM's video cross-attention, trained for this label alone)
  agg_read_pos     the same read with learned per-token positions added to its keys and values

    python benchmarks/video_probe.py --ckpt runs/video_pretrain_tiny [--train-clips 720] [--val-clips 200]

Prints ONE JSON line: {place: {"val_acc", "train_acc"}} per place, clips, chance (0.25). Hand-written softmax
regression (standardised features, L2, Adam) and attention read: no scikit-learn here, and it has no attention read.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from data.dialog import dialog  # noqa: E402
from data.qa_format import short_prompt  # noqa: E402
from llm.tokenizer import ChatFormat  # noqa: E402
from mm.cli import run_reporting  # noqa: E402
from mm.eval.probe import attention_read_probe, linear_probe  # noqa: E402
from mm.eval.video import load_video_samples, single_frame  # noqa: E402
from mm.model.media import frames_to_pixels  # noqa: E402
from mm.model.store import load_model  # noqa: E402

DIRECTIONS = ("left", "right", "up", "down")
PLACES = ("agg_flat", "agg_mean", "lm_state", "lm_state_frame")
READS = {"agg_read": False, "agg_read_pos": True}  # attention-read probes of the aggregator's tokens: positions?


@torch.no_grad()
def probe_features(model, tok, spec: str, num_frames: int, n_clips: int) -> tuple[dict, torch.Tensor]:
    """{place: (n, D)} features (and "agg_tokens" (n, E*N, W)) and (n,) direction labels of the first n_clips
    direction clips of the shards."""
    fmt, vcfg = ChatFormat(tok), model.image.encoder.cfg
    samples, _ = load_video_samples(spec, num_frames, vcfg.image_size, 0, 0)
    samples = [s for s in samples if (s.get("meta") or {}).get("family") == "direction"][:n_clips]
    if not samples:
        raise ValueError(f"{spec}: no direction clips (meta family 'direction')")
    feats: dict[str, list] = {p: [] for p in ("agg_tokens", "lm_state", "lm_state_frame")}
    labels = []
    for s in samples:
        answer = str(s["meta"]["qa"][0]["answers"][0])  # the kit's first direction question: "In which direction ..."
        if answer not in DIRECTIONS:
            raise ValueError(f"{spec}: a direction clip's first answer is {answer!r}, not one of {DIRECTIONS}")
        labels.append(DIRECTIONS.index(answer))
        ids, _ = dialog(fmt, short_prompt(s["meta"]["qa"][0]["question"]), media=model.video.placeholder_ids())
        for frames, place in ((s["frames"], "lm_state"), (single_frame(s["frames"]), "lm_state_frame")):
            video = model.video.features(model.image.encoder, frames_to_pixels(torch.as_tensor(frames)[None], vcfg))
            agg = model.video.aggregate(video)  # (1, 1, E*N, W)
            if place == "lm_state":
                feats["agg_tokens"].append(agg[0, 0])  # (E*N, W)
            h = model(torch.tensor([ids]), video=model.video.kv(agg), return_hidden=True)  # (1, T, D)
            feats[place].append(h[0, -1])
    out = {p: torch.stack(v) for p, v in feats.items()}
    out["agg_flat"], out["agg_mean"] = out["agg_tokens"].flatten(1), out["agg_tokens"].mean(1)
    return out, torch.tensor(labels)


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, _ = load_model(args.ckpt)
    model.require("video", args.ckpt)
    frames = args.frames or model.video.num_frames
    tr, ytr = probe_features(model, tok, args.train_shards, frames, args.train_clips)
    va, yva = probe_features(model, tok, args.shards, frames, args.val_clips)
    out = {"ckpt": str(args.ckpt), "train_clips": len(ytr), "val_clips": len(yva), "chance": 1 / len(DIRECTIONS)}
    for p in PLACES:
        out[p] = {k: round(v, 4) for k, v in linear_probe(tr[p], ytr, va[p], yva, args.weight_decay).items()}
    for p, pos in READS.items():
        acc = attention_read_probe(tr["agg_tokens"], ytr, va["agg_tokens"], yva, pos, args.read_epochs)
        out[p] = {k: round(v, 4) for k, v in acc.items()}
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="video-stage run directory")
    p.add_argument("--train-shards", default=".cache/shards/video/train-*.tar", help="clips the probes are fitted on")
    p.add_argument("--shards", default=".cache/shards/video/val-*.tar", help="held-out clips the probes are scored on")
    p.add_argument("--train-clips", type=int, default=720)
    p.add_argument("--val-clips", type=int, default=200)
    p.add_argument("--frames", type=int, default=0, help="frames per clip (0: the run's)")
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--read-epochs", type=int, default=150, help="epochs of the attention-read probes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    return run_reporting(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
