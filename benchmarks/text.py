"""Text benchmark: held-out bits per byte of a trained LM against a unigram baseline fitted on the training split,
and, for post-trained models, exact match per task family, RM preference accuracy, implicit-reward accuracy and an
RM-judged win rate against another checkpoint.

    python benchmarks/text.py --ckpt runs/pretrain_tiny [--shards VAL_SPEC] [--train-shards SPEC] [--seq-len N]
    python benchmarks/text.py --ckpt RUN/r1/dpo --rm RUN/r1/rm --vs RUN/r1/sft [--chat]

Prints ONE JSON line: val_bpb (the model over ALL held-out documents), unigram_bpb (add-one unigram over the
pretraining run's training tokens, same text), vs_unigram_ci95 (the paired bootstrap 95% interval of val_bpb -
unigram_bpb over documents), ratio = val_bpb / unigram_bpb, docs, bytes; with a chat model (or
--chat): "exact_match" {family: acc, overall} and "exact_match_items" (each item's 0/1, for paired comparisons); with
--rm: "rm_pref_acc"; for a model initialised from another: "chosen_frac" and its bootstrap 95% interval
("chosen_frac_ci95") and each pair's win ("chosen_items"); with --rm and --vs: "rm_win_rate_vs", its bootstrap 95%
interval over prompts ("rm_win_rate_ci95"; the other policy is beaten when it excludes 0.5) and each prompt's win
("rm_win_items"); with --copy: "copy" (mm.eval.text.copy_score: held-out spans read twice, the second reading's
loss against the first's with a paired interval: an LM that copies, as the speech path needs, drops it far). Text
defaults come from the pretraining run's config.yaml (found by following init_from). The
metric code lives in mm/eval/text.py and mm/eval/chat.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse

import numpy as np
import torch
from tqdm import tqdm

from data.shards import SkipCounter, expand_shards, iter_text_docs
from data.token_stream import TokenSource, tokenize_docs
from mm.cli import run_reporting
from mm.eval.stats import paired_bootstrap
from mm.eval.text import UnigramLM, copy_score, lm_doc_bits
from mm.model.runs import load_lm, model_dir

DEFAULT_SEQ_LEN = 512
DOCS_PER_CHUNK = 16  # held-out docs scored per lm_doc_bits call (one progress-bar tick)


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


def pretrain_run_of(run_dir: Path) -> Path:
    """Follow init_from / policy links from a post-training run back to the pretraining run."""
    seen = set()
    while run_dir not in seen:
        seen.add(run_dir)
        cfg = run_config(run_dir)
        nxt = cfg.get("init_from") or cfg.get("policy")
        if cfg.get("stage") == "lm_pretrain" or not nxt:
            return run_dir
        run_dir = run_dir_of(nxt)
    return run_dir


def posttrain_metrics(args, model, tok, meta: dict, run_dir: Path) -> dict:
    """exact_match per family, rm_pref_acc, chosen_frac and rm_win_rate_vs, as far as the arguments allow."""
    from data.chat_kit import iter_chat
    from data.chat_stream import encode_pairs
    from llm.tokenizer import ChatFormat
    from mm.eval.chat import (exact_match_by_family, exact_match_items, implicit_reward_wins, preference_accuracy,
                              rm_wins)
    from mm.eval.stats import bootstrap_ci
    from mm.model.runs import load_reward_model

    out: dict = {}
    chat_val = [ex for ex in iter_chat(expand_shards(args.chat_shards)) if ex.get("answer")]
    chat_val = chat_val[:args.max_items]
    if meta.get("chat") or args.chat:
        out["exact_match_items"] = exact_match_items(model, tok, chat_val)  # item order: paired comparisons
        out["exact_match"] = exact_match_by_family(model, tok, chat_val, items=out["exact_match_items"])
    pairs, _ = encode_pairs(list(iter_chat(expand_shards(args.pref_shards)))[:args.max_items], ChatFormat(tok), 512)
    init = args.reference or meta.get("init_from")
    if init and meta.get("kind") != "reward_model":
        ref, _, _ = load_lm(init)
        wins = implicit_reward_wins(model, ref, tok, pairs).astype(float)
        out["chosen_frac"] = float(wins.mean()) if len(wins) else 0.0
        if len(wins):
            out["chosen_frac_ci95"] = bootstrap_ci(wins)
        out["chosen_items"] = wins.tolist()  # pair order: paired comparisons of two policies on one reference
        out["reference"] = str(init)
    if args.rm:
        rm, _, _ = load_reward_model(args.rm)
        out["rm_pref_acc"] = preference_accuracy(rm, tok, pairs)
        if args.vs:
            other, _, _ = load_lm(args.vs)
            wins = rm_wins(rm, tok, model, other, chat_val[:args.win_items], seed=args.seed)
            out["rm_win_rate_vs"] = float(wins.mean()) if len(wins) else 0.0
            if len(wins):
                out["rm_win_rate_ci95"] = bootstrap_ci(wins)  # beats the other policy when it excludes 0.5
            out["rm_win_items"] = wins.tolist()
            out["vs"] = str(args.vs)
    return out


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
    model, tok, meta = load_lm(args.ckpt)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model = model.to(device)
    own_run = run_dir_of(args.ckpt)
    run_dir = pretrain_run_of(own_run)
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
    docs = [tok.encode(t, bos=True, eos=True) for t in texts]
    doc_bytes = [len(t.encode("utf-8")) for t in texts]
    bits: list[float] = []  # per held-out document
    chunks = [docs[i:i + DOCS_PER_CHUNK] for i in range(0, len(docs), DOCS_PER_CHUNK)]
    for chunk in tqdm(chunks, desc="val_bpb", unit="chunk", file=sys.stderr, disable=not args.progress):
        bits += lm_doc_bits(model, chunk, seq_len, tok.pad_id, batch_size=args.batch_size, device=device)

    train, source = train_tokens(run_dir, args.train_shards or data.get("shards"), tok, bool(args.train_shards))
    uni = UnigramLM(train, tok.vocab_size).doc_bits(docs)
    vs = paired_bootstrap(bits, uni, doc_bytes, 1000, 0)  # bits per byte of each (a, b), resampling documents
    val_bpb, unigram_bpb = vs["a"], vs["b"]
    return {"val_bpb": val_bpb, "unigram_bpb": unigram_bpb, "vs_unigram_ci95": vs["ci95"],
            "ratio": val_bpb / unigram_bpb, "docs": len(texts),
            "bytes": sum(doc_bytes), "seq_len": seq_len, "train_tokens": int(len(train)), "train_tokens_from": source,
            "ckpt": str(args.ckpt), "val_shards": str(val_spec), "skipped": skips.as_dict(),
            **({"copy": copy_score(model, [d[1:-1] for d in docs], device=device)} if args.copy else {}),
            **(posttrain_metrics(args, model, tok, meta, own_run) if wants_posttrain(args, meta) else {})}


def wants_posttrain(args, meta: dict) -> bool:
    """Post-training metrics apply to chat-tuned or derived models, or when asked for."""
    return bool(meta.get("chat") or meta.get("init_from") or args.chat or args.rm)


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
    p.add_argument("--chat", action="store_true", help="score exact match even if the model is not chat-tuned")
    p.add_argument("--chat-shards", default=".cache/shards/chat/val-*.tar", help="held-out chat items (exact match)")
    p.add_argument("--pref-shards", default=".cache/shards/pref/val-*.tar", help="held-out preference pairs")
    p.add_argument("--reference", help="reference LM run for chosen_frac (default: the run's init_from); give the "
                   "pretrained run to compare SFT and DPO policies against one reference")
    p.add_argument("--rm", help="reward model run: rm_pref_acc, and the judge for --vs")
    p.add_argument("--vs", help="another policy: rm_win_rate_vs of this one against it")
    p.add_argument("--max-items", type=int, default=600, help="cap on held-out chat items / pairs")
    p.add_argument("--win-items", type=int, default=200, help="held-out prompts for the win rate (at most the chat "
                   "items with an answer that --max-items lets through)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy", action="store_true", help="the in-context copy score: held-out spans read twice")
    args = p.parse_args(argv)
    return run_reporting(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
