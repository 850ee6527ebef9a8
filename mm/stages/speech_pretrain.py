"""Stage speech_pretrain (PAPER.md §9.4): BEST-RQ pretraining of the Conformer speech encoder on audio shards.

Each loader batch becomes normalised log-mel features (utterances over data.max_frames randomly cropped, no
SpecAugment: BEST-RQ masks the input itself); the span mask and noise of batch b come from a generator seeded by
(seed, b), the crop from (seed, b), so a step is a pure function of the step and resume is exact. Logged per step:
loss, masked-frame accuracy, mask share, and the targets' code usage and perplexity (collapse check).
Final: final/{model.safetensors ("encoder.*", "head.*", "quantizer.*"), meta.json (kind speech_encoder,
encoder_config, best_rq)}; mm.model.store.load_speech_encoder reads the encoder back.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.loader import Loader, StepFeed
from encoders.best_rq import BestRQ
from encoders.speech import ConformerEncoder
from mm.model.checkpoint import save_weights
from mm.config import SpeechPretrainConfig
from mm.train.distributed import DistInfo, init_distributed, unwrap, wrap_model
from mm.model.media import Featurizer
from mm.train.trainer import StepOutput, Trainer, warmup_cosine

LOGGED = ("acc", "mask_frac", "code_usage", "code_perplexity")


class PretrainFeed(StepFeed):
    """Micro-batch for loader batch b: {feats (B, F, 80), lens (B,), b}."""

    def __init__(self, loader: Loader, cfg: SpeechPretrainConfig, device: torch.device):
        super().__init__(loader, cfg.train.grad_accum)
        self.cfg, self.device, self.featurize = cfg, device, Featurizer()

    def make(self, b: int, batch: dict) -> dict:
        feats, lens = self.featurize(batch["audio"], self.cfg.data.max_frames, np.random.default_rng([self.cfg.seed, b]))
        return {"feats": feats.to(self.device), "lens": lens.to(self.device), "b": b}


def make_loss(seed: int):
    """loss_fn(model, mb) for the Trainer: BEST-RQ loss with the batch's own masking generator."""

    def loss_fn(m, mb: dict) -> StepOutput:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + mb["b"])
        loss, stats = m(mb["feats"], mb["lens"], gen)
        return StepOutput(loss, stats["masked_frames"], {k: stats[k] for k in LOGGED})

    return loss_fn


def train_on_audio(cfg, net, info: DistInfo, run_dir: Path, loss_fn, resume: bool, make_feed):
    """The shared loop of the speech stages: an audio Loader split over ranks, the feed make_feed(loader), the Trainer
    (warmup + cosine), exact resume of weights, optimizer and loader; returns (records, loader, feed, trainer,
    train seconds)."""
    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "audio", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world)
    feed = make_feed(loader)
    trainer = Trainer(net, t, run_dir, loss_fn=loss_fn, info=info, desc=cfg.stage,
                      lr_at=lambda s: warmup_cosine(s, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio))
    trainer.meta = {"loader": loader.state_dict()}
    if resume and trainer.resume():
        loader.load_state_dict(trainer.meta["loader"])
    t_fit = time.perf_counter()
    try:
        records = trainer.fit(feed, cfg.steps, on_step=lambda s, out: trainer.meta.update(loader=loader.state_dict()))
    finally:
        feed.close()
    return records, loader, feed, trainer, round(time.perf_counter() - t_fit, 1)


def run(cfg: SpeechPretrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train the encoder with BEST-RQ; writes checkpoints/, final/, and returns the result figures."""
    t0 = time.perf_counter()
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    enc_cfg = cfg.encoder.resolve()
    model = BestRQ(ConformerEncoder(enc_cfg), cfg.best_rq, seed=cfg.seed)
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    records, loader, feed, trainer, train_s = train_on_audio(cfg, net, info, run_dir, make_loss(cfg.seed), resume,
                                                             lambda ld: PretrainFeed(ld, cfg, info.device))
    base = {"stage": cfg.stage, "steps": cfg.steps, "skipped": loader.skipped}
    if trainer.stopped_at is not None:
        return {**base, "stopped_at": trainer.stopped_at, "checkpoint": trainer.last_checkpoint()}
    logs = [r for r in records if "loss" in r]
    result = {**base, "params_encoder": sum(p.numel() for p in model.encoder.parameters()),
              "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "train_s": train_s,
              "first_loss": logs[0]["loss"] if logs else None, "final_loss": logs[-1]["loss"] if logs else None}
    for k in LOGGED:
        result[f"final_{k}"] = logs[-1][k] if logs else None
    if info.is_main:
        meta = {"stage": cfg.stage, "step": cfg.steps, "kind": "speech_encoder", "encoder_config": enc_cfg.to_dict(),
                "best_rq": asdict(cfg.best_rq)}
        save_weights(run_dir / "final", {"model": unwrap(net).state_dict()}, meta)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
