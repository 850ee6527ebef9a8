"""Stage image_dpo (PAPER.md §7.3; DESIGN.md invariant 4): direct preference optimisation of the image model (ViT +
image adapter; the instruction-tuned LM frozen) on pairs whose rejected answer has an injected error.

Each image sample gives one pair for its drawn question (or "Describe the image." -> caption): chosen = the gold
answer; rejected = the gold answer with one error injected (`inject_error`): a wrong number for numeric answers, a
wrong word swapped into multi-word answers (captions, transcriptions), or a wrong object (another option or another
sample's answer of the same family) for short answers. The loss is the DPO loss (beta) on the answer tokens
(formatting tokens such as <|eot_id|> masked) plus nll_weight x the chosen answer's per-token NLL. The reference
starts as the init model and follows the policy by EMA every ema_every steps (the paper's vision DPO); only the
trainable tensors follow, the shared frozen LM is never written. The run reuses the image-stage runner
(mm.stages.image_pretrain.run) with a `DPOObjective`; result adds held-out "chosen_frac" (the policy's implicit
reward against the init model prefers chosen) and VQA figures before/after.
"""
from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import torch

from data.chat_tasks import normalise_answer
from data.dialog import collate_dialogs, dialog
from data.loader import Loader, StepFeed, load_image_samples
from data.qa_format import qa_prompt
from data.token_stream import IGNORE
from encoders.vision import VisionConfig
from llm.reward import dpo_loss
from llm.tokenizer import Tokenizer
from mm.config import ImageDPOConfig
from mm.model.composed import ComposedLM
from mm.model.media import images_to_pixels
from mm.model.streams import Pixels
from mm.stages import image_pretrain
from mm.stages.image_pretrain import ImageFeed, ImageObjective, pick_question
from mm.stages.lm_post import EMAReference, special_ids
from mm.train.trainer import StepOutput, Trainer

ERROR_KINDS = ("wrong_number", "wrong_word", "wrong_object")
_INT = re.compile(r"^\d+$")


def inject_error(answer: str, references, pool: list[str], rng: random.Random,
                 choices=None) -> tuple[str, str] | None:
    """(kind, rejected) for a gold answer: a nearby wrong number, one word swapped for a pool word (answers of 3+
    words), or a wrong object (another option, else another pool answer). The rejected text differs from every
    reference after normalisation; None when no such error can be made."""
    refs = {normalise_answer(r) for r in (references or [answer])} | {normalise_answer(answer)}
    ok = lambda t: bool(t.strip()) and normalise_answer(t) not in refs  # noqa: E731
    words = answer.split()
    if _INT.match(answer.strip()):
        n = int(answer)
        cands = [str(m) for m in (n - 2, n - 1, n + 1, n + 2) if m >= 0 and ok(str(m))]
        return ("wrong_number", rng.choice(cands)) if cands else None
    if len(words) >= 3:
        vocab = sorted({w for p in pool for w in p.split()} - {w for w in words})
        if vocab:
            i = rng.randrange(len(words))
            out = " ".join(words[:i] + [rng.choice(vocab)] + words[i + 1:])
            if ok(out):
                return "wrong_word", out
    cands = [c for c in (choices or []) if ok(str(c))] or [p for p in pool if ok(p) and len(p.split()) <= 3]
    return ("wrong_object", str(rng.choice(cands))) if cands else None


def make_pair(meta: dict, caption: str, pool: list[str], rng: random.Random, caption_prob: float):
    """(question, chosen, rejected, kind) for one image sample, or None when no error can be injected."""
    q, gold = pick_question(meta, caption, rng, caption_prob)
    qa = next((x for x in (meta or {}).get("qa") or [] if qa_prompt(x) == q), None)
    refs = qa["answers"] if qa else [gold]
    err = inject_error(str(gold).strip(), refs, pool, rng, qa.get("choices") if qa else None)
    return None if err is None else (q, str(gold).strip(), err[1], err[0])


class PairFeed(ImageFeed):
    """Micro-batches of preference pairs: tokens / labels (2B, T) = B chosen rows then B rejected rows (labels only
    on answer tokens, formatting ids ignored), pixels for the B images once; n = number of pairs."""

    def __init__(self, loader: Loader, tok: Tokenizer, cfg: ImageDPOConfig, vcfg: VisionConfig,
                 device: torch.device, media: list[int] = ()):
        super().__init__(loader, tok, cfg, vcfg, device, media)
        self.fmt_ids = torch.tensor(sorted(special_ids(tok)))

    def make(self, b: int, batch: dict) -> dict:
        metas, caps = batch["meta"], batch["caption"]
        chosen, rejected, keep, kinds = [], [], [], []
        for j, (meta, cap) in enumerate(zip(metas, caps)):
            fam = (meta or {}).get("family")
            pool = [str(q["answers"][0]) for k, m in enumerate(metas) if k != j and (m or {}).get("family") == fam
                    for q in (m or {}).get("qa") or [] if q.get("answers")] + [c for k, c in enumerate(caps) if k != j]
            pair = make_pair(meta, cap, pool, random.Random(f"{self.cfg.seed}:{b}:{j}"), self.cfg.caption_prob)
            if pair is None:
                continue
            q, c, r, kind = pair
            chosen.append(dialog(self.fmt, q, c, media=self.media))
            rejected.append(dialog(self.fmt, q, r, media=self.media))
            keep.append(j)
            kinds.append(kind)
        mb = collate_dialogs(chosen + rejected, self.pad_id, self.cfg.seq_len)
        mb["labels"][torch.isin(mb["labels"], self.fmt_ids)] = IGNORE  # formatting tokens out of the loss
        px = images_to_pixels([batch["image"][j] for j in keep], self.vcfg)
        mb.update(pixels=px.pixels, aspect=px.aspect)
        mb = {k: v.to(self.device) for k, v in mb.items()}
        mb["n"] = len(keep)
        mb["kinds"] = kinds
        return mb


def answer_logps(m: ComposedLM, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens per row and their counts, both (2B,); the image of pair i
    serves rows i and B + i (encoded once)."""
    media = m.image.features(Pixels(mb["pixels"], mb["aspect"]))  # (B, 1, N, D)
    logits = m(mb["tokens"], image=torch.cat([media, media])).float()  # (2B, T, V)
    labels = mb["labels"]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (2B, T)
    return (lp * mask).sum(-1), mask.sum(-1)


class DPOObjective(ImageObjective):
    """DPO + NLL against an EMA-updated (or frozen) reference that shares the frozen LM with the policy."""

    reads_bow = False  # its pairs carry no caption bag-of-words (bow_weight must stay 0)
    vqa_feed = False  # a pair is one question of an unjittered image (qa_turns stays 1, augment off)

    def __init__(self, cfg: ImageDPOConfig):
        super().__init__(cfg)
        self.ref: ComposedLM | None = None
        self.init: ComposedLM | None = None
        self.ema: EMAReference | None = None

    def feed(self, loader, tok, vcfg, device, media: list[int] = ()) -> StepFeed:
        self.tok = tok
        return PairFeed(loader, tok, self.cfg, vcfg, device, media)

    def attach(self, model: ComposedLM, trainer: Trainer) -> None:
        if self.cfg.reference not in ("ema", "frozen"):
            raise ValueError(f"reference must be 'ema' or 'frozen', got {self.cfg.reference!r}")
        self.ref = frozen_copy(model)
        self.init = frozen_copy(model)
        if self.cfg.reference == "ema":
            keys = [k for k, p in model.named_parameters() if p.requires_grad]  # train_only ran before
            self.ema = EMAReference(self.ref, trainer, self.cfg.ema_decay, keys)

    def resumed(self) -> None:
        if self.ema is not None:
            self.ema.restore()

    def on_step(self, step: int) -> None:
        if self.ema is not None and step % self.cfg.ema_every == 0:
            self.ema.update()

    def loss(self, m, mb: dict) -> StepOutput:
        n = mb["n"]
        logp, count = answer_logps(m, mb)
        with torch.no_grad():
            ref_logp, _ = answer_logps(self.ref, mb)
        pref, margin = dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], self.cfg.beta)
        nll = -logp[:n] / count[:n].clamp(min=1)
        loss = (pref + self.cfg.nll_weight * nll).mean()
        return StepOutput(loss, n, {"chosen_frac": (margin > 0).float().mean().item(), "margin": margin.mean().item()})

    def finish(self, model: ComposedLM) -> dict:
        return {"chosen_frac": heldout_chosen_frac(model, self.init, self.tok, self.cfg)}


def frozen_copy(model: ComposedLM) -> ComposedLM:
    """A copy of the model for reference use: own stream tensors, the same (shared) LM modules."""
    memo = {id(mod): mod for mod in model.lm.modules()}
    memo.update({id(p): p for p in model.lm.parameters()})
    memo[id(model.lm)] = model.lm
    ref = copy.deepcopy(model, memo)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def heldout_chosen_frac(policy: ComposedLM, reference: ComposedLM, tok: Tokenizer, cfg: ImageDPOConfig,
                        batch: int = 16) -> float:
    """Share of held-out error-injected pairs (data.val_shards, eval_items images) where the policy's implicit
    reward log pi - log pi_ref prefers the gold answer."""
    vcfg = policy.image.encoder.cfg
    samples, _ = load_image_samples(cfg.data.val_shards, cfg.data.image_size or vcfg.image_size,
                                    max_samples=cfg.eval_items, seed=0)
    loader = _ListLoader(samples, batch)
    feed = PairFeed(loader, tok, cfg, vcfg, next(policy.parameters()).device, policy.image.placeholder_ids())
    was = policy.training
    policy.eval()
    wins = []
    for b in range(len(loader)):
        mb = feed.make(b, loader.batch(b))
        if not mb["n"]:
            continue
        n = mb["n"]
        pol, _ = answer_logps(policy, mb)
        ref, _ = answer_logps(reference, mb)
        d = pol - ref
        wins += (d[:n] > d[n:]).tolist()
    policy.train(was)
    return float(sum(wins) / len(wins)) if wins else 0.0


class _ListLoader:
    """Fixed batches of already-decoded image samples, shaped like data.loader.Loader's (for PairFeed.make)."""

    def __init__(self, samples: list[dict], batch: int):
        self.samples, self.bs = samples, batch

    def __len__(self) -> int:
        return (len(self.samples) + self.bs - 1) // self.bs

    def batch(self, b: int) -> dict:
        rows = self.samples[b * self.bs:(b + 1) * self.bs]
        return {"image": [torch.as_tensor(s["image"]) for s in rows], "meta": [s.get("meta") or {} for s in rows],
                "caption": [s.get("caption", "") for s in rows]}


def run(cfg: ImageDPOConfig, run_dir: Path, resume: bool = False) -> dict:
    """image_dpo from an image_sft / image run (init_from) with the instruct LM: see the module doc."""
    if not cfg.init_from:
        raise ValueError("image_dpo needs init_from: the image_sft (or image) run to start from")
    return image_pretrain.run(cfg, run_dir, resume, objective=DPOObjective(cfg))
