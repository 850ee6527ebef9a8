"""Stage image_sft (PAPER.md §7.2; DESIGN.md invariants 4, 6): sweep members hot-swap the LM to the instruct LM
(frozen) and train ViT + adapter from init_from; final/ is the mean of the top-K members' trainable tensors, holds no LM
tensors, loads with the instruct LM; the result lists members and the soup score; a rerun reuses the members."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from llm.model import Llama, LlamaConfig
from mm.model.checkpoint import load_tensors
from mm.model.runs import load_lm, save_lm
from mm.model.store import load_model
from tests.test_image_stage import _overrides, world  # noqa: F401  (module-level fixtures / helpers)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
YAML = "experiments/image/image_sft_tiny.yaml"
IMAGE_PARTS = ("image.encoder.", "image.adapter.", "image.token.")  # where an image run's tensors live (no LM)


def _main(*argv: str) -> dict:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0, res
    return res


@pytest.fixture(scope="module")
def sft_world(world):  # noqa: F811
    """world + an 'instruct' LM (same shape and tokenizer, other weights) + a 1-step image_pretrain run."""
    root = world["root"]
    _, tok, meta = load_lm(world["lm"])
    cfg = LlamaConfig(**meta["model_config"])
    torch.manual_seed(7)
    save_lm(root / "instruct" / "final", Llama(cfg).state_dict(), cfg, tok, {"stage": "lm_dpo"})
    _main("run", "experiments/image/image_pretrain_tiny.yaml", "--out", str(root / "img"), *_overrides(world),
          "steps=1")
    return {**world, "instruct": root / "instruct", "img": root / "img"}


def _sft(w: dict, out: Path, *extra: str) -> dict:
    ov = [o for o in _overrides(w) if not o.startswith(("steps=", "train.ckpt_every=", "train.lr="))]
    return _main("run", YAML, "--out", str(out), *ov, f"instruct_lm={w['instruct']}", f"init_from={w['img']}",
                 "steps=2", "train.ckpt_every=2", "sweep=[{seed: 1, lr: 0.01}, {seed: 2, lr: 0.003}]",
                 "soup_top_k=2", "soup_min_k=2", "eval_items=4", *extra)


def test_image_sft_soup_hot_swap_and_reuse(sft_world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sft"
    res = _sft(sft_world, out)
    assert res["stage"] == "image_sft" and [m["seed"] for m in res["members"]] == [1, 2]
    assert [m["reused"] for m in res["members"]] == [False, False]
    assert all(m["vqa_acc"] is not None for m in res["members"])
    assert res["soup_vqa_acc"] is not None and sorted(res["soup_members"]) == [0, 1]
    assert res["soup_blind_vqa_acc"] is not None and res["soup_shuffled_vqa_acc"] is not None  # the final's controls
    assert res["soup_vs_best"] == pytest.approx(res["soup_vqa_acc"] - res["best_member_vqa_acc"])
    assert res["soup_k"] == 2 and list(res["soup_candidates"]) == ["2"]
    # the soup = the mean of the two members' trainable (ViT + adapter) tensors; no LM tensors in any final file
    a, b = (load_tensors(out / "members" / str(i) / "final" / "model.safetensors") for i in (0, 1))
    soup = load_tensors(out / "final" / "model.safetensors")
    assert soup.keys() == a.keys() == b.keys() and all(k.startswith(IMAGE_PARTS) for k in soup)
    assert not any(k.startswith(("layers.", "tok_embeddings", "output", "norm")) for k in soup)
    for k in soup:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the members differ (seed / LR)
    init = load_tensors(sft_world["img"] / "final" / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # members trained from init_from
    # hot-swap: the soup (and a member's full step checkpoint) carry the instruct LM, not the pretrained one
    inst = load_tensors(sft_world["instruct"] / "final" / "model.safetensors")
    base = load_tensors(sft_world["lm"] / "final" / "model.safetensors")
    model, _, _ = load_model(out)
    lm_sd = model.lm.state_dict()
    assert all(torch.equal(lm_sd[k], v) for k, v in inst.items())
    assert any(not torch.equal(lm_sd[k], base[k]) for k in base)
    ck = sorted((out / "members" / "0" / "checkpoints").glob("step_*"))[-1]
    c = load_tensors(ck / "model.safetensors")
    assert all(torch.equal(c[k], v) for k, v in inst.items())  # frozen through training
    # a rerun (top-level result removed with --force) reuses both members and rebuilds the same soup
    res2 = _sft(sft_world, out, "--force")
    assert [m["reused"] for m in res2["members"]] == [True, True]
    assert [m["vqa_acc"] for m in res2["members"]] == [m["vqa_acc"] for m in res["members"]]
    soup2 = load_tensors(out / "final" / "model.safetensors")
    assert all(torch.equal(soup2[k], soup[k]) for k in soup)
    # a third member and soup_min_k 1: the best member alone (K = 1) and the soups of the top 2 and top 3 are scored
    # and the best is final/ (PAPER.md §7.2), so the soup never ends below its best member
    res3 = _main("run", YAML, "--out", str(out), "--force",
                 *[o for o in _overrides(sft_world) if not o.startswith(("steps=", "train.ckpt_every=", "train.lr="))],
                 f"instruct_lm={sft_world['instruct']}", f"init_from={sft_world['img']}", "steps=2",
                 "train.ckpt_every=2", "sweep=[{seed: 1, lr: 0.01}, {seed: 2, lr: 0.003}, {seed: 3, lr: 0.01}]",
                 "soup_top_k=3", "soup_min_k=1", "eval_items=4")
    assert [m["reused"] for m in res3["members"]] == [True, True, False]
    cands = {int(k): v for k, v in res3["soup_candidates"].items()}
    assert sorted(cands) == [1, 2, 3] and res3["soup_k"] == max(cands, key=lambda k: (cands[k], k))
    assert cands[1] == max(m["vqa_acc"] for m in res3["members"]) and res3["soup_vs_best"] >= 0
    assert res3["soup_vqa_acc"] == cands[res3["soup_k"]] and len(res3["soup_members"]) == res3["soup_k"]
    parts = [load_tensors(out / "members" / str(i) / "final" / "model.safetensors") for i in res3["soup_members"]]
    soup3 = load_tensors(out / "final" / "model.safetensors")
    for k in soup3:
        torch.testing.assert_close(soup3[k], sum(p[k] for p in parts) / len(parts))
    from mm.cli import main

    buf = io.StringIO()  # soup_min_k outside 1..2: one clear error before anything trains
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["run", YAML, "--out", str(tmp_path / "bad"), *_overrides(sft_world),
                   f"instruct_lm={sft_world['instruct']}", f"init_from={sft_world['img']}", "soup_min_k=3"])
    assert rc != 0 and "soup_min_k must be 1" in buf.getvalue(), buf.getvalue()
    assert not (tmp_path / "bad" / "members").exists()
    # a member trained with other settings is not silently reused: without --force the stage is refused, with it
    # the member is retrained and says why
    for force in ((), ("--force",)):
        buf, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            rc = main(["run", YAML, "--out", str(out), *force, *[o for o in _overrides(sft_world)
                                                                 if not o.startswith("steps=")],
                       f"instruct_lm={sft_world['instruct']}", f"init_from={sft_world['img']}", "steps=3",
                       "sweep=[{seed: 1, lr: 0.01}]", "soup_top_k=1", "eval_items=4"])
        res = json.loads(buf.getvalue().strip().splitlines()[-1])
        if not force:
            assert rc == 2 and "steps was 2, now 3" in res["error"], res
        else:
            assert rc == 0 and res["members"][0]["reused"] is False, res
            assert "retraining member 0: it was trained with steps=2, the config says 3" in err.getvalue()
    # a setting outside the member's seed / LR / steps (here the adapter's LR multiplier) also retrains it
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = main(["run", YAML, "--out", str(out), "--force", *[o for o in _overrides(sft_world)
                                                                if not o.startswith("steps=")],
                   f"instruct_lm={sft_world['instruct']}", f"init_from={sft_world['img']}", "steps=3",
                   "sweep=[{seed: 1, lr: 0.01}]", "soup_top_k=1", "eval_items=4",
                   "train.lr_mult={image.adapter.: 2.0}"])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0 and res["members"][0]["reused"] is False, res
    assert "retraining member 0: it was trained with config_sha256=" in err.getvalue()


def test_member_trains_vit_and_adapter_only_over_the_instruct_lm(sft_world):
    from mm.config import SweepMember, load_config
    from mm.stages.image_pretrain import build_model
    from mm.stages.image_sft import member_config

    w = sft_world
    cfg = load_config(REPO / YAML, [*_overrides(w), f"instruct_lm={w['instruct']}", f"init_from={w['img']}",
                                    "sweep=[{seed: 5, lr: 0.002}]", "soup_top_k=1"])
    mcfg = member_config(cfg, cfg.sweep[0])
    assert (mcfg.seed, mcfg.train.lr) == (5, 0.002) and cfg.sweep == [SweepMember(seed=5, lr=0.002)]
    model, _, lm_path = build_model(mcfg)
    model.train_only("image")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    vit = {f"image.encoder.{n}" for n, _ in model.image.encoder.named_parameters()}
    adapter = {f"image.adapter.{n}" for n, _ in model.image.adapter.named_parameters()}
    assert names == vit | adapter | {"image.token.weight"}
    assert lm_path == (w["instruct"] / "final").resolve()
    inst = load_tensors(w["instruct"] / "final" / "model.safetensors")
    init = load_tensors(w["img"] / "final" / "model.safetensors")
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in inst.items())  # LM = instruct (hot-swapped)
    assert all(torch.equal(sd[k], v) for k, v in init.items())  # ViT + adapter = init_from, untouched by the swap


def test_member_of_a_retrained_instruct_lm_is_not_reused(sft_world, tmp_path, monkeypatch):
    """The same instruct_lm path with other weights (the LM retrained since): the member is retrained (and says so),
    not reused."""
    import shutil

    from mm.cli import main

    monkeypatch.chdir(REPO)
    inst = tmp_path / "instruct"
    shutil.copytree(sft_world["instruct"], inst)
    w, out = {**sft_world, "instruct": inst}, tmp_path / "sft"
    one = ("sweep=[{seed: 1, lr: 0.01}]", "soup_top_k=1")
    assert _sft(w, out, *one)["members"][0]["reused"] is False
    assert _sft(w, out, "--force", *one)["members"][0]["reused"] is True  # same weights: reused
    final = out / "members" / "0" / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    again = _sft(w, out, "--force", *one, "eval_items=2")  # other scoring items: scored again, not retrained
    assert again["members"][0]["reused"] is False and final.stat().st_mtime_ns == stamp
    assert json.loads((out / "members" / "0" / "result.json").read_text())["eval_items"] == 2
    _, tok, meta = load_lm(inst)
    cfg = LlamaConfig(**meta["model_config"])
    torch.manual_seed(8)
    shutil.rmtree(inst / "final")
    save_lm(inst / "final", Llama(cfg).state_dict(), cfg, tok, {"stage": "lm_dpo"})  # retrained at the same path
    buf = io.StringIO()
    ov = [o for o in _overrides(w) if not o.startswith(("steps=", "train.ckpt_every=", "train.lr="))]
    errs = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(errs):
        rc = main(["run", YAML, "--out", str(out), "--force", *ov, f"instruct_lm={inst}", f"init_from={w['img']}",
                   "steps=2", "train.ckpt_every=2", "eval_items=4", *one])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0 and res["members"][0]["reused"] is False, res
    assert "retraining member 0: it was trained with instruct_lm_sha256=" in errs.getvalue()
