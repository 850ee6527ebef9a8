"""Stages video_pretrain / video_sft (PAPER.md §5, §6.1, §7.2; DESIGN.md invariants 1, 4, 6): the image model of an
image run, frozen, plus a video adapter (mm.fused.VideoAdapter: perceiver aggregator, video cross-attention before
every `video_every`-th image block, the `<|video|>` row). Only "fused.video_adapter.*" trains.

Each clip: num_frames frames sampled uniformly over the whole clip (data.decode.decode_video via the Loader), each
frame tiled and encoded by the frozen image encoder under no_grad (B, F, N, D), merged `factor` frames at a time by
the aggregator. Each sample is one Llama 3 dialog: user = `<|video|>` + a question in the paper's evaluation formats
(multiple choice "Select the correct answer ..." -> option letter, with probability mc_prob when the qa has choices;
else short answer "Answer the question using a single word or phrase." -> the first reference), or "Describe the
video." -> caption with probability caption_prob; loss on the assistant tokens only. The draw for a sample is a pure
function of (seed, loader batch, row), so resume is exact.
video_pretrain starts from an image run (init_from; adapter random init); video_sft from a video_pretrain run, with
the LM hot-swapped to `instruct_lm` and optionally ViT + image adapter taken from an image_sft run (`image_from`).
Final: final/ as an image run's (mm.stages.image_pretrain.save_image_model: "vision.*", "fused.*" incl.
"fused.video_adapter.*"; meta kind "image", so image tools load its image part unchanged) plus meta "video" (the
adapter's shape); `load_video(run)` rebuilds the whole model.
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
from data.loader import Loader
from data.qa_format import gold_letter, mc_prompt, short_prompt
from data.token_stream import IGNORE
from encoders.vision import VisionConfig, VisionEncoder, supported_grids
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.checkpoint import CheckpointError, load_meta, load_tensors
from mm.config import VideoStageConfig
from mm.train.distributed import init_distributed, unwrap, wrap_model
from mm.fused import FusedLM
from mm.model.runs import model_dir
from mm.stages.image_pretrain import (SAVED_PARTS, ImageFeed, collate_dialogs, encode_vqa, fit_adapter_stage,
                                      hot_swap_lm, image_spec, images_to_pixels, lm_dir, load_fused, save_image_model)
from mm.train.trainer import StepOutput, Trainer, warmup_cosine

BOW_SOURCES = ("aggregate", "read")  # what the optional bag-of-words head reads (VideoStageConfig.bow_source)
TRAINABLE_PREFIXES = ("fused.video_adapter.", "bow_head.")  # DESIGN.md invariant 4: the video stages train nothing
# else (bow_head: the optional auxiliary head, never saved)
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


def encode_video_qa(fmt: ChatFormat, question: str, answer: str | None,
                    video: bool = True) -> tuple[list[int], list[bool]]:
    """encode_vqa with `<|video|>` (instead of `<|image|>`) opening the user turn; video False: no marker (blind)."""
    ids, mask = encode_vqa(fmt, question, answer, image=False)
    if video:
        at = 1 + len(fmt.encode_header("user"))  # after BOS + the user header
        ids.insert(at, fmt.tok.special_id("<|video|>"))
        mask.insert(at, False)
    return ids, mask


# ---- the model ----------------------------------------------------------------------------------------------------

def frames_to_pixels(frames, vcfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (B, F, 3, H, W) -> normalised tiles (B, F, n, 3, t, t) and aspect ids (B, F); n = the most real
    tiles any frame needs (<= max_tiles; padding tiles are masked by the encoder)."""
    frames = torch.as_tensor(frames)
    B, Fr = frames.shape[:2]
    px, aspect = images_to_pixels(frames.flatten(0, 1), vcfg.image_size, vcfg.max_tiles)  # (B*F, max_tiles, ...)
    n = max(r * c for r, c in (supported_grids(vcfg.max_tiles)[int(a)] for a in aspect.unique()))
    return px[:, :n].reshape(B, Fr, n, *px.shape[2:]), aspect.view(B, Fr)


class VideoModel(nn.Module):
    """Image encoder + FusedLM with a video adapter (one optimizer / checkpoint): names "vision.*" and "fused.*";
    with bow_vocab > 0 also "bow_head.*", the auxiliary caption bag-of-words head on the pooled aggregated tokens
    (their mean, or the summary tokens' mean when the aggregator has them) or, bow_source "read", on the video
    cross-attention blocks' pre-gate outputs averaged over the text rows that see the clip."""

    def __init__(self, vision: VisionEncoder, fused: FusedLM, bow_vocab: int = 0, bow_source: str = "aggregate"):
        super().__init__()
        if bow_source not in BOW_SOURCES:
            raise ValueError(f"bow_source must be one of {BOW_SOURCES}, got {bow_source!r}")
        self.vision, self.fused, self.bow_source = vision, fused, bow_source
        width = fused.video_adapter.aggregator.width if bow_source == "aggregate" else fused.lm.cfg.dim
        self.bow_head = nn.Linear(width, bow_vocab) if bow_vocab else None

    def forward(self, tokens, pixels, aspect, labels=None, bow=None):
        """tokens (B, T) with one `<|video|>` each -> logits (B, T, V), or the mean loss with labels (B, T); with
        bow (B, V) caption token distributions also the bag-of-words cross-entropy: (loss, bow_loss)."""
        video = frame_features(self.vision, pixels, aspect)  # (B, 1, F, N, D)
        if bow is None:
            return self.fused(tokens, video=video, labels=labels)
        agg = self.fused.aggregate(video)  # (B, 1, E*L, W)
        blocks = list(self.fused.video_adapter.xattn.blocks.values()) if self.bow_source == "read" else []
        for blk in blocks:
            blk.keep_read = True
        try:
            out = self.fused(tokens, video=self.fused.aggregated_kv(agg), labels=labels)
        finally:
            for blk in blocks:
                blk.keep_read = False
        if blocks:  # the blocks' pre-gate reads, averaged over the rows that see the clip: (B, D)
            read = sum(blk.read[0] for blk in blocks) / len(blocks)  # (B, T, D)
            rows = blocks[0].read[1]  # (B, T, 1)
            pooled = (read * rows).sum(1) / rows.sum(1).clamp(min=1)
            for blk in blocks:
                blk.read = None
        else:
            pooled = self.fused.video_adapter.aggregator.pooled(agg, video.shape[2])[:, 0]  # (B, W)
        logp = self.bow_head(pooled).float().log_softmax(-1)  # (B, V)
        return out, -(bow * logp).sum(-1).mean()


def caption_bow(tok: Tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, V): each caption's distinct token ids, uniform (the bag-of-words target)."""
    out = torch.zeros(len(captions), tok.vocab_size)
    for i, c in enumerate(captions):
        ids = sorted(set(tok.encode(c.strip())))
        if ids:
            out[i, ids] = 1.0 / len(ids)
    return out


@torch.no_grad()
def frame_features(vision: VisionEncoder, pixels: torch.Tensor, aspect: torch.Tensor) -> torch.Tensor:
    """pixels (B, F, n, 3, t, t), aspect (B, F) -> frame features (B, 1, F, n*(P+1), D): one video per sample, each
    frame through the frozen image encoder without a graph (it never trains in the video stages)."""
    B, Fr = pixels.shape[:2]
    feats = vision(pixels.flatten(0, 1), aspect.flatten())  # (B*F, n*(P+1), D)
    return feats.view(B, 1, Fr, *feats.shape[1:])


def aggregator_config(cfg: VideoStageConfig, vcfg: VisionConfig) -> dict:
    """The stage's video design spec with its aggregation factor and, for designs with a position table, max_tokens
    defaulting to the encoder's tokens per frame (all tiles)."""
    spec = dict(cfg.aggregator)
    fields = {f.name for f in dataclasses.fields(registry.design_class("video", spec.get("kind") or
                                                                       registry.DEFAULT["video"]).Config)}
    if "max_tokens" in fields:
        spec["max_tokens"] = spec.get("max_tokens") or vcfg.tokens_per_tile * vcfg.max_tiles
    return {**spec, "factor": cfg.factor}


def video_spec(saved: dict) -> dict:
    """A video run's saved aggregator ({kind, config}; a run written before designs were plug-ins saved the
    perceiver's config alone)."""
    return saved if set(saved) == {"kind", "config"} else {"kind": "perceiver", "config": saved}


def load_video(ckpt: str | Path, device: str | torch.device = "cpu", factor: int | None = None,
               out_positions: bool = False) -> tuple[FusedLM, VisionEncoder, Tokenizer]:
    """Rebuild (FusedLM with its video adapter, VisionEncoder, tokenizer) in eval mode from a video run (image part
    via load_fused); factor overrides the saved aggregation factor (the weights do not depend on it); out_positions
    adds the aggregator's output-position tables at zero to a run without them (the function is unchanged)."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    if "video" not in meta:
        raise CheckpointError(f"{d / 'meta.json'}: not a video-stage model (no 'video' entry)")
    fused, vision, tok = load_fused(d, device)
    v = dict(meta["video"])
    spec = video_spec(v["aggregator"])
    conf = spec["config"]
    grow = out_positions and "out_positions" in conf and not conf["out_positions"]
    spec = {"kind": spec["kind"], "config": {**conf, **({"factor": factor} if factor else {}),
                                             **({"out_positions": True} if grow else {})}}
    fused.add_video(meta["media_dim"], tok.special_id("<|video|>"), spec, v["every"])
    prefix = "fused.video_adapter."
    sd = {k[len(prefix):]: t for k, t in load_tensors(d / "model.safetensors").items() if k.startswith(prefix)}
    if grow:  # the new tables as initialised: zero
        sd.update({k: t for k, t in fused.video_adapter.state_dict().items() if k.startswith("aggregator.out_")})
    try:
        fused.video_adapter.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{d}: video adapter does not fit: {str(e).splitlines()[0]}") from None
    return fused.to(device).eval(), vision, tok


def saved_num_frames(ckpt: str | Path) -> int:
    """The frames per clip a video run was trained with (its meta)."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    if "video" not in meta:
        raise CheckpointError(f"{d / 'meta.json'}: not a video-stage model (no 'video' entry)")
    return int(meta["video"]["num_frames"])


def load_image_part(model: VideoModel, ckpt: str | Path) -> None:
    """Replace the encoder and image adapter (+ `<|image|>` row) by those of another image run (video_sft from the
    image_sft soup); shapes must match."""
    d = model_dir(ckpt)
    sd = load_tensors(d / "model.safetensors")
    want = {k for k in model.state_dict() if k.startswith(SAVED_PARTS)}
    missing = sorted(want - set(sd))
    if missing:
        raise CheckpointError(f"{d}: no {missing[0]!r}: not an image run of this model's shape")
    model.load_state_dict({k: sd[k] for k in want}, strict=False)


def build_model(cfg: VideoStageConfig) -> tuple[VideoModel, Tokenizer, Path, dict]:
    """(model, tokenizer, LM path, image-run meta) for a video stage (see the module doc)."""
    d = model_dir(cfg.init_from)
    meta = load_meta(d)
    if cfg.stage == "video_pretrain":
        if "video" in meta:
            raise CheckpointError(f"{d}: video_pretrain starts from an image run, this is a video run")
        fused, vision, tok = load_fused(d)
        torch.manual_seed(cfg.seed)
        fused.add_video(vision.cfg.out_dim, tok.special_id("<|video|>"), aggregator_config(cfg, vision.cfg),
                        cfg.video_every, cfg.xattn_init_std)
    else:
        fused, vision, tok = load_video(d, factor=cfg.factor, out_positions=cfg.aggregator.get("out_positions", False))
        va, want = fused.video_adapter, aggregator_config(cfg, vision.cfg)
        if va.every != cfg.video_every or registry.parse("video", registry.spec_of(va.aggregator)) != \
                registry.parse("video", want):
            raise ValueError(f"{d}: its video adapter (every {va.every}, {va.cfg}) differs from the config's "
                             f"(video_every {cfg.video_every}, {want})")
    lm_path = Path(meta["lm"])
    model = VideoModel(vision, fused, tok.vocab_size if cfg.bow_weight > 0 else 0, cfg.bow_source)
    if cfg.instruct_lm:  # video_sft: the instruction-tuned LM (invariant 6)
        hot_swap_lm(fused, tok, cfg.instruct_lm)
        lm_path = lm_dir(cfg.instruct_lm)
    if cfg.image_from:
        load_image_part(model, cfg.image_from)
    return model, tok, lm_path, meta


def freeze_for_video(model: VideoModel) -> dict[str, int]:
    """requires_grad only on TRAINABLE_PREFIXES (video adapter); returns {"trainable": n, "frozen": n} counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE_PREFIXES))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


# ---- the stage ----------------------------------------------------------------------------------------------------

class VideoFeed(ImageFeed):
    """Micro-batches for step s = loader batches [s*accum, (s+1)*accum) turned into video QA dialogs."""

    def make(self, b: int, batch: dict) -> dict:
        """One micro-batch: {tokens (B, T), labels (B, T), pixels (B, F, n, 3, t, t), aspect (B, F), n}."""
        dialogs = []
        for j, (meta, cap) in enumerate(zip(batch["meta"], batch["caption"])):
            rng = random.Random(f"{self.cfg.seed}:{b}:{j}")
            q, a = pick_video_question(meta, cap, rng, self.cfg.caption_prob, self.cfg.mc_prob)
            dialogs.append(encode_video_qa(self.fmt, q, a))
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
    counts = freeze_for_video(model)
    vcfg = model.vision.cfg
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "video", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world, num_frames=cfg.num_frames,
                    image_size=cfg.data.image_size or vcfg.image_size, backend=cfg.data.backend)
    feed = VideoFeed(loader, tok, cfg, vcfg, info.device)
    trainer = Trainer(net, t, run_dir, loss_fn=functools.partial(video_loss, bow_weight=cfg.bow_weight), info=info,
                      desc=cfg.stage,
                      lr_at=lambda s: warmup_cosine(s, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio))
    trainer.meta = {"loader": loader.state_dict()}
    if resume and trainer.resume():
        loader.load_state_dict(trainer.meta["loader"])

    def on_step(step: int, out: dict) -> None:
        trainer.meta["loader"] = loader.state_dict()
        if step % t.log_every == 0 or step == cfg.steps:  # video gates over training (report plots, diagnosis)
            out.update(unwrap(net).fused.video_adapter.xattn.gate_values("gate_video"))

    result, stopped = fit_adapter_stage(trainer, feed, cfg, loader, counts, on_step)
    if stopped:
        return result
    if info.is_main:
        m = unwrap(net)
        keep = {"image_adapter": image_spec(base_meta)}
        video = {"aggregator": registry.spec_of(m.fused.video_adapter.aggregator), "every": cfg.video_every,
                 "num_frames": cfg.num_frames}
        meta = {**keep, "stage": cfg.stage, "step": cfg.steps, "lm": str(lm_path), "init_from": cfg.init_from,
                "image_from": cfg.image_from, "vision": base_meta.get("vision"), "video": video}
        save_image_model(run_dir / "final", m, tok, meta)
        if cfg.eval_items:
            from mm.eval.video import eval_video_shards

            fused, vision, vtok = load_video(run_dir)
            ev = eval_video_shards(fused, vision, vtok, cfg.data.val_shards, cfg.num_frames, cfg.eval_items,
                                   backend=cfg.data.backend, image_size=cfg.data.image_size)
            result.update({k: ev[k] for k in ("video_acc", "single_frame_acc", "blind_acc", "items")})
            result["temporal"] = ev.get("temporal")
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
