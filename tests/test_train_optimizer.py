"""mm.train.trainer.build_optimizer / Trainer: the gate LR multiplier (train.gate_lr_mult). The tanh gates get their own
group run at lr * mult (they really move that much faster), nothing else changes, the default keeps the two
previous groups (so every other stage and its old optimizer states are untouched), and resume keeps the split."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mm.config import TrainConfig
from mm.train.distributed import DistInfo
from mm.train.trainer import StepOutput, Trainer, build_optimizer, is_gate

pytestmark = pytest.mark.usefixtures("one_thread")
LR = 1e-3


class Gated(nn.Module):
    """y = x + tanh(gate_attn) * proj(norm(x)): a gate that starts at 0, as in the cross-attention blocks."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))  # the ViT's naming (*_gate)

    def forward(self, x):
        return x + torch.tanh(self.gate_attn + self.pre_tile_gate) * self.proj(self.norm(x))


def _loss(m, mb):
    return StepOutput(((m(mb["x"]) - mb["y"]) ** 2).mean(), 1)


def _batch(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(step)
    return [{"x": torch.randn(4, 8, generator=g), "y": torch.randn(4, 8, generator=g)}]


def _trainer(tmp_path, mult: float) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(gate_lr_mult=mult, progress=False, dtype="fp32", device="cpu", log_every=1, ckpt_every=1,
                      keep_last=1, grad_clip=0.0)
    return Trainer(Gated(), cfg, tmp_path, loss_fn=_loss, lr_at=lambda s: LR, info=DistInfo(), desc="t")


def test_is_gate_names():
    assert is_gate("fused.video_adapter.xattn.blocks.3.gate_attn") and is_gate("module.blocks.1.gate_ffn")
    assert is_gate("vision.pre_tile_gate") and is_gate("vision.gated.0.gate_mlp")
    assert not is_gate("blocks.3.wq.weight") and not is_gate("gate.weight") and not is_gate("aggregate_w")


def test_default_keeps_the_two_groups():
    m = Gated()
    for params in (m.parameters(), m.named_parameters()):
        groups = build_optimizer(params, TrainConfig(), torch.device("cpu")).param_groups
        assert len(groups) == 2 and all("lr_mult" not in g for g in groups)
        assert {id(p) for p in groups[0]["params"]} == {id(m.proj.weight)}
    with pytest.raises(ValueError, match="named_parameters"):
        build_optimizer(m.parameters(), TrainConfig(gate_lr_mult=10.0), torch.device("cpu"))


def test_gate_group_runs_at_lr_times_mult(tmp_path):
    mult = 10.0
    base, fast = _trainer(tmp_path / "a", 1.0), _trainer(tmp_path / "b", mult)
    groups = fast.optimizer.param_groups
    assert len(groups) == 3 and groups[2]["lr_mult"] == mult and groups[2]["weight_decay"] == 0.0
    assert {id(p) for p in groups[2]["params"]} == {id(fast.model.gate_attn), id(fast.model.pre_tile_gate)}
    assert not {id(p) for p in groups[2]["params"]} & {id(p) for g in groups[:2] for p in g["params"]}
    for t in (base, fast):
        t.train_step(_batch(0))
    assert [g["lr"] for g in groups] == [LR, LR, LR * mult]
    # Adam's first step moves each scalar by ~lr (|m / sqrt(v)| = 1): the gates by lr * mult, the rest as before
    assert fast.model.gate_attn.abs().item() == pytest.approx(LR * mult, rel=1e-3)
    assert base.model.gate_attn.abs().item() == pytest.approx(LR, rel=1e-3)
    assert torch.equal(base.model.proj.weight, fast.model.proj.weight)  # gates were 0: same step for the rest


def test_resume_keeps_the_gate_group(tmp_path):
    t = _trainer(tmp_path, 10.0)
    t.fit(_batch, 2)
    fresh = _trainer(tmp_path, 10.0)
    assert fresh.resume() == 2
    assert fresh.optimizer.param_groups[2]["lr_mult"] == 10.0
    assert torch.equal(fresh.model.gate_attn, t.model.gate_attn)
    fresh.train_step(_batch(2))
    assert fresh.optimizer.param_groups[2]["lr"] == LR * 10.0


def test_adam_eps_sets_how_far_tiny_gradients_move():
    """Gradients ~1e-10 (an adapter behind a near-0 gate): eps 1e-8 (default) barely moves the weight, 1e-12 moves
    it by ~lr (Adam's first step is lr * g / (|g| + eps))."""
    moved = {}
    for eps in (1e-8, 1e-12):
        w = nn.Parameter(torch.ones(4))
        opt = build_optimizer([("w", w)], TrainConfig(adam_eps=eps, lr=LR), torch.device("cpu"))
        assert all(g["eps"] == eps for g in opt.param_groups)
        (1e-10 * w.sum()).backward()
        opt.step()
        moved[eps] = (1 - w.detach()).abs().max().item()
    assert moved[1e-8] < 0.02 * LR and moved[1e-12] == pytest.approx(LR, rel=0.02)


def test_lr_mult_groups_run_named_parameters_at_their_own_lr(tmp_path):
    """train.lr_mult {name part: mult}: the matching parameters form their own decayed / undecayed groups at
    lr * mult; the rest keep the two default groups; a step moves them in proportion."""
    m = Gated()
    cfg = TrainConfig(lr_mult={"proj": 0.1}, weight_decay=0.5)
    groups = build_optimizer(m.named_parameters(), cfg, torch.device("cpu")).param_groups
    mults = {id(p): g.get("lr_mult", 1.0) for g in groups for p in g["params"]}
    assert mults[id(m.proj.weight)] == 0.1 and mults[id(m.gate_attn)] == 1.0
    slow = next(g for g in groups if id(m.proj.weight) in {id(p) for p in g["params"]})
    assert slow["weight_decay"] == 0.5 and len(slow["params"]) == 1
    with pytest.raises(ValueError, match="named_parameters"):
        build_optimizer(m.parameters(), cfg, torch.device("cpu"))
    torch.manual_seed(0)
    tcfg = TrainConfig(lr_mult={"proj": 0.1}, progress=False, dtype="fp32", device="cpu", log_every=1, ckpt_every=1,
                       keep_last=1, grad_clip=0.0, weight_decay=0.0)
    t = Trainer(Gated(), tcfg, tmp_path, loss_fn=_loss, lr_at=lambda s: LR, info=DistInfo(), desc="t")
    with torch.no_grad():
        t.model.gate_attn.fill_(0.5)  # an open gate, so proj gets a gradient
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_step(_batch(0))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in t.model.named_parameters()}
    # Adam's first step moves every parameter by about its group's LR
    assert moved["proj.weight"] == pytest.approx(0.1 * LR, rel=0.05)
    assert moved["gate_attn"] == pytest.approx(LR, rel=0.05)
