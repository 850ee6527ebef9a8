"""Post-training stages (PAPER.md §1.5): lm_sft (assistant-only loss, packed dialogs), lm_rm (pairwise reward model
from the pretrained checkpoint; optional LM loss on chosen), lm_dpo (beta 0.1, formatting tokens masked, NLL 0.2,
frozen or EMA reference)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from data.chat_stream import ChatPacker, PairSampler, encode_dialogs, encode_pairs, pair_half
from data.fetch import default_cache_dir
from data.shards import SkipCounter, expand_shards
from llm.reward import RewardModel, answer_labels, dpo_loss, pairwise_loss, sequence_logps
from llm.tokenizer import ChatFormat
from mm.config import PostTrainConfig
from mm.train.distributed import full_state, init_distributed, rank_slice, unwrap, wrap_model
from mm.eval.chat import answer_accuracy, implicit_reward_accuracy, preference_accuracy
from mm.model.runs import load_lm, save_lm, save_reward_model
from mm.stages.lm_pretrain import lm_loss
from mm.train.trainer import StepOutput, Trainer, warmup_cosine


def read_chat(spec: str | list, build_if_missing: bool, skips: SkipCounter) -> list[dict]:
    """Chat/preference examples from shards; builds the chat kit into the default cache if nothing matches."""
    from data.chat_kit import build_chat_kit, iter_chat

    try:
        paths = expand_shards(spec)
    except FileNotFoundError:
        if not build_if_missing:
            raise
        out = default_cache_dir().parent / "shards"
        print(f"[post-training] no shards at {spec!r}: building the chat kit into {out}", file=sys.stderr)
        build_chat_kit(default_cache_dir(), out)
        paths = expand_shards(spec)
    return list(iter_chat(paths, skips))


def special_ids(tok) -> set[int]:
    """Ids of every special (formatting) token: masked out of the DPO loss."""
    return set(tok.special_ids)


def preference_data(cfg: PostTrainConfig, tok, skips: SkipCounter):
    """Encoded (train pairs, number dropped as too long, held-out pairs) from the preference shards and
    extra_pref_shards; the training pairs of one half only when data.pref_half is set (held-out pairs stay whole)."""
    fmt, build = ChatFormat(tok), cfg.data.build_if_missing
    examples = read_chat(cfg.data.pref_shards, build, skips)
    for extra in cfg.data.extra_pref_shards:
        try:
            examples += read_chat(extra, False, skips)
        except FileNotFoundError:  # e.g. rejection sampling found no wrong sample this round
            print(f"[post-training] warning: no extra preference shards match {extra!r}", file=sys.stderr)
    if cfg.data.pref_half is not None:
        examples = pair_half(examples, cfg.data.pref_half)
    pairs, dropped = encode_pairs(examples, fmt, cfg.seq_len)
    val_pairs, _ = encode_pairs(read_chat(cfg.data.pref_val_shards, build, skips), fmt, cfg.seq_len)
    return pairs, dropped, val_pairs


def _setup(cfg: PostTrainConfig, run_dir: Path):
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    model, tok, meta = load_lm(cfg.init_from)
    if info.is_main:
        tok.save(run_dir / "tokenizer.json")
        (run_dir / "model_config.json").write_text(json.dumps(model.cfg.to_dict(), indent=1))
    return info, model.train(), tok


def _lr(cfg: PostTrainConfig):
    t = cfg.train
    return lambda step: warmup_cosine(step, t.lr, t.warmup_steps, cfg.steps, t.min_lr_ratio)


def run_sft(cfg: PostTrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Supervised finetuning on chat shards (+ extra_shards such as rejection-sampled dialogs)."""
    info, model, tok = _setup(cfg, run_dir)
    fmt, skips = ChatFormat(tok), SkipCounter()
    train = read_chat(cfg.data.shards, cfg.data.build_if_missing, skips)
    for extra in cfg.data.extra_shards:
        try:
            train += read_chat(extra, False, skips)
        except FileNotFoundError:  # e.g. rejection sampling kept nothing this round
            print(f"[lm_sft] warning: no extra shards match {extra!r}; training on the base data only", file=sys.stderr)
    val = read_chat(cfg.data.val_shards, cfg.data.build_if_missing, skips)
    dialogs, dropped = encode_dialogs(train, fmt, cfg.seq_len + 1)
    packer = ChatPacker(dialogs, tok.pad_id, cfg.seed)
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    bs = cfg.train.batch_size

    def batches(step):
        rows = rank_slice(bs, info)
        return [{k: v[rows].to(info.device) for k, v in packer.batch(step, i, bs, cfg.seq_len).items()}
                for i in range(cfg.train.grad_accum)]

    val_gold = [ex for ex in val if ex.get("answer")][:200]
    trainer = Trainer(net, cfg.train, run_dir, loss_fn=lm_loss, lr_at=_lr(cfg), info=info, desc="lm_sft")
    if resume:
        trainer.resume()
    trainer.fit(batches, cfg.steps, evaluate=lambda s: {"val_exact_match": answer_accuracy(unwrap(net), tok, val_gold)})
    state, _ = full_state(net)
    result = {"stage": "lm_sft", "steps": cfg.steps, "train_dialogs": len(dialogs), "dropped_too_long": dropped,
              "skipped": skips.as_dict()}
    if info.is_main:
        result["val_exact_match"] = answer_accuracy(unwrap(net), tok, val_gold)
        save_lm(run_dir / "final", state, unwrap(net).cfg, tok,
                {"stage": "lm_sft", "chat": cfg.chat, "init_from": str(cfg.init_from)})
    return result


def run_rm(cfg: PostTrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Reward model: the LM plus a scalar head, pairwise loss without margin."""
    info, lm, tok = _setup(cfg, run_dir)
    skips = SkipCounter()
    pairs, dropped, val_pairs = preference_data(cfg, tok, skips)
    sampler = PairSampler(pairs, tok.pad_id, cfg.seed)
    torch.manual_seed(cfg.seed)
    rm = wrap_model(RewardModel(lm).to(info.device), cfg.train.parallel, info)
    bs = cfg.train.batch_size

    def batches(step):
        return [{k: v.to(info.device) for k, v in sampler.batch(step, i, bs, rank_slice(bs, info)).items()}
                for i in range(cfg.train.grad_accum)]

    def loss_fn(model, mb):
        n = len(mb["tokens"]) // 2
        if not cfg.rm_nll_weight:
            r = model(mb["tokens"], mb["last"])
            return StepOutput(pairwise_loss(r[:n], r[n:]), n, {"pair_acc": (r[:n] > r[n:]).float().mean().item()})
        r, nll = model(mb["tokens"], mb["last"], answer_labels(mb["tokens"][:n], mb["resp"][:n]))
        pair = pairwise_loss(r[:n], r[n:])
        return StepOutput(pair + cfg.rm_nll_weight * nll, n,
                          {"pair_acc": (r[:n] > r[n:]).float().mean().item(), "pair_loss": pair.item(), "nll": nll.item()})

    val_eval = val_pairs[:300]
    trainer = Trainer(rm, cfg.train, run_dir, loss_fn=loss_fn, lr_at=_lr(cfg), info=info, desc="lm_rm")
    if resume:
        trainer.resume()
    trainer.fit(batches, cfg.steps, evaluate=lambda s: {"val_pref_acc": preference_accuracy(unwrap(rm), tok, val_eval)})
    state, _ = full_state(rm)
    result = {"stage": "lm_rm", "steps": cfg.steps, "train_pairs": len(pairs), "dropped_too_long": dropped,
              "skipped": skips.as_dict()}
    if info.is_main:
        result["rm_pref_acc"] = preference_accuracy(unwrap(rm), tok, val_pairs)
        save_reward_model(run_dir / "final", state, lm.cfg, tok, {"stage": "lm_rm", "init_from": str(cfg.init_from)})
    return result


class EMAReference:
    """Reference weights that follow the policy: ref <- decay * ref + (1 - decay) * policy every k steps.

    keys: the state-dict entries that follow (default all); others (e.g. a frozen LM shared by policy and
    reference) are left alone. The current reference is kept in trainer.extras["ref"], so a resume restores it."""

    def __init__(self, ref: torch.nn.Module, trainer: Trainer, decay: float, keys=None):
        self.ref, self.trainer, self.decay = ref, trainer, decay
        self.keys = set(keys) if keys is not None else set(ref.state_dict())
        self.trainer.extras["ref"] = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ref.state_dict().items() if k in self.keys}

    def restore(self) -> None:
        """Load the reference from trainer.extras["ref"] (after Trainer.resume)."""
        self.ref.load_state_dict(self.trainer.extras["ref"], strict=False)

    @torch.no_grad()
    def update(self) -> None:
        pol, _ = full_state(self.trainer.model)
        for k, v in self.ref.state_dict().items():
            if k in self.keys:
                v.mul_(self.decay).add_(pol[k].to(v.device, v.dtype), alpha=1 - self.decay)
        self.trainer.extras["ref"] = self._snapshot()


def run_dpo(cfg: PostTrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Direct preference optimisation of the policy against a frozen (or EMA) reference."""
    info, policy, tok = _setup(cfg, run_dir)
    skips = SkipCounter()
    pairs, dropped, val_pairs = preference_data(cfg, tok, skips)
    fmt_ids = special_ids(tok)
    sampler = PairSampler(pairs, tok.pad_id, cfg.seed, fmt_ids)
    ref = copy.deepcopy(policy).to(info.device).eval().requires_grad_(False)
    net = wrap_model(policy.to(info.device), cfg.train.parallel, info)
    bs = cfg.train.batch_size

    def batches(step):
        return [{k: v.to(info.device) for k, v in sampler.batch(step, i, bs, rank_slice(bs, info)).items()}
                for i in range(cfg.train.grad_accum)]

    def loss_fn(model, mb):
        logp, count = sequence_logps(model, mb["tokens"], mb["resp"])
        with torch.no_grad():
            ref_logp, _ = sequence_logps(ref, mb["tokens"], mb["resp"])
        n = len(logp) // 2
        pref, margin = dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], cfg.beta)
        nll = -logp[:n] / count[:n].clamp(min=1)
        loss = (pref + cfg.nll_weight * nll).mean()
        return StepOutput(loss, n, {"chosen_frac": (margin > 0).float().mean().item(), "margin": margin.mean().item()})

    trainer = Trainer(net, cfg.train, run_dir, loss_fn=loss_fn, lr_at=_lr(cfg), info=info, desc="lm_dpo")
    ema = None
    if cfg.reference == "ema":
        ema = EMAReference(ref, trainer, cfg.ema_decay)
    elif cfg.reference != "frozen":
        raise ValueError(f"reference must be 'frozen' or 'ema', got {cfg.reference!r}")
    if resume:
        trainer.resume()
        if ema is not None:
            ema.restore()

    def on_step(step, out):
        if ema is not None and step % cfg.ema_every == 0:
            ema.update()

    val_eval = val_pairs[:300]
    trainer.fit(batches, cfg.steps, on_step=on_step,
                evaluate=lambda s: {"val_chosen_frac": implicit_reward_accuracy(unwrap(net), ref, tok, val_eval)})
    state, _ = full_state(net)
    result = {"stage": "lm_dpo", "steps": cfg.steps, "train_pairs": len(pairs), "dropped_too_long": dropped,
              "reference": cfg.reference, "skipped": skips.as_dict()}
    if info.is_main:
        frozen_ref, _, _ = load_lm(cfg.init_from)
        result["chosen_frac"] = implicit_reward_accuracy(unwrap(net), frozen_ref, tok, val_pairs)
        save_lm(run_dir / "final", state, unwrap(net).cfg, tok,
                {"stage": "lm_dpo", "chat": cfg.chat, "init_from": str(cfg.init_from)})
    return result
