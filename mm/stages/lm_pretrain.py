"""Stage lm_pretrain (PAPER.md §1.4 at our scale): data mix, context-length ramp, annealing to LR 0 on the
highest-quality subset, and Polyak averaging of the annealing checkpoints into the final model."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from data.fetch import default_cache_dir, fetch_text
from data.shards import SkipCounter, expand_shards, iter_text_docs
from data.text_kit import build_text_kit
from data.atomic import atomic_write, atomic_write_text
from data.token_stream import IGNORE, PackedSampler, TokenSource, tokenize_docs
from llm.model import Llama, flops_per_token
from llm.tokenizer import Tokenizer, train_tokenizer
from mm.config import LMPretrainConfig, TokenizerConfig
from mm.train.distributed import DistInfo, barrier, full_state, init_distributed, rank_slice, unwrap, wrap_model
from mm.eval.text import bits_per_byte, unigram_bits_per_byte
from mm.model.runs import save_lm
from mm.train.trainer import StepOutput, Trainer, linear_to_zero, warmup_cosine


def default_shard_dir() -> Path:
    return default_cache_dir().parent / "shards"


def resolve_shards(spec: str, build_if_missing: bool) -> list[Path]:
    """Expand a shard spec; if nothing matches and building is allowed, fetch + build the text kit first."""
    try:
        return expand_shards(spec)
    except FileNotFoundError:
        if not build_if_missing:
            raise
    print(f"[lm_pretrain] no shards at {spec!r}: fetching and building the text kit into {default_shard_dir()}",
          file=sys.stderr)
    fetch_text(default_cache_dir())
    build_text_kit(default_cache_dir(), default_shard_dir())
    return expand_shards(spec)


def lm_loss(model, mb: dict) -> StepOutput:
    """Next-token cross-entropy under the document mask (fused with the output projection); ignored labels do not
    count."""
    loss = model(mb["tokens"], doc_ids=mb["doc_ids"], labels=mb["labels"], ignore_index=IGNORE)
    return StepOutput(loss, int((mb["labels"] != IGNORE).sum()))


class Schedule:
    """Maps a step to (phase, seq_len, batch_size, lr) across the ramp phases and the annealing phase."""

    def __init__(self, cfg: LMPretrainConfig):
        if not cfg.phases:
            raise ValueError("lm_pretrain needs at least one entry in `phases`")
        self.cfg = cfg
        self.bounds = np.cumsum([p.steps for p in cfg.phases])
        self.main_steps = int(self.bounds[-1])
        self.total = self.main_steps + cfg.anneal.steps

    def phase(self, step: int):
        i = int(np.searchsorted(self.bounds, step, side="right"))
        return self.cfg.phases[min(i, len(self.cfg.phases) - 1)]

    def seq_len(self, step: int) -> int:
        return self.phase(step).seq_len

    def batch_size(self, step: int) -> int:
        return self.phase(step).batch_size or self.cfg.train.batch_size

    def annealing(self, step: int) -> bool:
        return step >= self.main_steps

    def lr(self, step: int) -> float:
        t = self.cfg.train
        if not self.annealing(step):
            return warmup_cosine(step, t.lr, t.warmup_steps, self.main_steps, t.min_lr_ratio)
        return linear_to_zero(step, t.lr * t.min_lr_ratio, self.main_steps, self.cfg.anneal.steps)


def get_tokenizer(tcfg: TokenizerConfig, run_dir: Path, texts: Iterable[str], info: DistInfo) -> Tokenizer:
    """The configured tokenizer.json, the run's own, or a BPE trained now on up to train_bytes of `texts`
    (rank 0 trains, the others wait); every stage that may train its own tokenizer uses this."""
    own = run_dir / "tokenizer.json"
    if tcfg.path:
        tok = Tokenizer.load(tcfg.path)
        if info.is_main:
            atomic_write(own, tok.save)
        return tok
    if not own.exists() and info.is_main:
        budget, sample = tcfg.train_bytes, []
        for t in texts:
            sample.append(t)
            budget -= len(t)
            if budget <= 0:
                break
        atomic_write(own, lambda tmp: train_tokenizer(sample, tcfg.vocab_size, tmp))
    barrier(info)
    return Tokenizer.load(own)


def token_sources(docs: list[dict], tok: Tokenizer, cache: Path, tag: str, info: DistInfo) -> dict[str, TokenSource]:
    """Per-source token arrays, cached as .npz in the run directory (no pickle). Rank 0 writes each missing cache
    atomically; every rank reads them only after a barrier (a reader never sees a half-written file)."""
    paths = {src: cache / f"{tag}-{src}.npz" for src in sorted({d["source"] for d in docs})}
    out = {}
    if info.is_main:
        for src, path in paths.items():
            if not path.exists():
                out[src] = tokenize_docs([d["text"] for d in docs if d["source"] == src], tok)
                atomic_write(path, out[src].save)
    barrier(info)
    return {src: out[src] if src in out else TokenSource.load(path) for src, path in paths.items()}


def high_quality(docs: list[dict], top_frac: float) -> list[dict]:
    """The top `top_frac` of documents by quality score (the annealing subset)."""
    q = np.array([d.get("quality", 0.0) for d in docs])
    thr = np.quantile(q, 1.0 - top_frac) if 0 < top_frac < 1 else -np.inf
    return [d for d, s in zip(docs, q) if s >= thr]


class PolyakAverage:
    """Running mean of full model weights over the annealing checkpoints; lives in trainer.extras for resume."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def update(self) -> None:
        msd, _ = full_state(self.trainer.model)
        n = int(self.trainer.meta.get("avg_count", 0)) + 1
        avg = self.trainer.extras.get("avg") or {}
        # clone on the first update: on one process full_state returns the live parameters, which train on
        self.trainer.extras["avg"] = {k: (v.detach().float().clone() if n == 1 else avg[k] + (v.float() - avg[k]) / n)
                                      for k, v in msd.items()}
        self.trainer.meta["avg_count"] = n


def run(cfg: LMPretrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train the LM from YAML; writes run_dir/{tokenizer.json, checkpoints/, final/, metrics.jsonl}.

    Returns the result dict; when train.stop_after ended the run early it holds "stopped_at" and no final model is written.
    """
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    skips = SkipCounter()
    train_docs = list(iter_text_docs(resolve_shards(cfg.data.shards, cfg.data.build_if_missing), skips))
    val_docs = list(iter_text_docs(resolve_shards(cfg.data.val_shards, cfg.data.build_if_missing), skips))
    if not train_docs or not val_docs:
        raise ValueError(f"no readable documents in {cfg.data.shards!r} / {cfg.data.val_shards!r}; skipped: {skips.as_dict()}")
    tok = get_tokenizer(cfg.tokenizer, run_dir, (d["text"] for d in train_docs), info)
    sources = token_sources(train_docs, tok, run_dir / "tokens", "train", info)
    sampler = PackedSampler(sources, cfg.data.mix, cfg.seed, cfg.data.repeat_frac)
    hq_docs = high_quality(train_docs, cfg.anneal.quality_top_frac)
    anneal_sampler = PackedSampler(token_sources(hq_docs, tok, run_dir / "tokens", "hq", info),
                                   cfg.anneal.mix, cfg.seed + 1, cfg.data.repeat_frac) if cfg.anneal.steps else None

    mcfg = cfg.model.resolve(vocab_size=tok.vocab_size)
    sched = Schedule(cfg)
    if max(p.seq_len for p in cfg.phases) > mcfg.max_seq_len:
        raise ValueError(f"a phase's seq_len exceeds model max_seq_len={mcfg.max_seq_len}")
    if info.is_main:
        atomic_write_text(run_dir / "model_config.json", json.dumps(mcfg.to_dict(), indent=1))
    model = Llama(mcfg)
    model.reset_parameters(seed=cfg.seed)
    model = wrap_model(model.to(info.device), cfg.train.parallel, info)

    def batches(step: int) -> list[dict]:
        src = anneal_sampler if sched.annealing(step) else sampler
        bs, T = sched.batch_size(step), sched.seq_len(step)
        rows = rank_slice(bs, info)
        return [{k: v[rows].to(info.device) for k, v in src.batch(step, i, bs, T).items()}
                for i in range(cfg.train.grad_accum)]

    val_texts = [d["text"] for d in val_docs]
    eval_chars = cfg.data.val_max_tokens * 4
    short_val = []
    for t in val_texts:  # a capped subset for in-training evals; the benchmark uses all of it
        short_val.append(t)
        eval_chars -= len(t)
        if eval_chars <= 0:
            break

    def evaluate(step: int) -> dict:
        bpb = bits_per_byte(unwrap(model), tok, short_val, sched.seq_len(max(0, step - 1)), device=info.device)
        return {"val_bpb": bpb}

    trainer = Trainer(model, cfg.train, run_dir, loss_fn=lm_loss, lr_at=sched.lr, info=info,
                      flops_per_token=lambda T: flops_per_token(mcfg, T), desc="lm_pretrain")
    polyak = PolyakAverage(trainer)
    if cfg.anneal.steps:
        trainer.extras["avg"] = {}
    if resume:
        trainer.resume()

    def on_step(step: int, out: dict) -> None:
        if sched.annealing(step - 1) and ((step - sched.main_steps) % cfg.anneal.average_every == 0 or step == sched.total):
            polyak.update()

    records = trainer.fit(batches, sched.total, on_step=on_step, evaluate=evaluate, seq_len_at=sched.seq_len)
    if trainer.stopped_at is not None:  # train.stop_after: a checkpoint, no final model; continue with --resume
        return {"stage": "lm_pretrain", "steps": sched.total, "stopped_at": trainer.stopped_at,
                "checkpoint": trainer.last_checkpoint(), "skipped": skips.as_dict()}
    last_state, _ = full_state(model)
    final_state = trainer.extras["avg"] if cfg.anneal.steps and trainer.extras.get("avg") else last_state
    result = {"stage": "lm_pretrain", "steps": sched.total, "params": sum(p.numel() for p in unwrap(model).parameters()),
              "skipped": skips.as_dict()}
    if info.is_main:
        T = max(p.seq_len for p in cfg.phases)
        eval_model = Llama(mcfg)
        eval_model.load_state_dict({k: v.to(eval_model.output.weight.dtype) for k, v in final_state.items()})
        result["val_bpb"] = bits_per_byte(eval_model, tok, short_val, T)
        if cfg.anneal.steps:
            eval_model.load_state_dict(last_state)
            result["val_bpb_last"] = bits_per_byte(eval_model, tok, short_val, T)
            result["averaged_checkpoints"] = int(trainer.meta.get("avg_count", 0))
        train_tokens = np.concatenate([s.tokens for s in sources.values()])
        result["unigram_bpb"] = unigram_bits_per_byte(train_tokens, tok.vocab_size, tok, short_val)
        tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        result["tokens_per_s"] = float(np.median(tps)) if tps else None
        result["final_loss"] = next((r["loss"] for r in reversed(records) if "loss" in r), None)
        save_lm(run_dir / "final", final_state, mcfg, tok, {"stage": "lm_pretrain", "step": sched.total})
    return result
