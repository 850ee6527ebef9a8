"""Stages image_pretrain / image_anneal (PAPER.md §4, §6.1; DESIGN.md invariants 1-4): the frozen LM of `lm` plus the
CLIP-pretrained ViT of `vision`, joined by gated cross-attention blocks (mm.fused.FusedLM). Trains exactly the image
encoder (ViT, tile embeddings, gated layers), the image adapter and the `<|image|>` embedding row; the LM has
requires_grad False and is not in the optimizer.

Each image sample becomes one Llama 3 dialog: user = `<|image|>` + a question from its qa list (or "Describe the
image." with probability caption_prob), assistant = the first reference answer (or the caption); the loss is on the
assistant tokens only. The question drawn for a sample is a pure function of (seed, loader batch, row), and batch b of
the `Loader` is a pure function of (seed, rank, world, b), so resume is exact (as in clip_pretrain).
image_anneal is the same runner with `init_from` an image run: its weights, a fresh optimizer, the YAML's (lower) LR
and possibly more tiles / a higher decode resolution.
image_sft (mm.stages.image_sft) trains its sweep members with this runner, the LM hot-swapped to `instruct_lm`.
Final: final/{model.safetensors ("vision.*" encoder, "fused.*" adapter + new-token rows), meta.json, tokenizer.json};
`load_fused(run_dir) -> (fused, vision, tok)` rebuilds the model.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adapters import registry
from data.loader import Loader, StepFeed
from data.token_stream import IGNORE
from encoders.vision import VisionConfig, VisionEncoder, normalize_pixels, tile_batch
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.checkpoint import CheckpointError, load_meta, load_tensors, save_weights
from mm.config import ImageStageConfig
from mm.train.distributed import init_distributed, unwrap, wrap_model
from mm.fused import FusedLM
from mm.model.runs import load_lm, model_dir
from mm.train.trainer import StepOutput, Trainer, fit_stage, loss_ends, warmup_cosine

SAVED_PARTS = ("vision.", "fused.image_adapter.", "fused.new_tokens.")  # where an image run's tensors live (no LM)
DESCRIBE = "Describe the image."
TILE_KEYS = ("pre_tile_embed", "tile_pos_embed", "post_tile_embed")


# ---- dialogs --------------------------------------------------------------------------------------------------------

def qa_prompt(qa: dict) -> str:
    """The user's question text; multiple-choice items list their options."""
    q = str(qa["question"]).strip()
    if qa.get("choices"):
        q += " Options: " + ", ".join(str(c) for c in qa["choices"]) + "."
    return q


def pick_question(meta: dict, caption: str, rng: random.Random, caption_prob: float) -> tuple[str, str]:
    """(question, target answer) for one training sample: a random qa item, or DESCRIBE -> caption."""
    qas = [q for q in (meta or {}).get("qa") or [] if q.get("answers")]
    if not qas or rng.random() < caption_prob:
        return DESCRIBE, caption
    qa = rng.choice(qas)
    return qa_prompt(qa), str(qa["answers"][0])


def encode_vqa(fmt: ChatFormat, question: str, answer: str | None, image: int = 1) -> tuple[list[int], list[bool]]:
    """BOS + user turn (`image` x `<|image|>` + question: 1 marker for cross-attention designs, FusedLM.image_run
    placeholders for embedding designs, 0 / False for none) + assistant turn; answer None ends with the assistant
    header (a generation prompt). mask: True on assistant content and its <|eot_id|>."""
    tok = fmt.tok
    user = fmt.encode_header("user") + [tok.special_id("<|image|>")] * int(image) + tok.encode(question.strip())
    ids = [tok.bos_id] + user + [tok.eot_id] + fmt.encode_header("assistant")
    mask = [False] * len(ids)
    if answer is not None:
        body = tok.encode(str(answer).strip()) + [tok.eot_id]
        ids, mask = ids + body, mask + [True] * len(body)
    return ids, mask


def collate_dialogs(dialogs: list[tuple[list[int], list[bool]]], pad_id: int, max_len: int) -> dict:
    """Right-padded tokens (B, T) and shifted labels (B, T) (IGNORE outside assistant tokens), cut to max_len."""
    T = min(max_len, max(len(d[0]) for d in dialogs)) + 1
    toks = np.full((len(dialogs), T), pad_id, dtype=np.int64)
    train = np.zeros((len(dialogs), T), dtype=bool)
    for i, (ids, mask) in enumerate(dialogs):
        n = min(len(ids), T)
        toks[i, :n], train[i, :n] = ids[:n], mask[:n]
    toks_t = torch.from_numpy(toks)
    labels = toks_t[:, 1:].clone()
    labels[~torch.from_numpy(train[:, 1:])] = IGNORE
    return {"tokens": toks_t[:, :-1].contiguous(), "labels": labels}


# ---- the model ------------------------------------------------------------------------------------------------------

class ImageModel(nn.Module):
    """Image encoder + FusedLM as one module (one optimizer / checkpoint): names "vision.*" and "fused.*"."""

    def __init__(self, vision: VisionEncoder, fused: FusedLM):
        super().__init__()
        self.vision, self.fused = vision, fused

    def media(self, pixels: torch.Tensor, aspect_ids: torch.Tensor) -> torch.Tensor:
        """pixels (B, n_tiles, 3, t, t) normalised -> media (B, 1, n_tiles*(P+1), D_out): one item per image."""
        return self.vision(pixels, aspect_ids)[:, None]

    def forward(self, tokens, pixels, aspect_ids, labels=None):
        """tokens (B, T) with one `<|image|>` each -> logits (B, T, V), or the mean loss with labels (B, T)."""
        return self.fused(tokens, self.media(pixels, aspect_ids), labels=labels)


def images_to_pixels(images, tile_size: int, max_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) (or a list of (3, H, W)) -> normalised (B, max_tiles, 3, t, t), aspect ids (B,)."""
    px, aspect = tile_batch(list(images), tile_size, max_tiles)
    return normalize_pixels(px), aspect


def load_vision(run: str | Path, max_tiles: int | None = None, prefix: str = "vision.") -> VisionEncoder:
    """The image encoder of a clip or image run, optionally with another max_tiles (tile embeddings whose shape
    changes start from init and their gates from 0; everything else is loaded)."""
    d = model_dir(run)
    meta = load_meta(d)
    if "vision_config" not in meta:
        raise CheckpointError(f"{d / 'meta.json'}: no vision_config (not a clip or image run)")
    vcfg = VisionConfig(**{**meta["vision_config"], **({"max_tiles": max_tiles} if max_tiles else {})})
    enc = VisionEncoder(vcfg)
    sd = {k[len(prefix):]: v for k, v in load_tensors(d / "model.safetensors").items() if k.startswith(prefix)}
    own = enc.state_dict()
    reinit = [k for k in TILE_KEYS if k in sd and sd[k].shape != own[k].shape]
    for k in reinit:
        sd[k] = own[k]
        sd[k.replace("_embed", "_gate")] = torch.zeros(1)
    enc.load_state_dict(sd, strict=True)
    return enc


def build_fused(lm, tok: Tokenizer, media_dim: int, adapter: dict | None) -> FusedLM:
    """FusedLM over the LM with `<|image|>` as the media token and the image design `adapter` (a YAML spec or a
    saved {kind, config}; None: the default)."""
    return FusedLM(lm, media_dim, tok.special_id("<|image|>"), adapter=adapter or {})


def image_spec(meta: dict) -> dict:
    """The image design of a saved image run: meta "image_adapter", or for a run written before designs were
    plug-ins its gated cross-attention fields (every / schedule / attend)."""
    if "image_adapter" in meta:
        return meta["image_adapter"]
    return {"kind": "gated_xattn", "config": {"every": meta.get("every", 4), "schedule": meta.get("schedule", "from_top"),
                                              "attend": meta.get("attend", "last"), "n_xattn": None}}


def freeze_for_image(model: ImageModel) -> dict[str, int]:
    """requires_grad on everything but the LM (encoder, image design, new token rows); {"trainable", "frozen"}."""
    counts = {"trainable": 0, "frozen": 0}
    lm_names = {f"fused.{n}" for n in model.fused._lm_names()}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in lm_names)
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def build_model(cfg: ImageStageConfig) -> tuple[ImageModel, Tokenizer, Path]:
    """LM (frozen) + encoder (from init_from if set, else the vision run) + adapter (from init_from if set); a config
    with `instruct_lm` (image_sft) then hot-swaps the LM to it, and the returned LM path is the instruct LM's."""
    lm, tok, _ = load_lm(cfg.lm)
    vision = load_vision(cfg.init_from or cfg.vision, cfg.max_tiles)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        d = model_dir(cfg.init_from)
        saved = image_spec(load_meta(d))
        if cfg.adapter and registry.parse("image", cfg.adapter) != registry.parse("image", saved):
            raise ValueError(f"{d}: its image adapter {saved} differs from the config's adapter {cfg.adapter}")
    fused = build_fused(lm, tok, vision.cfg.out_dim, image_spec(load_meta(d)) if cfg.init_from else cfg.adapter)
    if cfg.init_from:
        sd = {k[len("fused."):]: v for k, v in load_tensors(d / "model.safetensors").items() if k.startswith("fused.")}
        missing = set(fused.adapter_state_dict()) - set(sd)
        if missing:
            raise CheckpointError(f"{d}: adapter does not fit: missing {sorted(missing)[0]!r}")
        fused.load_state_dict(sd, strict=False)
    if getattr(cfg, "instruct_lm", None):  # image_sft: LM hot-swapped to the instruction-tuned one (invariant 6)
        hot_swap_lm(fused, tok, cfg.instruct_lm)
        return ImageModel(vision, fused), tok, lm_dir(cfg.instruct_lm)
    return ImageModel(vision, fused), tok, lm_dir(cfg.lm)


def hot_swap_lm(fused: FusedLM, tok: Tokenizer, ckpt) -> None:
    """Replace the fused model's LM weights by those of the LM run `ckpt` (FusedLM.load_lm_weights: adapter
    untouched); its tokenizer must be the one the adapter was trained with (same ids, same special tokens)."""
    other, otok, _ = load_lm(ckpt)
    probe = "Describe the image. 0123 yes no"
    if (otok.vocab_size, otok.encode(probe), otok.special_id("<|image|>")) != (
            tok.vocab_size, tok.encode(probe), tok.special_id("<|image|>")):
        raise CheckpointError(f"{model_dir(ckpt)}: its tokenizer differs from the image model's; cannot hot-swap")
    fused.load_lm_weights(other.state_dict())


def lm_dir(ckpt) -> Path:
    """The absolute model folder of an LM run."""
    return model_dir(ckpt).resolve()


# ---- saving / loading -----------------------------------------------------------------------------------------------

def save_image_model(directory: Path, model: ImageModel, tok: Tokenizer, meta: dict) -> Path:
    """final/: encoder + adapter tensors (no LM weights), meta.json (vision_config, lm, fusion), tokenizer.json."""
    state = {f"vision.{k}": v for k, v in model.vision.state_dict().items()}
    state.update({f"fused.{k}": v for k, v in model.fused.adapter_state_dict().items()})
    f = model.fused
    meta = {**meta, "kind": "image", "vision_config": model.vision.cfg.to_dict(), "media_dim": model.vision.cfg.out_dim,
            "image_adapter": registry.spec_of(f.image_adapter), "lm_config": f.cfg.to_dict()}
    out = save_weights(Path(directory), {"model": state}, meta)
    tok.save(out / "tokenizer.json")
    return out


def load_fused(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[FusedLM, VisionEncoder, Tokenizer]:
    """Rebuild (FusedLM, VisionEncoder, tokenizer) in eval mode from an image run (its LM is read from meta "lm")."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    if meta.get("kind") != "image":
        raise CheckpointError(f"{d / 'meta.json'}: not an image-stage model (kind={meta.get('kind')!r})")
    lm, tok, _ = load_lm(meta["lm"], device)
    vision = load_vision(d)
    fused = build_fused(lm, tok, meta["media_dim"], image_spec(meta))
    sd = {k[len("fused."):]: v for k, v in load_tensors(d / "model.safetensors").items() if k.startswith("fused.")}
    fused.load_state_dict(sd, strict=False)
    return fused.to(device).eval(), vision.to(device).eval(), tok


# ---- the stage ------------------------------------------------------------------------------------------------------

class ImageFeed(StepFeed):
    """Micro-batches for step s = loader batches [s*accum, (s+1)*accum) turned into VQA dialogs (see module doc)."""

    def __init__(self, loader: Loader, tok: Tokenizer, cfg: ImageStageConfig, vcfg: VisionConfig,
                 device: torch.device, image_run: int = 1):
        super().__init__(loader, cfg.train.grad_accum)
        self.fmt, self.cfg, self.vcfg, self.device, self.pad_id = ChatFormat(tok), cfg, vcfg, device, tok.pad_id
        self.image_run = image_run  # `<|image|>` tokens per image (FusedLM.image_run)

    def make(self, b: int, batch: dict) -> dict:
        """One micro-batch: {tokens (B, T), labels (B, T), pixels (B, n_tiles, 3, t, t), aspect (B,), n}."""
        dialogs = []
        for j, (meta, cap) in enumerate(zip(batch["meta"], batch["caption"])):
            rng = random.Random(f"{self.cfg.seed}:{b}:{j}")
            q, a = pick_question(meta, cap, rng, self.cfg.caption_prob)
            dialogs.append(encode_vqa(self.fmt, q, a, self.image_run))
        mb = collate_dialogs(dialogs, self.pad_id, self.cfg.seq_len)
        px, aspect = images_to_pixels(batch["image"], self.vcfg.image_size, self.vcfg.max_tiles)
        mb.update(pixels=px, aspect=aspect)
        mb = {k: v.to(self.device) for k, v in mb.items()}
        mb["n"] = int((mb["labels"] != IGNORE).sum())
        return mb


def image_loss(m, mb: dict) -> StepOutput:
    """Assistant-token loss of one micro-batch (a mean over its labelled tokens)."""
    loss = m(mb["tokens"], mb["pixels"], mb["aspect"], labels=mb["labels"])
    return StepOutput(loss, mb["n"])


class ImageObjective:
    """What an image stage optimises: the VQA/caption NLL here; image_dpo (mm.stages.image_dpo) swaps in DPO.

    feed() builds the step feed, loss() scores a micro-batch, attach() runs once the trainer exists (before a
    resume: register trainer.extras there), resumed() after a resume, on_step() after every step, finish() adds
    figures to the result before final/ is written."""

    def __init__(self, cfg: ImageStageConfig):
        self.cfg = cfg

    def feed(self, loader: Loader, tok: Tokenizer, vcfg: VisionConfig, device: torch.device,
             image_run: int = 1) -> StepFeed:
        return ImageFeed(loader, tok, self.cfg, vcfg, device, image_run)

    def loss(self, m, mb: dict) -> StepOutput:
        return image_loss(m, mb)

    def attach(self, model: "ImageModel", trainer: Trainer) -> None:
        pass

    def resumed(self) -> None:
        pass

    def on_step(self, step: int) -> None:
        pass

    def finish(self, model: "ImageModel") -> dict:
        return {}


def fit_adapter_stage(trainer: Trainer, feed, cfg, loader, counts: dict, on_step) -> tuple[dict, bool]:
    """fit_stage for the adapter stages (image_*, video_*): (the result so far: stage, steps, skips, parameter counts,
    train_s, first/final loss; or the stop_after early result) and whether the run stopped early."""
    def base() -> dict:
        return {"stage": cfg.stage, "steps": cfg.steps, "skipped": loader.skipped}

    records, train_s, stopped = fit_stage(trainer, feed, cfg.steps, base, on_step=on_step)
    if stopped:
        return stopped, True
    return {**base(), **{f"params_{k}": n for k, n in counts.items()}, "train_s": train_s, **loss_ends(records)}, False


def run(cfg: ImageStageConfig, run_dir: Path, resume: bool = False, objective: ImageObjective | None = None) -> dict:
    """Train ViT + image adapter with the LM frozen (VQA/caption NLL unless another objective is given); writes
    checkpoints/, final/, result."""
    t0 = time.perf_counter()
    if cfg.stage == "image_anneal" and not cfg.init_from:
        raise ValueError("image_anneal needs init_from: the image_pretrain run to continue from")
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    model, tok, lm_path = build_model(cfg)
    counts = freeze_for_image(model)
    vcfg = model.vision.cfg
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    t = cfg.train
    if t.batch_size % info.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {info.world} processes")
    loader = Loader(cfg.data.shards, "image", t.batch_size // info.world, num_workers=cfg.data.num_workers,
                    seed=cfg.seed, rank=info.rank, world=info.world, image_size=cfg.data.image_size or vcfg.image_size)
    objective = objective or ImageObjective(cfg)
    feed = objective.feed(loader, tok, vcfg, info.device, model.fused.image_run)
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
        gates = getattr(unwrap(net).fused.image_adapter, "gate_values", None)  # xattn designs have gates
        if gates is not None and (step % t.log_every == 0 or step == cfg.steps):  # over training (report plots)
            out.update(gates("gate_image"))

    result, stopped = fit_adapter_stage(trainer, feed, cfg, loader, counts, on_step)
    if stopped:
        return result
    if info.is_main:
        result.update(objective.finish(unwrap(net)))
        meta = {"stage": cfg.stage, "step": cfg.steps, "lm": str(lm_path), "init_from": cfg.init_from,
                "vision": str(cfg.vision)}
        save_image_model(run_dir / "final", unwrap(net), tok, meta)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
