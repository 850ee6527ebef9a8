"""Stages video_pretrain / video_sft (PAPER.md §5, §6.1, §7.2; DESIGN.md invariants 1, 4, 6): the image model of an
image run, frozen, plus a video stream (mm.model.streams.VideoStream: a video design aggregating frames, video
cross-attention before every `video_every`-th image block, the `<|video|>` row). Only the video stream trains.

Each clip: num_frames frames sampled uniformly over the whole clip (data.decode.decode_video via the Loader), each
frame tiled and encoded by the frozen image encoder under no_grad, merged `factor` frames at a time by the
aggregator. Each sample is one Llama 3 dialog: user = `<|video|>` + a question in the paper's evaluation formats
(multiple choice -> option letter with probability mc_prob when the qa has choices; else short answer), or
"Describe the video." -> caption with probability caption_prob; loss on the assistant tokens only. The draw for a
sample is a pure function of (seed, loader batch, row), so resume is exact. video_pretrain starts from an image run
(init_from); video_sft from a video_pretrain run, with the LM hot-swapped to `instruct_lm` and optionally the image
stream taken from an image_sft run (`image_from`). Final: a composed model folder (mm.model.store).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from adapters import registry
from data.dialog import collate_dialogs, dialog
from data.loader import Loader
from data.qa_format import gold_letter, mc_prompt, short_prompt
from data.token_stream import IGNORE
from encoders.vision import VisionConfig
from llm.tokenizer import Tokenizer
from mm.config import VideoStageConfig
from mm.model.checkpoint import CheckpointError, load_into
from mm.model.composed import ComposedLM, param_counts
from mm.model.runs import lm_dir
from mm.model.media import frames_to_pixels
from mm.model.store import hot_swap, load_model, read_run, save_model
from mm.model.streams import Frames, VideoStream
from mm.stages.image_pretrain import ImageFeed
from mm.train.distributed import init_distributed, unwrap, wrap_model
from mm.train.read_bow import bow_loss, caption_bow, with_read_bow
from mm.train.trainer import StepOutput, Trainer, fit_adapter_stage, warmup_cosine

BOW_SOURCES = ("aggregate", "read")  # what the optional bag-of-words head reads (VideoStageConfig.bow_source)
DESCRIBE = "Describe the video."


def pick_video_question(meta: dict, caption: str, rng: random.Random, caption_prob: float,
                        mc_prob: float) -> tuple[str, str]:
    """(prompt, target) for one training clip: a caption request, or a random qa item in MC / short format."""
    qas = [q for q in (meta or {}).get("qa") or [] if q.get("answers")]
    if not qas or rng.random() < caption_prob:
        return DESCRIBE, caption
    qa = rng.choice(qas)
    letter = gold_letter(qa)
    if letter is not None and rng.random() < mc_prob:
        return mc_prompt(qa["question"], qa["choices"]), letter
    return short_prompt(qa["question"]), str(qa["answers"][0])


# ---- the model ----------------------------------------------------------------------------------------------------

class VideoModel(nn.Module):
    """The composed model (`model`) and, with bow_vocab > 0, "bow_head": the auxiliary caption bag-of-words head (a
    training aid, never saved) on the pooled aggregated tokens (their mean, or the summary tokens' mean when the
    aggregator has them) or, bow_source "read", on the video cross-attention blocks' pre-gate outputs averaged over
    the text rows that see the clip."""

    def __init__(self, model: ComposedLM, bow_vocab: int = 0, bow_source: str = "aggregate"):
        super().__init__()
        if bow_source not in BOW_SOURCES:
            raise ValueError(f"bow_source must be one of {BOW_SOURCES}, got {bow_source!r}")
        self.model, self.bow_source = model, bow_source
        width = model.video.aggregator.width if bow_source == "aggregate" else model.cfg.dim
        self.bow_head = nn.Linear(width, bow_vocab) if bow_vocab else None

    def train_only_video(self) -> dict[str, int]:
        """The video stream and the bag-of-words head train, nothing else (DESIGN.md invariant 4); the counts."""
        self.model.train_only("video")  # the head, a training aid, keeps requires_grad
        return param_counts(self)

    def forward(self, tokens, pixels, aspect, labels=None, bow=None):
        """tokens (B, T) with one `<|video|>` each -> logits (B, T, V), or the mean loss with labels (B, T); with
        bow (B, V) caption token distributions also the bag-of-words cross-entropy: (loss, bow_loss)."""
        m = self.model
        video = m.video.features(m.image.encoder, Frames(pixels, aspect))  # (B, 1, F, N, D)
        if bow is None:
            return m(tokens, video=video, labels=labels)
        agg = m.video.aggregate(video)  # (B, 1, E*L, W)
        if self.bow_source == "read":
            return with_read_bow(self.bow_head, list(m.video.blocks.values()),
                                 lambda: m(tokens, video=m.video.kv(agg), labels=labels), bow)
        out = m(tokens, video=m.video.kv(agg), labels=labels)
        pooled = m.video.aggregator.pooled(agg, video.shape[2])[:, 0]  # (B, W)
        return out, bow_loss(self.bow_head, pooled, bow)


def aggregator_config(cfg: VideoStageConfig, vcfg: VisionConfig) -> dict:
    """The stage's video design spec with its aggregation factor and, for designs with a position table, max_tokens
    defaulting to the encoder's tokens per frame (all tiles)."""
    spec = dict(cfg.aggregator)
    fields = {f.name for f in dataclasses.fields(registry.design_class("video", spec.get("kind") or
                                                                       registry.DEFAULT["video"]).Config)}
    if "max_tokens" in fields:
        spec["max_tokens"] = spec.get("max_tokens") or vcfg.tokens_per_tile * vcfg.tile_slots
    return {**spec, "factor": cfg.factor}


def load_image_part(model: ComposedLM, ckpt: str | Path) -> None:
    """Replace the image stream's tensors (encoder, design, `<|image|>` row) by those of another image run (video_sft
    from the image_sft soup); shapes must match."""
    d, _, state = read_run(ckpt)
    want = {k for k in model.stream_state_dict() if k.startswith("image.")}
    missing = sorted(want - set(state))
    if missing:
        raise CheckpointError(f"{d}: no {missing[0]!r}: not an image run of this model's shape")
    load_into(model, {k: state[k] for k in want}, d / "model.safetensors", strict=False)


def build_model(cfg: VideoStageConfig) -> tuple[VideoModel, Tokenizer, Path, dict]:
    """(model, tokenizer, LM path, the init run's meta) for a video stage (see the module doc)."""
    d, meta, _ = read_run(cfg.init_from)
    if cfg.stage == "video_pretrain":
        if "video" in meta["streams"]:
            raise CheckpointError(f"{d}: video_pretrain starts from an image run, this is a video run")
        model, tok, _ = load_model(d)
        torch.manual_seed(cfg.seed)
        model.attach(VideoStream.build(model.lm, tok.special_id("<|video|>"), model.image,
                                       aggregator_config(cfg, model.image.encoder.cfg), cfg.video_every,
                                       cfg.num_frames, cfg.xattn_init_std, cfg.xattn_gate_init))
    else:
        if "video" not in meta["streams"]:
            raise CheckpointError(f"{d / 'meta.json'}: not a video-stage model (no video stream)")
        conf = meta["streams"]["video"]["adapter"]["config"]
        grow = bool(cfg.aggregator.get("out_positions")) and "out_positions" in conf and not conf["out_positions"]
        respec = {"factor": cfg.factor, **({"out_positions": True} if grow else {})}
        model, tok, _ = load_model(d, respec={"video": respec}, new=("video.aggregator.out_",) if grow else ())
        v, want = model.video, aggregator_config(cfg, model.image.encoder.cfg)
        if v.every != cfg.video_every or registry.parse("video", registry.spec_of(v.aggregator)) != \
                registry.parse("video", want):
            raise ValueError(f"{d}: its video adapter (every {v.every}, {v.aggregator.cfg}) differs from the config's "
                             f"(video_every {cfg.video_every}, {want})")
        v.num_frames = cfg.num_frames
    model.train()
    lm_path = Path(meta["lm"])
    vm = VideoModel(model, tok.vocab_size if cfg.bow_weight > 0 else 0, cfg.bow_source)
    if cfg.instruct_lm:  # video_sft: the instruction-tuned LM (invariant 6)
        hot_swap(model, tok, cfg.instruct_lm)
        lm_path = lm_dir(cfg.instruct_lm)
    if cfg.image_from:
        load_image_part(model, cfg.image_from)
    return vm, tok, lm_path, meta


# ---- the stage ----------------------------------------------------------------------------------------------------

class VideoFeed(ImageFeed):
    """Micro-batches for step s = loader batches [s*accum, (s+1)*accum) turned into video QA dialogs."""

    def make(self, b: int, batch: dict) -> dict:
        """One micro-batch: {tokens (B, T), labels (B, T), pixels (B, F, n, 3, t, t), aspect (B, F), n}."""
        dialogs = []
        for j, (meta, cap) in enumerate(zip(batch["meta"], batch["caption"])):
            rng = random.Random(f"{self.cfg.seed}:{b}:{j}")
            q, a = pick_video_question(meta, cap, rng, self.cfg.caption_prob, self.cfg.mc_prob)
            dialogs.append(dialog(self.fmt, q, a, media=self.media))
        mb = collate_dialogs(dialogs, self.pad_id, self.cfg.seq_len)
        mb["pixels"], mb["aspect"] = frames_to_pixels(batch["frames"], self.vcfg)
        if self.cfg.bow_weight > 0:
            mb["bow"] = caption_bow(self.fmt.tok, list(batch["caption"]))
        mb = {k: v.to(self.device) for k, v in mb.items()}
        mb["n"] = int((mb["labels"] != IGNORE).sum())
        return mb


def video_loss(m, mb: dict, bow_weight: float = 0.0) -> StepOutput:
    """Assistant-token loss of one micro-batch (+ bow_weight x the caption bag-of-words loss when on)."""
    if "bow" not in mb:
        return StepOutput(m(mb["tokens"], mb["pixels"], mb["aspect"], labels=mb["labels"]), mb["n"])
    lm_loss, bow = m(mb["tokens"], mb["pixels"], mb["aspect"], labels=mb["labels"], bow=mb["bow"])
    return StepOutput(lm_loss + bow_weight * bow, mb["n"], {"lm_loss": lm_loss.detach(), "bow": bow.detach()})


def run(cfg: VideoStageConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train the video adapter with everything else frozen; writes checkpoints/, final/, result (+ held-out video
    QA figures when eval_items > 0)."""
    t0 = time.perf_counter()
    if cfg.stage not in ("video_pretrain", "video_sft"):
        raise ValueError(f"stage {cfg.stage!r} is not a video stage")
    if cfg.num_frames % cfg.factor:
        raise ValueError(f"num_frames {cfg.num_frames} must be a multiple of factor {cfg.factor}")
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    model, tok, lm_path, base_meta = build_model(cfg)
    counts = model.train_only_video()
    vcfg = model.model.image.encoder.cfg
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "video", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world, num_frames=cfg.num_frames,
                    image_size=cfg.data.image_size or vcfg.image_size, backend=cfg.data.backend)
    feed = VideoFeed(loader, tok, cfg, vcfg, info.device, model.model.video.placeholder_ids())
    trainer = Trainer(net, t, run_dir, loss_fn=functools.partial(video_loss, bow_weight=cfg.bow_weight), info=info,
                      desc=cfg.stage,
                      lr_at=lambda s: warmup_cosine(s, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio))
    trainer.meta = {"loader": loader.state_dict()}
    if resume and trainer.resume():
        loader.load_state_dict(trainer.meta["loader"])

    def on_step(step: int, out: dict) -> None:
        trainer.meta["loader"] = loader.state_dict()
        if step % t.log_every == 0 or step == cfg.steps:  # video gates over training (report plots, diagnosis)
            out.update(unwrap(net).model.video.gate_values("gate_video"))

    result, stopped = fit_adapter_stage(trainer, feed, cfg, loader, counts, on_step)
    if stopped:
        return result
    if info.is_main:
        meta = {"stage": cfg.stage, "step": cfg.steps, "lm": str(lm_path), "init_from": cfg.init_from,
                "image_from": cfg.image_from, "vision": base_meta.get("vision")}
        save_model(run_dir / "final", unwrap(net).model, tok, meta)
        if cfg.eval_items:
            from mm.eval.video import eval_video_shards

            vmodel, vtok, _ = load_model(run_dir)
            ev = eval_video_shards(vmodel, vtok, cfg.data.val_shards, cfg.num_frames, cfg.eval_items,
                                   backend=cfg.data.backend, image_size=cfg.data.image_size)
            result.update({k: ev[k] for k in ("video_acc", "single_frame_acc", "blind_acc", "items")})
            result["temporal"] = ev.get("temporal")
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
