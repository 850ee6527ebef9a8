"""Image benchmark: VQA accuracy of an image-stage run per family, the same model answering blind (no image, no
`<|image|>` token), and held-out text bits per byte of the composed model without media next to the bare LM.

    python benchmarks/image.py --ckpt runs/image_pretrain_tiny [--shards VAL_SPEC | --tsv F | --jsonl F] [--max-items N]

Prints ONE JSON line: vqa_acc (VQA normalisation; min(#matching refs / 3, 1) with several references, else exact
match), with another sample's image (shuffled_vqa_acc) and with none (blind_vqa_acc), each also per task family and
per source (*_by_family, *_by_source); the reading gain (image - shuffled) with its paired bootstrap 95% interval
overall ("reading"), per family and per source; exact_match (any reference matches); text_bpb and lm_text_bpb
(equal by DESIGN.md invariant 1: text_bpb_equal); with --peer the OCR peer beside ours on the same OCR items
("ocr_peer"); with --against CKPT a second image run scored on the same items (e.g. image_pretrain against the
image_anneal that continues it) and the paired difference with its 95% interval ("against"); items, timings.
Metric code: mm/eval/image.py.
--tsv (VLMEvalKit, MMBench-style) / --jsonl (lmms-eval style) score a benchmark file instead of shards (readers:
data/bench_files.py): per category (*_by_family), lettered multiple choice, bad rows counted under "skipped".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from data.shards import SkipCounter, expand_shards, iter_text_docs  # noqa: E402
from mm.cli import run_reporting  # noqa: E402
from mm.eval.image import eval_image_file, eval_image_shards  # noqa: E402
from mm.eval.stats import paired_bootstrap  # noqa: E402
from mm.eval.text import bits_per_byte  # noqa: E402
from mm.model.runs import load_lm  # noqa: E402
from mm.model.store import load_model  # noqa: E402


def text_bpb(model, lm, tok, spec: str, max_docs: int, seq_len: int) -> dict:
    """Held-out bits per byte of the composed model with no media and of the bare LM on the same documents."""
    texts = [d["text"] for d in iter_text_docs(expand_shards(spec), SkipCounter())][:max_docs]
    if not texts:
        raise ValueError(f"{spec}: no readable text documents")
    seq_len = min(seq_len, lm.cfg.max_seq_len)
    a = bits_per_byte(model, tok, texts, seq_len)
    b = bits_per_byte(lm, tok, texts, seq_len)
    return {"text_bpb": a, "lm_text_bpb": b, "text_bpb_equal": a == b, "text_docs": len(texts)}


def against(args, kw: dict, ours: dict) -> dict:
    """Score the run args.against (decoded at args.against_decode_scale tile sides) on the same shard items as the
    main run: {"ckpt", "decode_scale", "items", "acc", "ours", "delta" (ours - its), "ci95", "naming_by_source" (the
    same per source on the naming questions alone), "reading_gain"}."""
    other, tok, _ = load_model(args.against)
    other.require("image", args.against)
    kw = {**kw, "decode_scale": args.against_decode_scale, "examples_dir": None}
    theirs = eval_image_shards(other, tok, args.shards, per_item=True, **kw)
    if theirs["per_item"]["source"] != ours["source"]:
        raise ValueError(f"{args.against}: scored other items than {args.ckpt} (its encoder decodes differently)")
    d = paired_bootstrap(ours["model"], theirs["per_item"]["model"], None, 1000, 0)
    named: dict[str, list[int]] = {}  # the naming questions alone, per source, paired the same way
    for k, (src, is_naming) in enumerate(zip(ours["source"], ours["naming"])):
        if is_naming:
            named.setdefault(src, []).append(k)
    naming = {}
    for src, keep in sorted(named.items()):
        e = paired_bootstrap([ours["model"][k] for k in keep], [theirs["per_item"]["model"][k] for k in keep],
                             None, 1000, 0)
        naming[src] = {"items": e["n"], "acc": e["b"], "ours": e["a"], "delta": e["delta"], "ci95": e["ci95"]}
    return {"ckpt": str(args.against), "decode_scale": args.against_decode_scale, "items": d["n"], "acc": d["b"],
            "ours": d["a"], "delta": d["delta"], "ci95": d["ci95"], "naming_by_source": naming,
            "reading_gain": theirs.get("reading")}


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, meta = load_model(args.ckpt)
    model.require("image", args.ckpt)
    out = {"ckpt": str(args.ckpt)}
    kw = dict(max_items=args.max_items, max_new_tokens=args.max_new_tokens, blind=not args.no_blind,
              decode_scale=args.decode_scale, seed=args.seed, examples_dir=args.examples_dir,
              families=tuple(f for f in args.families.split(",") if f))
    tsv, jsonl = getattr(args, "tsv", None), getattr(args, "jsonl", None)
    other = getattr(args, "against", None)
    if tsv and jsonl:
        raise ValueError("give --tsv or --jsonl, not both")
    if other and (tsv or jsonl):
        raise ValueError("--against scores shards (--shards), not a benchmark file")
    if tsv or jsonl:
        out.update(eval_image_file(model, tok, tsv or jsonl, "tsv" if tsv else "jsonl", **kw))
    else:
        out.update(eval_image_shards(model, tok, args.shards, peer=args.peer, per_item=bool(other), **kw))
    if other:
        out["against"] = against(args, kw, out.pop("per_item"))
    out["vqa_s"] = round(time.perf_counter() - t0, 1)
    if args.text_shards and args.text_docs:
        lm, _, _ = load_lm(meta["lm"])
        out.update(text_bpb(model, lm, tok, args.text_shards, args.text_docs, args.seq_len))
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="image-stage run directory (or its final/ folder)")
    p.add_argument("--shards", default=".cache/shards/image/val-*.tar", help="held-out image shards")
    p.add_argument("--tsv", help="a VLMEvalKit-style TSV benchmark file instead of --shards")
    p.add_argument("--jsonl", help="an lmms-eval-style JSONL benchmark file instead of --shards")
    p.add_argument("--max-items", type=int, default=400, help="cap on VQA items (questions; 0: all)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--no-blind", action="store_true", help="skip the blind (no image) pass")
    p.add_argument("--text-shards", default=".cache/shards/text/val-*.tar", help="held-out text ('' to skip)")
    p.add_argument("--text-docs", type=int, default=32, help="held-out text documents for text_bpb (0: skip)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--decode-scale", type=int, default=1, help="decode images at this many tile sides (tiling)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default="", help="comma-separated task families (file: categories) to score "
                                                  "(default: all)")
    p.add_argument("--examples-dir", help="save the example images here (their paths go into the examples)")
    p.add_argument("--peer", choices=("rapidocr", "tesseract"),
                   help="also score this OCR recogniser on the same OCR items (optional; says so if absent)")
    p.add_argument("--against", help="another image run scored on the same items: the paired difference "
                                     "(e.g. --ckpt ANNEAL --decode-scale 2 --against PRETRAIN)")
    p.add_argument("--against-decode-scale", type=int, default=1, help="--decode-scale for the --against run")
    args = p.parse_args(argv)
    return run_reporting(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
