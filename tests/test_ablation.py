"""Stage `ablation` (mm.stages.ablation) and the paired bootstrap (mm.eval.stats): arms trained on equal budgets, scored on the
same held-out items with their controls, compared by paired bootstrap; completed arms and their scores reused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mm.eval.stats import bootstrap_ci, paired_bootstrap
from tests.test_image_stage import YAML, _overrides, make_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paired_bootstrap_resolves_real_gaps_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400).astype(float)
    same = paired_bootstrap(a, a, n_boot=300)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
    better = np.maximum(a, rng.integers(0, 2, 400))  # right on every item a got right, and more
    d = paired_bootstrap(better, a, n_boot=300)
    assert d["delta"] == pytest.approx(better.mean() - a.mean()) and d["ci95"][0] > 0 and d["p_higher"] == 1.0
    coin = paired_bootstrap(rng.permutation(a), a, n_boot=300)  # the same total, other items: the CI spans 0
    assert coin["ci95"][0] < 0 < coin["ci95"][1]
    errs, words = np.array([1.0, 0, 2, 0]), np.array([4.0, 2, 2, 2])  # a ratio of sums (corpus WER)
    assert paired_bootstrap(errs, np.zeros(4), words, n_boot=50)["a"] == pytest.approx(3 / 10)
    lo, hi = bootstrap_ci(a, n_boot=300)
    assert lo < a.mean() < hi
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(a, a[:-1])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("ablation"))


def test_image_ablation_compares_designs_on_the_same_items_and_reuses_arms(world, tmp_path, monkeypatch):
    from mm.stages import ablation
    from mm.cli import main

    shared = [o for o in _overrides(world) if not o.startswith(("adapter.", "steps=", "train.ckpt_every"))]
    cfg = {"stage": "ablation", "modality": "image", "config": YAML, "overrides": shared + ["steps=6"],
           "arms": [{"name": "xattn", "overrides": ["adapter={kind: gated_xattn, every: 2}"]},
                    {"name": "concat", "overrides": ["adapter={kind: mlp_concat, n_tokens: 2}"]}],
           "eval_shards": f"{world['root']}/val-*.tar", "eval_items": 0, "max_new_tokens": 3, "n_boot": 200}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    table = json.loads((out / "ablation.json").read_text())
    assert table["default"] == "xattn" and set(table["arms"]) == {"xattn", "concat"}
    items = {r["items"] for r in table["arms"].values()}
    assert items == {12}  # all 6 held-out images x 2 questions, the same for both arms
    for r in table["arms"].values():
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["gain"] == pytest.approx(r["accuracy"] - r["shuffled"])
        assert r["params_trainable"] > 0 and r["train_flops_per_sample"] > 0 and r["train_s"] > 0
    x, c = table["arms"]["xattn"], table["arms"]["concat"]
    assert x["vs_default"] == 0 and c["vs_default"] == pytest.approx(c["accuracy"] - x["accuracy"])
    assert c["params_trainable"] != x["params_trainable"] and c["train_flops_per_sample"] != x["train_flops_per_sample"]
    md = (out / "ablation.md").read_text()
    assert "| xattn |" in md and "| concat |" in md and (out / "ablation.png").stat().st_size > 1000
    # the reading gain per held-out source, the same items split
    assert sum(g["items"] for g in x["by_group"].values()) == x["items"] and "by source" in md
    for g in x["by_group"].values():
        assert g["gain"] == pytest.approx(g["accuracy"] - g["shuffled"])
    meta = json.loads((out / "arms" / "concat" / "final" / "meta.json").read_text())
    assert meta["streams"]["image"]["adapter"]["kind"] == "mlp_concat"

    def no_scoring(*a, **k):
        raise AssertionError("an unchanged arm was scored again")

    monkeypatch.setitem(ablation.MODALITIES, "image", ablation.MODALITIES["image"].__class__(
        "accuracy", True, ("shuffled", "blind"), no_scoring))
    assert main(["run", str(path), "--out", str(out)]) == 0  # arms reused, scores reused
    assert json.loads((out / "ablation.json").read_text()) == table
