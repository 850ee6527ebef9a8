"""Where a video run loses the motion: linear probes of the clip's direction label (left / right / up / down, the
kit's `direction` clips) fitted on training clips and scored on held-out ones, from four places along the path:

  agg_flat         the aggregator's output tokens, flattened (what the perceiver keeps)
  agg_mean         their mean (what a uniform cross-attention read would get)
  lm_state         the fused LM's final hidden state at the answer position of the short direction question
  lm_state_frame   the same with the middle frame repeated in place of every frame (no motion: the floor)

    python benchmarks/video_probe.py --ckpt runs/video_pretrain_tiny [--train-clips 720] [--val-clips 200]

Prints ONE JSON line: {place: {"val_acc", "train_acc"}} per place, clips, chance (0.25). Hand-written softmax
regression (standardised features, L2, Adam): no scikit-learn in the environment for one linear model.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm.tokenizer import ChatFormat  # noqa: E402
from mm.cli import run_reporting  # noqa: E402
from mm.eval_video import load_video_samples, single_frame  # noqa: E402
from mm.stages.video import encode_video_qa, frame_features, frames_to_pixels, load_video, saved_num_frames, \
    short_prompt  # noqa: E402

DIRECTIONS = ("left", "right", "up", "down")
PLACES = ("agg_flat", "agg_mean", "lm_state", "lm_state_frame")


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 weight_decay: float = 1e-3, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> dict:
    """Softmax regression on standardised features (N, D) -> {"val_acc", "train_acc"}."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd
    k = int(max(y_train.max(), y_val.max())) + 1
    w = (0.01 * torch.randn(xt.shape[1], k, generator=g)).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(xt @ w + b, y_train) + weight_decay * (w ** 2).sum()).backward()
        opt.step()
    with torch.no_grad():
        acc = {s: float(((x @ w + b).argmax(1) == y).float().mean()) for s, x, y in
               (("val_acc", xv, y_val), ("train_acc", xt, y_train))}
    return acc


@torch.no_grad()
def probe_features(fused, vision, tok, spec: str, num_frames: int, n_clips: int) -> tuple[dict, torch.Tensor]:
    """{place: (n, D)} features and (n,) direction labels of the first n_clips direction clips of the shards."""
    fmt = ChatFormat(tok)
    samples, _ = load_video_samples(spec, num_frames, vision.cfg.image_size, 0, 0)
    samples = [s for s in samples if (s.get("meta") or {}).get("family") == "direction"][:n_clips]
    if not samples:
        raise ValueError(f"{spec}: no direction clips (meta family 'direction')")
    feats: dict[str, list] = {p: [] for p in PLACES}
    labels = []
    for s in samples:
        answer = str(s["meta"]["qa"][0]["answers"][0])  # the kit's first direction question: "In which direction ..."
        if answer not in DIRECTIONS:
            raise ValueError(f"{spec}: a direction clip's first answer is {answer!r}, not one of {DIRECTIONS}")
        labels.append(DIRECTIONS.index(answer))
        ids, _ = encode_video_qa(fmt, short_prompt(s["meta"]["qa"][0]["question"]), None)
        for frames, place in ((s["frames"], "lm_state"), (single_frame(s["frames"]), "lm_state_frame")):
            px, aspect = frames_to_pixels(torch.as_tensor(frames)[None], vision.cfg)
            agg = fused.aggregate(frame_features(vision, px, aspect))  # (1, 1, E*N, W)
            if place == "lm_state":
                feats["agg_flat"].append(agg[0, 0].flatten())
                feats["agg_mean"].append(agg[0, 0].mean(0))
            h = fused(torch.tensor([ids]), video=fused.aggregated_kv(agg), return_hidden=True)  # (1, T, D)
            feats[place].append(h[0, -1])
    return {p: torch.stack(v) for p, v in feats.items()}, torch.tensor(labels)


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fused, vision, tok = load_video(args.ckpt)
    fused.eval()
    vision.eval()
    frames = args.frames or saved_num_frames(args.ckpt)
    tr, ytr = probe_features(fused, vision, tok, args.train_shards, frames, args.train_clips)
    va, yva = probe_features(fused, vision, tok, args.shards, frames, args.val_clips)
    out = {"ckpt": str(args.ckpt), "train_clips": len(ytr), "val_clips": len(yva), "chance": 1 / len(DIRECTIONS)}
    for p in PLACES:
        out[p] = {k: round(v, 4) for k, v in linear_probe(tr[p], ytr, va[p], yva, args.weight_decay).items()}
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
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    return run_reporting(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
