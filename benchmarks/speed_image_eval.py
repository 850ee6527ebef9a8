"""Image eval speed: the held-out questions of an image run answered one item at a time (mm.eval.image.answer) and
with a question's items as rows of one batch (answer_items, what vqa_eval runs), in the same process on the same
cached image features.

    python benchmarks/speed_image_eval.py --ckpt runs/image_tiny/image_dpo [--max-items 0] [--threads 1]

Prints ONE JSON line: items, questions, per_item_s, batched_s, speedup, differ (items whose answers differ; 0 when
batching changes nothing) with up to 5 examples, peak_rss_mb.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from data.loader import load_image_samples  # noqa: E402
from llm.tokenizer import ChatFormat  # noqa: E402
from mm.eval.image import answer, answer_items, image_features, vqa_items  # noqa: E402
from mm.model.store import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="image-stage run directory (or its final/ folder)")
    p.add_argument("--shards", default=".cache/shards/image/val-*.tar")
    p.add_argument("--max-items", type=int, default=0, help="cap on questions (0: all)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok, _ = load_model(a.ckpt)
    samples, _ = load_image_samples(a.shards, model.image.encoder.cfg.image_size)
    items, fmt = vqa_items(samples, a.max_items), ChatFormat(tok)
    feats = {i: image_features(model, samples[i]["image"]) for i in sorted({it["sample"] for it in items})}
    t0 = time.perf_counter()
    one = [answer(model, fmt, it["question"], feats[it["sample"]]) for it in items]
    t1 = time.perf_counter()
    rows = answer_items(model, fmt, items, lambda it: feats[it["sample"]])
    t2 = time.perf_counter()
    differ = [{"q": items[k]["question"], "per_item": one[k], "batched": rows[k]}
              for k in range(len(items)) if one[k] != rows[k]]
    questions = len({it["question"] for it in items})
    print(json.dumps({"ckpt": a.ckpt, "threads": a.threads, "items": len(items), "questions": questions,
                      "per_item_s": round(t1 - t0, 1), "batched_s": round(t2 - t1, 1),
                      "speedup": round((t1 - t0) / max(t2 - t1, 1e-9), 2), "differ": len(differ),
                      "differ_examples": differ[:5],
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
