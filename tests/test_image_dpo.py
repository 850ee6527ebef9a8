"""Stage image_dpo (PAPER.md §7.3): error injection (wrong number / word / object), the reference sharing the frozen LM
and following only the trainable tensors by EMA, and the stage through `mm run`: LM untouched, adapter trained,
exact resume (the EMA reference is restored from the checkpoint)."""
from __future__ import annotations

import random

import pytest
import torch

from data.chat_tasks import normalise_answer
from mm.model.checkpoint import load_tensors
from mm.model.runs import load_lm
from mm.model.store import load_model
from mm.stages.image_dpo import inject_error
from tests.test_image_stage import _overrides, _run, world  # noqa: F401  (module-level fixture / helpers)

pytestmark = pytest.mark.usefixtures("one_thread")
DPO_YAML = "experiments/image/image_dpo_tiny.yaml"


def test_inject_error_kinds():
    rng = random.Random(0)
    for _ in range(20):
        kind, rej = inject_error("3", ["3", "three"], [], rng)
        assert kind == "wrong_number" and rej != "3" and abs(int(rej) - 3) <= 2
    kind, rej = inject_error("0", ["0"], [], rng)
    assert kind == "wrong_number" and int(rej) in (1, 2)
    cap = "a red bag on the table"
    kind, rej = inject_error(cap, [cap], ["a green sandal near water"], rng)
    a, b = cap.split(), rej.split()
    assert kind == "wrong_word" and len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    kind, rej = inject_error("bag", ["bag", "Bag."], ["sandal"], rng, choices=["bag", "shirt"])
    assert (kind, rej) == ("wrong_object", "shirt")
    kind, rej = inject_error("bag", ["bag"], ["bag", "sandal"], rng)  # no options: another answer of the family
    assert (kind, rej) == ("wrong_object", "sandal")
    assert inject_error("yes", ["yes", "Yes"], ["yes"], rng, choices=["yes"]) is None
    for ans, refs in (("7", ["7", "seven"]), ("tall tree by river", ["tall tree by river"])):
        out = inject_error(ans, refs, ["short bush near lake", "7"], rng)
        assert out is not None and normalise_answer(out[1]) not in {normalise_answer(r) for r in refs}


def test_reference_shares_lm_and_ema_touches_only_trainable(world):  # noqa: F811
    from mm.config import load_config
    from mm.stages.image_dpo import frozen_copy
    from mm.stages.image_pretrain import build_model
    from mm.stages.lm_post import EMAReference

    cfg = load_config(DPO_YAML, [o for o in _overrides(world)] + [f"init_from=null"])
    model, _, _ = build_model(cfg)
    model.train_only("image")
    ref = frozen_copy(model)
    lm_names = model._lm_names()
    pol, rp = dict(model.named_parameters()), dict(ref.named_parameters())
    assert pol.keys() == rp.keys() and not any(p.requires_grad for p in rp.values())
    for k in pol:
        assert (pol[k] is rp[k]) == (k in lm_names)  # LM shared, everything else its own copy

    class _T:  # the two things EMAReference reads from a Trainer
        extras: dict = {}
        model = None

    t = _T()
    t.model, t.extras = model, {}
    keys = [k for k in pol if pol[k].requires_grad]
    ema = EMAReference(ref, t, 0.5, keys)
    lm_before = {k: v.clone() for k, v in model.state_dict().items() if k in lm_names}
    with torch.no_grad():
        for k in keys:
            pol[k].add_(1.0)
    old = {k: rp[k].clone() for k in keys}
    ema.update()
    for k in keys:
        torch.testing.assert_close(rp[k], old[k] + 0.5)
    for k, v in model.state_dict().items():
        if k in lm_names:
            assert torch.equal(v, lm_before[k])  # the shared LM was not written by the EMA
    assert set(t.extras["ref"]) == set(keys)


def test_image_dpo_stage_trains_adapter_keeps_lm_and_resumes(world, tmp_path, monkeypatch):  # noqa: F811
    from tests.test_image_stage import REPO

    monkeypatch.chdir(REPO)
    img = tmp_path / "img"
    _run(world, img, "steps=1")
    common = [o for o in _overrides(world) if not o.startswith(("steps=", "train.ckpt_every="))]

    def dpo(out, *extra):
        from tests.test_image_sft import _main

        return _main("run", DPO_YAML, "--out", str(out), *common, f"init_from={img}", "steps=4",
                     "train.ckpt_every=2", "ema_every=1", "eval_items=6", *extra)

    res = dpo(tmp_path / "full")
    assert res["stage"] == "image_dpo" and 0.0 <= res["chosen_frac"] <= 1.0
    full = load_tensors(tmp_path / "full" / "final" / "model.safetensors")
    init = load_tensors(img / "final" / "model.safetensors")
    assert full.keys() == init.keys() and any(not torch.equal(full[k], init[k]) for k in full)
    model, _, _ = load_model(tmp_path / "full")
    lm, _, _ = load_lm(world["lm"])
    toks = torch.randint(0, lm.cfg.vocab_size - 20, (2, 9))
    assert torch.equal(model(toks), lm.eval()(toks))  # no image: bitwise the bare LM after DPO
    # interrupted after step 2 and resumed == uninterrupted (optimizer, data order and the EMA reference restored)
    part = dpo(tmp_path / "part", "train.stop_after=2")
    assert part.get("stopped_at") is not None
    from mm.cli import main

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", DPO_YAML, "--out", str(tmp_path / "part"), *common, f"init_from={img}", "steps=4",
                     "train.ckpt_every=2", "ema_every=1", "eval_items=6", "--resume"]) == 0
    resumed = load_tensors(tmp_path / "part" / "final" / "model.safetensors")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
