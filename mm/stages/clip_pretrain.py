"""Stage clip_pretrain (PAPER.md §3; DESIGN.md stage table): contrastive pretraining of the image encoder's ViT with a
small text tower on image-text shards (the encoder fresh, or from a vision run with `vision_from`, e.g. one written by
`mm import open_clip`). Trains vision.vit + visual_proj + text tower + logit scale; the encoder's tile
embeddings and gated layers (used only from image_pretrain on, gates at 0) stay frozen and are saved at their init.

Data: batch b of the `Loader` is a pure function of (seed, rank, world, b); step s uses batches s*grad_accum + i, so a
resumed run reads exactly the batches the uninterrupted one would. Final: final/{model.safetensors, meta.json (kind
clip, vision_config, clip_config), tokenizer.json}; load with mm.model.runs.load_clip / mm.model.store.load_vision. In metrics.jsonl
a "token" is an image-text pair (tokens_per_s = pairs/s; MFU from encoders.clip.flops_per_pair).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from data.loader import Loader, StepFeed, load_image_samples
from data.shards import expand_shards, iter_samples
from encoders.clip import ClipLoss, ClipModel, flops_per_pair, tokenize_captions, zero_shot_suite
from encoders.vision import normalize_pixels
from llm.tokenizer import Tokenizer
from mm.model.checkpoint import save_weights
from mm.config import ClipPretrainConfig, ConfigError
from mm.train.distributed import full_state, init_distributed, unwrap, wrap_model
from mm.model.store import load_vision
from mm.stages.lm_pretrain import get_tokenizer
from mm.train.trainer import StepOutput, Trainer, fit_stage, warmup_cosine

# what clip_pretrain trains (DESIGN.md invariant 4); everything else in ClipModel is frozen
TRAINABLE_PREFIXES = ("vision.vit.", "visual_proj.", "text.", "logit_scale")


def image_shards(spec: str) -> list[Path]:
    """Expand an image shard spec, with a one-line hint on how to build the kit when nothing matches."""
    try:
        return expand_shards(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image shards at {spec!r}: build them with `mm data fetch --only image` and "
                                f"`mm data build`, or point data.shards/data.val_shards at your own") from None


def caption_texts(paths: list[Path]):
    """Captions of the shards, lazily (for training a tokenizer when no LM tokenizer is given)."""
    for s in iter_samples(paths):
        if "txt" in s:
            yield s["txt"].decode("utf-8", errors="replace")


def freeze_for_clip(model: ClipModel) -> dict[str, int]:
    """requires_grad only on TRAINABLE_PREFIXES; returns {"trainable": n, "frozen": n} parameter counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE_PREFIXES))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def build_clip(cfg: ClipPretrainConfig, tok: Tokenizer) -> tuple[ClipModel, dict]:
    """The initial ClipModel and its ClipModel kwargs: the encoder from cfg.vision's shape, or shape and weights from
    the vision run cfg.vision_from (then cfg.vision's fields must be unset); the rest freshly initialised."""
    v = cfg.vision
    clip_kw = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eot_id, embed_dim=cfg.embed_dim,
                   pool=cfg.pool, init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale)
    start = None
    if cfg.vision_from:
        set_ = v.overridden()
        if set_:
            raise ConfigError(f"vision_from={cfg.vision_from}: the encoder shape comes from that run; unset "
                              f"vision.{set_[0]} (vision.{set_[0]}=null)")
        start = load_vision(cfg.vision_from)
        vcfg = start.cfg
    else:
        vcfg = v.resolve()
    model = ClipModel(vcfg, cfg.text, **clip_kw)
    if start is not None:
        model.vision.load_state_dict(start.state_dict(), strict=True)
    return model, clip_kw


class BatchFeed(StepFeed):
    """CLIP micro-batches: {pixels (B, 3, t, t) normalised, ids (B, L) caption tokens, n pairs}."""

    def __init__(self, loader: Loader, tok: Tokenizer, context_length: int, accum: int, device: torch.device):
        super().__init__(loader, accum)
        self.tok, self.ctx, self.device = tok, context_length, device

    def make(self, index: int, batch: dict) -> dict:
        return {"pixels": normalize_pixels(batch["image"]).to(self.device),  # (B, 3, t, t)
                "ids": tokenize_captions(self.tok, batch["caption"], self.ctx).to(self.device),  # (B, L)
                "n": int(batch["size"])}


def run(cfg: ClipPretrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train the CLIP towers from YAML; writes run_dir/{tokenizer.json, checkpoints/, final/, metrics.jsonl}.

    Returns the result dict (zero-shot accuracy and recall@k vs chance on the val shards, time, throughput); when
    train.stop_after ended the run early it holds "stopped_at" and no final model is written."""
    t0 = time.perf_counter()
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    train_paths, _ = image_shards(cfg.data.shards), image_shards(cfg.data.val_shards)
    tok = get_tokenizer(cfg.tokenizer, run_dir, caption_texts(train_paths), info)

    model, clip_kw = build_clip(cfg, tok)
    vcfg, tcfg = model.vision.cfg, model.text_cfg
    counts = freeze_for_clip(model)
    model = wrap_model(model.to(info.device), cfg.train.parallel, info)

    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "image", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world, image_size=vcfg.image_size)
    feed = BatchFeed(loader, tok, tcfg.context_length, t.grad_accum, info.device)
    val, val_skips = load_image_samples(cfg.data.val_shards, vcfg.image_size)
    val_eval = val if not cfg.data.eval_samples else random.Random(cfg.seed).sample(val, min(len(val),
                                                                                          cfg.data.eval_samples))
    closs = ClipLoss(local_loss=info.enabled, gather_with_grad=info.enabled, rank=info.rank, world_size=info.world)

    def loss_fn(m, mb: dict) -> StepOutput:
        """The symmetric contrastive loss of one micro-batch (a mean over its pairs)."""
        img, txt, scale = m(mb["pixels"], mb["ids"])
        return StepOutput(closs(img, txt, scale), mb["n"], {"logit_scale": scale.detach()})

    def evaluate(step: int) -> dict:
        return zero_shot_suite(unwrap(model), tok, val_eval)

    trainer = Trainer(model, t, run_dir, loss_fn=loss_fn,
                      lr_at=lambda s: warmup_cosine(s, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio), info=info,
                      flops_per_token=lambda _: flops_per_pair(vcfg, tcfg), desc="clip_pretrain")
    trainer.meta = {"kind": "clip", "vision_config": vcfg.to_dict(), "clip_config": {"text": tcfg.to_dict(), **clip_kw},
                    "vision_from": cfg.vision_from, "loader": loader.state_dict()}
    if resume and trainer.resume():
        loader.load_state_dict(trainer.meta["loader"])  # checks the stream is the same (shards, seed, batch, world)

    def on_step(step: int, out: dict) -> None:
        trainer.meta["loader"] = loader.state_dict()

    def base() -> dict:
        return {"stage": "clip_pretrain", "steps": cfg.steps, "skipped": loader.skipped}

    records, train_s, stopped = fit_stage(trainer, feed, cfg.steps, base, on_step=on_step, evaluate=evaluate)
    if stopped:
        return stopped
    state, _ = full_state(model)
    result = {**base(), "params": sum(counts.values()), **{f"params_{k}": n for k, n in counts.items()},
              "val_samples": len(val), "val_skipped": val_skips}
    if info.is_main:
        result.update(zero_shot_suite(unwrap(model), tok, val))
        pps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        result["pairs_per_s"] = float(np.median(pps)) if pps else None
        result["final_loss"] = next((r["loss"] for r in reversed(records) if "loss" in r), None)
        result["logit_scale"] = float(unwrap(model).scale().detach())
        result["train_s"] = train_s
        result["total_s"] = round(time.perf_counter() - t0, 1)
        meta = {k: v for k, v in trainer.meta.items() if k != "loader"}
        out = save_weights(run_dir / "final", {"model": state}, {**meta, "stage": "clip_pretrain", "step": cfg.steps})
        tok.save(out / "tokenizer.json")
    return result
