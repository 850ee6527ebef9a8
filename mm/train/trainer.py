"""The one training loop every stage uses: AdamW, schedules, accumulation, clipping, autocast, checkpoints, resume."""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm import tqdm

from mm.model.checkpoint import (CheckpointError, list_checkpoints, load_meta, load_state, load_tensors, prune, save_weights,
                           step_dir, verify_checkpoint)
from mm.train.distributed import DistInfo, full_state, load_full_state
from mm.train.metrics import MetricsLogger, mfu, peak_flops


@dataclass
class TrainConfig:
    """Optimizer, schedule and loop settings shared by every stage."""

    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    gate_lr_mult: float = 1.0  # LR multiplier of the scalar tanh gates (gate_* / *_gate); 1.0: one LR for all
    lr_mult: dict[str, float] = field(default_factory=dict)  # {parameter-name part: LR multiplier}, e.g. image.encoder.
    adam_eps: float = 1e-8  # AdamW eps (torch's default); adapters behind a near-0 gate see gradients below it
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 100
    keep_last: int = 2
    stop_after: int = 0  # stop at this global step, after checkpointing, without finishing (resume later); 0 = off
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # ddp / fsdp under torchrun
    progress: bool = True



class TrainingDiverged(RuntimeError):
    """Raised when the loss or gradient norm is NaN/inf; the last good checkpoint is left as it was.

    The step it names is 1-based, as in metrics.jsonl and the progress bar (step k = the k-th optimizer update).
    """


class Preempted(RuntimeError):
    """SIGTERM / SIGINT stopped training at a step boundary, after writing a checkpoint there (resume with --resume)."""

    def __init__(self, signame: str, step: int, checkpoint: str):
        super().__init__(f"{signame} at step {step}: checkpoint {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def preemption_flag():
    """While active, SIGTERM / SIGINT only set flag["signal"] (a second one aborts at once); handlers restored after.
    Outside the main thread (no signal handlers there) the flag never fires."""
    flag: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:  # the second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        print(f"[mm] {flag['signal']}: checkpointing at the next step boundary, then stopping (again to abort)",
              file=sys.stderr, flush=True)

    old = {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def warmup_cosine(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to peak, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def linear_to_zero(step: int, start_lr: float, begin: int, length: int) -> float:
    """Annealing: LR falls linearly from start_lr at `begin` to 0 after `length` steps."""
    return start_lr * max(0.0, 1.0 - (step - begin + 1) / max(1, length))


def is_gate(name: str) -> bool:
    """Is this parameter a scalar tanh gate (cross-attention gate_attn / gate_ffn, the ViT's gated layers' gate_*,
    *_gate)? Matched on the last name component, so DDP/FSDP prefixes do not matter."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("gate_") or last.endswith("_gate")


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other vectors are not decayed).

    params: parameters, or (name, parameter) pairs (model.named_parameters()). With cfg.gate_lr_mult != 1 and names,
    the tanh gates (is_gate) form their own group, not decayed, whose "lr_mult" makes Trainer.train_step run them at
    lr * gate_lr_mult: a gate that starts at 0 scales the gradient of everything behind it, so a slow gate starves
    its block (the video stages, measured). cfg.lr_mult {name part: mult} gives the parameters whose names contain a
    part (the first that matches) their own decayed / undecayed groups at lr * mult (e.g. a pretrained encoder slower
    than a new adapter). With no multipliers the two groups are exactly the previous ones (old optimizer states still
    load)."""
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    split = cfg.gate_lr_mult != 1.0
    if (split or cfg.lr_mult) and any(not n for n, _ in named):
        raise ValueError("train.gate_lr_mult / train.lr_mult need parameter names: pass model.named_parameters()")
    gates = [p for n, p in named if split and is_gate(n)]
    rest = [(n, p) for n, p in named if not (split and is_gate(n))]
    mult_of = {n: next((float(m) for part, m in cfg.lr_mult.items() if part in n), None) for n, _ in rest}
    groups = [{"params": [p for n, p in rest if p.dim() >= 2 and mult_of[n] is None], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in rest if p.dim() < 2 and mult_of[n] is None], "weight_decay": 0.0}]
    for m in sorted({v for v in mult_of.values() if v is not None}):
        for matrices, decay in ((True, cfg.weight_decay), (False, 0.0)):
            ps = [p for n, p in rest if mult_of[n] == m and (p.dim() >= 2) == matrices]
            groups += [{"params": ps, "weight_decay": decay, "lr_mult": m}] if ps else []
    if split:
        groups.append({"params": gates, "weight_decay": 0.0, "lr_mult": float(cfg.gate_lr_mult)})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, fused=device.type == "cuda")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where asked for or ('auto') where the device supports it well; None means full fp32."""
    if cfg.dtype == "fp32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class StepOutput:
    """What a loss function returns for one micro-batch.

    `loss` is a mean over `tokens` items (e.g. the predicted tokens). A step weights each micro-batch, on every rank,
    by its `tokens`, so the step's loss and gradient are the mean over the whole global batch, whatever the world size
    or accumulation (a plain mean of per-rank means would over-weight a rank with fewer tokens).
    """

    loss: torch.Tensor
    tokens: int
    extra: dict = field(default_factory=dict)


class Trainer:
    """Runs steps [start, total) of a stage; resumable exactly from its step checkpoints.

    `loss_fn(model, micro_batch) -> StepOutput`; `batches(step) -> list of micro-batches` for this rank;
    `lr_at(step) -> float`; `extras` are named tensor groups (e.g. a running weight average) saved with each checkpoint.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, run_dir: Path, *, loss_fn, lr_at: Callable[[int], float],
                 info: DistInfo, flops_per_token: Callable[[int], float] | None = None, desc: str = "train"):
        self.model, self.cfg, self.info = model, cfg, info
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.loss_fn, self.lr_at, self.flops_per_token, self.desc = loss_fn, lr_at, flops_per_token, desc
        self.optimizer = build_optimizer(model.named_parameters(), cfg, info.device)
        self.amp = autocast_dtype(cfg, info.device)
        self.logger = MetricsLogger(self.run_dir, enabled=info.is_main)
        self.peak = peak_flops(info.device)
        self.extras: dict[str, dict[str, torch.Tensor]] = {}
        self.meta: dict = {}
        self.step = 0
        self.stopped_at: int | None = None  # set by fit() when train.stop_after ended it before total_steps
        self._flag: dict | None = None  # preemption_flag() while fit() runs
        self._stop_requested = False  # a rank got SIGTERM / SIGINT: checkpoint after this step and stop

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write checkpoints/step_N atomically (rank 0) and prune to keep_last."""
        msd, osd = full_state(self.model, self.optimizer)
        if not self.info.is_main:
            return None
        state = {"optimizer": osd, "torch_rng": torch.get_rng_state()}
        meta = {"step": self.step, **self.meta}
        path = save_weights(step_dir(self.ckpt_root, self.step), {"model": msd, **self.extras}, meta, state)
        prune(self.ckpt_root, self.cfg.keep_last)
        return path

    def resume(self) -> int:
        """Load the newest complete checkpoint if there is one; returns the step to continue from."""
        found = list_checkpoints(self.ckpt_root)
        if not found:
            return 0
        reasons = []
        for ckpt in reversed(found):  # the newest one that verifies; a corrupt newer one is skipped, with a warning
            why = verify_checkpoint(ckpt)
            if why is None:
                try:
                    meta, state = load_meta(ckpt), load_state(ckpt)
                    tensors = {name: load_tensors(ckpt / f"{name}.safetensors") for name in ("model", *self.extras)}
                    break
                except CheckpointError as e:
                    why = str(e)
            reasons.append((ckpt, why))
            if self.info.is_main:
                print(f"[{self.desc}] skipping checkpoint {ckpt.name}: {why}", file=sys.stderr, flush=True)
        else:
            raise CheckpointError(f"no checkpoint in {self.ckpt_root} verifies; the newest: {reasons[0][1]}")
        step = int(meta["step"])
        if self.info.enabled:  # every rank must continue from the same step (node-local disks, a failed read)
            lo_hi = torch.tensor([-step, step], dtype=torch.float64, device=self.info.device)
            torch.distributed.all_reduce(lo_hi, op=torch.distributed.ReduceOp.MAX)
            if -lo_hi[0] != lo_hi[1]:
                raise CheckpointError(f"{self.ckpt_root}: ranks would resume from different steps "
                                      f"({int(-lo_hi[0])} .. {int(lo_hi[1])}); are the checkpoints on a shared disk?")
        if self.info.is_main:  # out of the way of keep_last pruning, which would otherwise keep them over good ones
            for bad, _ in reasons:
                bad.rename(bad.with_name(f".corrupt-{bad.name}"))
        load_full_state(self.model, tensors.pop("model"), self.optimizer, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.extras.update(tensors)
        self.step = step
        self.meta = {k: v for k, v in meta.items() if k not in ("step", "files")}
        self.logger.drop_after(self.step, self.desc)  # records past the checkpoint are logged again as training repeats them
        return self.step

    # -- the loop ----------------------------------------------------------------------------------------------
    def _sync_context(self, last: bool):
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if (last or no_sync is None) else no_sync()

    def train_step(self, micro_batches: list) -> dict:
        """Forward/backward over the micro-batches, NaN guard, clip, optimizer step. Returns the step's figures."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # lr_mult: train.lr_mult / gate_lr_mult groups
        self.model.train()
        loss_sum, tokens, extra = torch.zeros((), dtype=torch.float64, device=self.info.device), 0, {}
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            with self._sync_context(i == n - 1), torch.autocast(self.info.device.type, dtype=self.amp or torch.float32,
                                                                 enabled=self.amp is not None):
                out = self.loss_fn(self.model, mb)
            (out.loss * out.tokens).backward()  # a sum over this micro-batch's tokens; normalised below
            loss_sum += out.loss.detach().double() * out.tokens  # stays on the device: no sync per micro-batch
            tokens += out.tokens
            for k, v in out.extra.items():
                extra[k] = extra.get(k, 0.0) + float(v) / n
        signalled = float(self._flag is not None and self._flag["signal"] is not None)
        totals = torch.cat([loss_sum[None], torch.tensor([float(tokens), signalled], dtype=torch.float64,
                                                         device=loss_sum.device)])  # (3,): loss sum, tokens, signal
        if self.info.enabled:
            torch.distributed.all_reduce(totals)  # the signal flag too: every rank stops after the same step
        totals = totals.cpu()
        self._stop_requested = bool(totals[2] > 0)
        global_tokens = float(totals[1])
        loss = totals[0] / max(global_tokens, 1.0)
        # DDP / FSDP averaged the per-rank sums over `world`; rescale so the gradient is the global-batch mean
        scale = self.info.world / max(global_tokens, 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"{self.desc}: non-finite loss ({loss.item()}) at step {self.step + 1}; "
                                   f"last good checkpoint: {self.last_checkpoint()}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        if not torch.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"{self.desc}: non-finite gradient norm at step {self.step + 1}; "
                                   f"last good checkpoint: {self.last_checkpoint()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.item(), "lr": lr, "grad_norm": gnorm.item(), "tokens": int(global_tokens), **extra}

    def last_checkpoint(self) -> str:
        found = list_checkpoints(self.ckpt_root)
        return str(found[-1]) if found else "none"

    def fit(self, batches: Callable[[int], list], total_steps: int, *, on_step: Callable[[int, dict], None] | None = None,
            evaluate: Callable[[int], dict] | None = None, seq_len_at: Callable[[int], int] | None = None) -> list[dict]:
        """Train until `total_steps`, logging, evaluating and checkpointing; returns the logged records.

        With train.stop_after = S (0 < S < total_steps) it stops once the step reaches S, after writing a checkpoint
        there, and sets `self.stopped_at`; the run is then continued with resume() (e.g. for preemptible jobs).
        """
        records = []
        stop = self.cfg.stop_after if 0 < self.cfg.stop_after < total_steps else None
        self.stopped_at = None
        if stop is not None and self.step >= stop:  # already there (e.g. a resumed run that kept the override)
            self.stopped_at = self.step
            return records
        bar = tqdm(total=total_steps, initial=self.step, desc=self.desc, disable=not (self.cfg.progress and self.info.is_main),
                   dynamic_ncols=True, leave=False)
        with preemption_flag() as self._flag:
            try:
                self._loop(batches, total_steps, stop, bar, records, on_step, evaluate, seq_len_at)
            finally:
                self._flag = None
                bar.close()
        return records

    def _loop(self, batches, total_steps, stop, bar, records, on_step, evaluate, seq_len_at) -> None:
        window_t, window_tok = time.perf_counter(), 0
        while self.step < total_steps:
            out = self.train_step(batches(self.step))
            window_tok += out["tokens"]
            bar.update(1)
            if on_step is not None:
                on_step(self.step, out)
            if self.step % self.cfg.log_every == 0 or self.step == total_steps:
                dt = time.perf_counter() - window_t
                tps = window_tok / dt if dt > 0 else 0.0
                rec = {"step": self.step, "stage": self.desc, **{k: v for k, v in out.items() if k != "tokens"},
                       "tokens_per_s": tps}
                if self.flops_per_token is not None:
                    seq = seq_len_at(self.step - 1) if seq_len_at else 0
                    rec["mfu"] = mfu(self.flops_per_token(seq), tps / self.info.world, self.peak)
                records.append(rec)
                self.logger.log(rec)
                bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}")
                window_t, window_tok = time.perf_counter(), 0
            paused = time.perf_counter()  # evaluation and checkpoint time is kept out of tokens/s
            if evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                ev = {"step": self.step, "stage": self.desc, **evaluate(self.step)}
                self.logger.log(ev)
                records.append(ev)
            due = self.step % self.cfg.ckpt_every == 0 or self.step == total_steps or self.step == stop
            if due:
                self.save()
            window_t += time.perf_counter() - paused
            if self.step == stop:
                self.stopped_at = self.step
                break
            if self._stop_requested and self.step < total_steps:  # SIGTERM / SIGINT on some rank during this step
                if not due:
                    self.save()
                raise Preempted(self._flag["signal"] or "a signal on another rank", self.step,
                                str(step_dir(self.ckpt_root, self.step)))


def fit_stage(trainer: Trainer, feed, steps: int, base: Callable[[], dict], **fit_kw
              ) -> tuple[list[dict], float, dict | None]:
    """The stages' fit: trainer.fit(feed, steps, **fit_kw), the feed closed afterwards. Returns (records, training
    seconds, {**base(), stopped_at, checkpoint} when train.stop_after ended the run early, else None)."""
    t0 = time.perf_counter()
    try:
        records = trainer.fit(feed, steps, **fit_kw)
    finally:
        feed.close()
    train_s = round(time.perf_counter() - t0, 1)
    if trainer.stopped_at is None:
        return records, train_s, None
    return records, train_s, {**base(), "stopped_at": trainer.stopped_at, "checkpoint": trainer.last_checkpoint()}


def fit_adapter_stage(trainer: Trainer, feed, cfg, loader, counts: dict, on_step) -> tuple[dict, bool]:
    """fit_stage for the adapter stages (image_*, video_*): (the result so far: stage, steps, skips, parameter counts,
    train_s, first/final loss; or the stop_after early result) and whether the run stopped early."""
    def base() -> dict:
        return {"stage": cfg.stage, "steps": cfg.steps, "skipped": loader.skipped}

    records, train_s, stopped = fit_stage(trainer, feed, cfg.steps, base, on_step=on_step)
    if stopped:
        return stopped, True
    return {**base(), **{f"params_{k}": n for k, n in counts.items()}, "train_s": train_s, **loss_ends(records)}, False


def loss_ends(records: list[dict]) -> dict:
    """{"first_loss", "final_loss"} of the logged records (None when none logged a loss)."""
    losses = [r["loss"] for r in records if "loss" in r]
    return {"first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}
