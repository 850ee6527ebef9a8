"""Text benchmark: held-out bits per byte of a trained LM against a unigram baseline fitted on the training split.

    python benchmarks/text.py --ckpt runs/pretrain_tiny [--shards VAL_SPEC] [--train-shards SPEC] [--seq-len N]

Prints ONE JSON line: val_bpb (the model over ALL held-out documents), unigram_bpb (add-one unigram over the run's
training tokens, same text), ratio = val_bpb / unigram_bpb (below 1 means the model beats the baseline), docs, bytes.
Defaults come from the run's config.yaml (data.val_shards, data.shards, max phase seq_len). The metric code lives
in mm/eval_text.py; this script only wires a run directory to it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.shards import SkipCounter, expand_shards, iter_text_docs
from data.token_stream import TokenSource, tokenize_docs
from mm.cli import USER_ERRORS
from mm.eval_text import bits_per_byte, unigram_bits_per_byte
from mm.runs import load_lm, model_dir

DEFAULT_SEQ_LEN = 512
DOCS_PER_CHUNK = 16  # held-out docs scored per bits_per_byte call (one progress-bar tick)


def run_dir_of(ckpt: str | Path) -> Path:
    """The run directory of a checkpoint: the folder holding config.yaml (run dir, final/, or checkpoints/step_*)."""
    p = Path(ckpt)
    try:
        d = model_dir(p)
    except Exception:
        d = p
    for cand in (p, d, d.parent, d.parent.parent):
        if (cand / "config.yaml").exists():
            return cand
    return p


def run_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml as a plain dict ({} if there is none)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}


def train_tokens(run_dir: Path, spec: str | None, tok, explicit: bool) -> tuple[np.ndarray, str]:
    """Training-split token ids: the run's cached arrays (tokens/train-*.npz), else the train shards tokenized now."""
    cached = sorted((run_dir / "tokens").glob("train-*.npz"))
    if cached and not explicit:
        return np.concatenate([TokenSource.load(p).tokens for p in cached]), "cache"
    if not spec:
        raise ValueError(f"{run_dir}: no cached training tokens and no training shards (pass --train-shards)")
    texts = [d["text"] for d in iter_text_docs(expand_shards(spec))]
    if not texts:
        raise ValueError(f"{spec}: no readable training documents")
    return tokenize_docs(texts, tok).tokens, "shards"


def evaluate(args) -> dict:
    model, tok, _ = load_lm(args.ckpt)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model = model.to(device)
    run_dir = run_dir_of(args.ckpt)
    cfg = run_config(run_dir)
    data = cfg.get("data") or {}
    val_spec = args.shards or data.get("val_shards")
    if not val_spec:
        raise ValueError(f"{run_dir}: no config.yaml with data.val_shards; pass --shards")
    phases = cfg.get("phases") or []
    seq_len = args.seq_len or (max(p["seq_len"] for p in phases) if phases
                               else min(DEFAULT_SEQ_LEN, model.cfg.max_seq_len))

    skips = SkipCounter()
    texts = [d["text"] for d in iter_text_docs(expand_shards(val_spec), skips)]
    if not texts:
        raise ValueError(f"{val_spec}: no readable text documents (skipped: {skips.as_dict()})")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    bits = 0.0  # bits_per_byte per chunk, weighted back to bits, so the total is over all held-out docs
    chunks = [texts[i:i + DOCS_PER_CHUNK] for i in range(0, len(texts), DOCS_PER_CHUNK)]
    for chunk in tqdm(chunks, desc="val_bpb", unit="chunk", file=sys.stderr, disable=not args.progress):
        chunk_bytes = sum(len(t.encode("utf-8")) for t in chunk)
        if chunk_bytes:
            bits += bits_per_byte(model, tok, chunk, seq_len, batch_size=args.batch_size, device=device) * chunk_bytes
    val_bpb = bits / n_bytes

    train, source = train_tokens(run_dir, args.train_shards or data.get("shards"), tok, bool(args.train_shards))
    unigram_bpb = unigram_bits_per_byte(train, tok.vocab_size, tok, texts)
    return {"val_bpb": val_bpb, "unigram_bpb": unigram_bpb, "ratio": val_bpb / unigram_bpb, "docs": len(texts),
            "bytes": n_bytes, "seq_len": seq_len, "train_tokens": int(len(train)), "train_tokens_from": source,
            "ckpt": str(args.ckpt), "val_shards": str(val_spec), "skipped": skips.as_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run directory (or a model folder inside one)")
    p.add_argument("--shards", help="held-out shard spec (default: the run's data.val_shards)")
    p.add_argument("--train-shards", help="training shard spec for the unigram baseline "
                                          "(default: the run's cached tokens, else its data.shards)")
    p.add_argument("--seq-len", type=int, help="eval window (default: the run's longest phase seq_len, else 512)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        result = evaluate(args)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": msg}), flush=True)
        return 2
    print(json.dumps({"ok": True, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
