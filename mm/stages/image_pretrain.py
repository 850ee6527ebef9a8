"""Stages image_pretrain / image_anneal (PAPER.md §4, §6.1; DESIGN.md invariants 1-4): the frozen LM of `lm` plus
the CLIP-pretrained ViT of `vision`, joined by an image design (mm.model.streams.ImageStream). Trains the image
stream (ViT, tile embeddings, gated layers, the design, the `<|image|>` row); the LM is frozen.

Each image sample becomes one Llama 3 dialog: user = the image's placeholders + a question from its qa list (or
"Describe the image." with probability caption_prob), assistant = the first reference answer (or the caption); the
loss is on the assistant tokens only. The draw for a sample is a pure function of (seed, loader batch, row) and batch
b of the `Loader` a pure function of (seed, rank, world, b), so resume is exact. image_anneal is the same runner with
`init_from` an image run (its weights, a fresh optimizer, the YAML's LR, possibly more tiles / a higher decode
resolution); image_sft and image_dpo train with this runner too. Final: a composed model folder (mm.model.store).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from adapters import registry
from data.augment import affine_jitter
from data.dialog import collate_dialogs, dialog
from data.loader import Loader, StepFeed
from data.qa_format import qa_prompt
from data.token_stream import IGNORE
from encoders.vision import VisionConfig
from llm.tokenizer import ChatFormat, Tokenizer
from mm.config import ImageStageConfig
from mm.model.checkpoint import CheckpointError
from mm.model.composed import ComposedLM, param_counts
from mm.model.media import images_to_pixels
from mm.model.runs import lm_dir, load_lm
from mm.model.store import hot_swap, load_vision, read_run, save_model
from mm.model.streams import ImageStream, Pixels
from mm.train.distributed import init_distributed, unwrap, wrap_model
from mm.train.read_bow import caption_bow, with_read_bow
from mm.train.trainer import StepOutput, Trainer, fit_adapter_stage, warmup_cosine

DESCRIBE = "Describe the image."


def pick_questions(meta: dict, caption: str, rng: random.Random, caption_prob: float,
                   turns: int = 1) -> list[tuple[str, str]]:
    """[(question, target answer), ...] for one training sample: `turns` of its qa items in a random order (all of
    them when it has fewer; turns 1: one random item), or [(DESCRIBE, caption)]."""
    qas = [q for q in (meta or {}).get("qa") or [] if q.get("answers")]
    if not qas or rng.random() < caption_prob:
        return [(DESCRIBE, caption)]
    picked = [rng.choice(qas)] if turns == 1 else rng.sample(qas, min(turns, len(qas)))
    return [(qa_prompt(qa), str(qa["answers"][0])) for qa in picked]


def from_sources(meta: dict | None, prefixes: list[str]) -> bool:
    """Whether a sample's meta "source" starts with one of prefixes (the per-source knobs' match)."""
    return str((meta or {}).get("source", "")).startswith(tuple(prefixes))


def pick_question(meta: dict, caption: str, rng: random.Random, caption_prob: float) -> tuple[str, str]:
    """(question, target answer) for one training sample: a random qa item, or DESCRIBE -> caption."""
    return pick_questions(meta, caption, rng, caption_prob)[0]


def build_model(cfg: ImageStageConfig) -> tuple[ComposedLM, Tokenizer, Path]:
    """LM (frozen) + image stream: encoder from init_from if set (else the vision run), the design fresh (seeded) or
    from init_from; a config with `instruct_lm` (image_sft) then hot-swaps the LM to it, and the returned LM path
    is the instruct LM's."""
    lm, tok, _ = load_lm(cfg.lm)
    vision = load_vision(cfg.init_from or cfg.vision, cfg.max_tiles, cfg.thumbnail, cfg.tile_size)
    torch.manual_seed(cfg.seed)
    spec = cfg.adapter
    if cfg.init_from:
        d, meta, state = read_run(cfg.init_from)
        saved = meta["streams"]["image"]["adapter"]
        if cfg.adapter and registry.parse("image", cfg.adapter) != registry.parse("image", saved):
            raise ValueError(f"{d}: its image adapter {saved} differs from the config's adapter {cfg.adapter}")
        spec = saved
    model = ComposedLM(lm, image=ImageStream.build(lm, tok.special_id("<|image|>"), vision, spec))
    if cfg.init_from:
        sd = {k: v for k, v in state.items() if k.startswith(("image.token.", "image.adapter."))}
        missing = sorted(k for k in model.stream_state_dict() if k.startswith(("image.token.", "image.adapter."))
                         and k not in sd)
        if missing:
            raise CheckpointError(f"{d}: adapter does not fit: missing {missing[0]!r}")
        model.load_state_dict(sd, strict=False)
    if getattr(cfg, "instruct_lm", None):  # image_sft: LM hot-swapped to the instruction-tuned one (invariant 6)
        hot_swap(model, tok, cfg.instruct_lm)
        return model, tok, lm_dir(cfg.instruct_lm)
    return model, tok, lm_dir(cfg.lm)


class ImageReadBow(nn.Module):
    """The composed model (`model`) and "bow_head": the caption bag-of-words head on the image cross-attention
    blocks' pre-gate reads (mm.train.read_bow; a training aid, never saved)."""

    def __init__(self, model: ComposedLM, vocab: int):
        super().__init__()
        self.blocks = list(getattr(model.image.adapter, "blocks", {}).values())
        if not self.blocks:
            raise ValueError(f"bow_weight needs an image design with cross-attention blocks; "
                             f"{type(model.image.adapter).__name__} has none (set bow_weight=0)")
        self.model, self.bow_head = model, nn.Linear(model.cfg.dim, vocab)

    def forward(self, tokens: torch.Tensor, image: Pixels, labels: torch.Tensor, bow: torch.Tensor):
        """tokens, labels (B, T), bow (B, V) -> (the assistant-token loss, the bag-of-words loss)."""
        return with_read_bow(self.bow_head, self.blocks, lambda: self.model(tokens, image=image, labels=labels), bow)


# ---- the stage ------------------------------------------------------------------------------------------------------

class ImageFeed(StepFeed):
    """Micro-batches for step s = loader batches [s*accum, (s+1)*accum) turned into VQA dialogs (see module doc)."""

    def __init__(self, loader: Loader, tok: Tokenizer, cfg: ImageStageConfig, vcfg: VisionConfig,
                 device: torch.device, media: list[int] = ()):
        super().__init__(loader, cfg.train.grad_accum)
        self.fmt, self.cfg, self.vcfg, self.device, self.pad_id = ChatFormat(tok), cfg, vcfg, device, tok.pad_id
        self.media = list(media)  # the prompt ids of one image (ImageStream.placeholder_ids)

    def jitter(self, b: int, batch: dict):
        """The batch's uint8 images (B, 3, H, W) as they came when augment is off, else a list of (3, H, W) with
        those of cfg.augment's sources jittered (a draw per (seed, b, row) apart from the question draws')."""
        aug = self.cfg.augment
        if not aug.sources:
            return batch["image"]
        return [affine_jitter(torch.as_tensor(im), random.Random(f"{self.cfg.seed}:{b}:{j}:augment"), aug.degrees,
                              aug.translate, aug.scale)
                if from_sources(meta, aug.sources) else im
                for j, (im, meta) in enumerate(zip(batch["image"], batch["meta"]))]

    def turns(self, meta: dict | None) -> int:
        """cfg.qa_turns for a sample of cfg.qa_sources (every source when empty), else 1."""
        listed = not self.cfg.qa_sources or from_sources(meta, self.cfg.qa_sources)
        return self.cfg.qa_turns if listed else 1

    def make(self, b: int, batch: dict) -> dict:
        """One micro-batch: {tokens (B, T), labels (B, T), pixels (B, n_tiles, 3, t, t), aspect (B,), n}."""
        dialogs = []
        for j, (meta, cap) in enumerate(zip(batch["meta"], batch["caption"])):
            rng = random.Random(f"{self.cfg.seed}:{b}:{j}")
            (q, a), *follow = pick_questions(meta, cap, rng, self.cfg.caption_prob, self.turns(meta))
            dialogs.append(dialog(self.fmt, q, a, media=self.media, follow=follow))
        mb = collate_dialogs(dialogs, self.pad_id, self.cfg.seq_len)
        px = images_to_pixels(self.jitter(b, batch), self.vcfg)
        mb.update(pixels=px.pixels, aspect=px.aspect)
        if self.cfg.bow_weight > 0:
            mb["bow"] = caption_bow(self.fmt.tok, list(batch["caption"]))
        mb = {k: v.to(self.device) for k, v in mb.items()}
        mb["n"] = int((mb["labels"] != IGNORE).sum())
        return mb


def image_loss(m, mb: dict, bow_weight: float = 0.0) -> StepOutput:
    """Assistant-token loss of one micro-batch (a mean over its labelled tokens), + bow_weight x the caption
    bag-of-words loss when the batch carries "bow" (m is then an ImageReadBow)."""
    image = Pixels(mb["pixels"], mb["aspect"])
    if "bow" not in mb:
        return StepOutput(m(mb["tokens"], image=image, labels=mb["labels"]), mb["n"])
    loss, bow = m(mb["tokens"], image, mb["labels"], mb["bow"])
    return StepOutput(loss + bow_weight * bow, mb["n"], {"lm_loss": loss.detach(), "bow": bow.detach()})


class ImageObjective:
    """What an image stage optimises: the VQA/caption NLL here; image_dpo (mm.stages.image_dpo) swaps in DPO.

    feed() builds the step feed, loss() scores a micro-batch, attach() runs once the trainer exists (before a
    resume: register trainer.extras there), resumed() after a resume, on_step() after every step, finish() adds
    figures to the result before final/ is written; reads_bow: whether bow_weight > 0 applies to it; vqa_feed:
    whether ImageFeed's knobs (qa_turns > 1, augment) apply to it."""

    reads_bow = True
    vqa_feed = True

    def __init__(self, cfg: ImageStageConfig):
        self.cfg = cfg

    def feed(self, loader: Loader, tok: Tokenizer, vcfg: VisionConfig, device: torch.device,
             media: list[int] = ()) -> StepFeed:
        return ImageFeed(loader, tok, self.cfg, vcfg, device, media)

    def loss(self, m, mb: dict) -> StepOutput:
        return image_loss(m, mb, self.cfg.bow_weight)

    def attach(self, model: ComposedLM, trainer: Trainer) -> None:
        pass

    def resumed(self) -> None:
        pass

    def on_step(self, step: int) -> None:
        pass

    def finish(self, model: ComposedLM) -> dict:
        return {}


def run(cfg: ImageStageConfig, run_dir: Path, resume: bool = False, objective: ImageObjective | None = None) -> dict:
    """Train ViT + image adapter with the LM frozen (VQA/caption NLL unless another objective is given); writes
    checkpoints/, final/, result."""
    t0 = time.perf_counter()
    if cfg.stage == "image_anneal" and not cfg.init_from:
        raise ValueError("image_anneal needs init_from: the image_pretrain run to continue from")
    objective = objective or ImageObjective(cfg)
    if cfg.bow_weight > 0 and not objective.reads_bow:
        raise ValueError(f"bow_weight applies to the VQA/caption objective, not {type(objective).__name__}")
    if cfg.qa_turns < 1:
        raise ValueError(f"qa_turns must be >= 1 (an image's questions per training dialog), got {cfg.qa_turns}")
    if cfg.qa_sources and cfg.qa_turns == 1:
        raise ValueError(f"qa_sources needs qa_turns > 1 (it lists the sources asked qa_turns questions), got "
                         f"qa_sources {cfg.qa_sources} with qa_turns 1")
    if cfg.qa_turns > 1 and not objective.vqa_feed:
        raise ValueError(f"qa_turns applies to the VQA/caption objective, not {type(objective).__name__}")
    aug = cfg.augment
    if aug.sources and not objective.vqa_feed:
        raise ValueError(f"augment applies to the VQA/caption objective, not {type(objective).__name__}")
    if not (aug.degrees >= 0 and 0 <= aug.translate <= 0.5 and 0 <= aug.scale < 1):
        raise ValueError(f"augment needs degrees >= 0, translate in [0, 0.5], scale in [0, 1); got degrees "
                         f"{aug.degrees}, translate {aug.translate}, scale {aug.scale}")
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    model, tok, lm_path = build_model(cfg)
    model.train_only("image")
    vcfg = model.image.encoder.cfg
    trained = ImageReadBow(model, tok.vocab_size) if cfg.bow_weight > 0 else model  # the head trains too
    counts = param_counts(trained)
    net = wrap_model(trained.to(info.device), cfg.train.parallel, info)

    def composed() -> ComposedLM:
        u = unwrap(net)
        return u.model if isinstance(u, ImageReadBow) else u

    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "image", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world, image_size=cfg.data.image_size or vcfg.image_size)
    feed = objective.feed(loader, tok, vcfg, info.device, model.image.placeholder_ids())
    trainer = Trainer(net, t, run_dir, loss_fn=objective.loss, info=info, desc=cfg.stage,
                      lr_at=lambda s: warmup_cosine(s, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio))
    trainer.meta = {"loader": loader.state_dict()}
    objective.attach(model, trainer)
    if resume and trainer.resume():
        loader.load_state_dict(trainer.meta["loader"])
        objective.resumed()

    def on_step(step: int, out: dict) -> None:
        trainer.meta["loader"] = loader.state_dict()
        objective.on_step(step)
        if step % t.log_every == 0 or step == cfg.steps:  # gates over training (report plots; xattn designs)
            out.update(composed().image.gate_values("gate_image"))

    result, stopped = fit_adapter_stage(trainer, feed, cfg, loader, counts, on_step)
    if stopped:
        return result
    if info.is_main:
        result.update(objective.finish(composed()))
        meta = {"stage": cfg.stage, "step": cfg.steps, "lm": str(lm_path), "init_from": cfg.init_from,
                "vision": str(cfg.vision)}
        save_model(run_dir / "final", composed(), tok, meta)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
