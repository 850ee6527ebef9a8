"""Invariant 7: a resumed run reproduces the uninterrupted one exactly (annealing + Polyak average included);
checkpoints are atomic, pruned and fail loudly when corrupt; the NaN guard stops at the last good checkpoint."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.text_kit import pydoc_documents, write_text_shards
from llm.model import Llama, LlamaConfig
from mm.model.checkpoint import CheckpointError, list_checkpoints, load_tensors
from mm.config import TrainConfig
from mm.train.distributed import DistInfo
from mm.stages.lm_pretrain import lm_loss
from mm.train.trainer import StepOutput, Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/lm/pretrain_tiny.yaml"
N = 4  # the interruption point; the run has 2N steps: 2 main + 6 annealing, averaged at steps 4, 6, 8


# -- through the CLI --------------------------------------------------------------------------------------------
def _mm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "mm.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    if check:
        assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metrics(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("resume")
    docs = list(itertools.islice(pydoc_documents(), 30))
    write_text_shards(docs[:25], root / "shards", "train")
    write_text_shards(docs[25:], root / "shards", "val")
    ov = [f"data.shards={root}/shards/train-*.tar", f"data.val_shards={root}/shards/val-*.tar", "data.mix={}",
          "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "tokenizer.vocab_size=300",
          "phases=[{steps: 2, seq_len: 32, batch_size: 4}]", "anneal.steps=6", "anneal.average_every=2",
          "anneal.mix={}", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0", "train.progress=false",
          "train.threads=1", "train.dtype=fp32", f"train.ckpt_every={N}", "data.val_max_tokens=2000"]
    return root, ov


@pytest.fixture(scope="module")
def straight_and_resumed(base) -> tuple[Path, Path, dict, dict]:
    root, ov = base
    a, b = root / "straight", root / "resumed"
    res_a = _last_json(_mm("run", CONFIG, "--out", str(a), *ov))
    ov = [*ov, f"tokenizer.path={a / 'tokenizer.json'}"]

    first = _last_json(_mm("run", CONFIG, "--out", str(b), *ov, f"train.stop_after={N}"))
    assert first["ok"] and first["stopped_at"] == N
    assert not (b / "result.json").exists() and not (b / "final").exists()  # a stopped run is not a finished one
    assert [p.name for p in list_checkpoints(b / "checkpoints")] == [f"step_{N:07d}"]
    again = _mm("run", CONFIG, "--out", str(b), *ov, check=False)  # no --resume: refused, not silently restarted
    assert again.returncode == 2 and "--resume" in again.stderr

    res_b = _last_json(_mm("run", CONFIG, "--out", str(b), *ov, "--resume"))
    return a, b, res_a, res_b


def test_resume_reproduces_the_uninterrupted_run(straight_and_resumed):
    a, b, res_a, res_b = straight_and_resumed
    assert res_a["steps"] == res_b["steps"] == 2 * N
    assert res_a["averaged_checkpoints"] == res_b["averaged_checkpoints"] == 3
    fa, fb = load_tensors(a / "final" / "model.safetensors"), load_tensors(b / "final" / "model.safetensors")
    assert list(fa) == list(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    last = f"step_{2 * N:07d}"
    ck = {}
    for name in ("model", "avg"):  # the last weights and the running Polyak average, both bitwise
        ta = ck[name] = load_tensors(a / "checkpoints" / last / f"{name}.safetensors")
        tb = load_tensors(b / "checkpoints" / last / f"{name}.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert all(torch.equal(fa[k], ck["avg"][k]) for k in fa)  # final is the average ...
    assert not all(torch.equal(fa[k], ck["model"][k]) for k in fa)  # ... not the last weights
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert (ma[step]["loss"], ma[step]["grad_norm"], ma[step]["lr"]) == \
               (mb[step]["loss"], mb[step]["grad_norm"], mb[step]["lr"]), step
    assert res_a["val_bpb"] == res_b["val_bpb"] and res_a["val_bpb_last"] == res_b["val_bpb_last"]
    assert json.loads((b / "result.json").read_text())["steps"] == 2 * N


def test_optimizer_state_loads_weights_only(straight_and_resumed):
    _, b, _, _ = straight_and_resumed
    state = torch.load(b / "checkpoints" / f"step_{2 * N:07d}" / "state.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"optimizer", "torch_rng"}
    opt = state["optimizer"]["state"]
    assert opt and all(torch.is_tensor(s["exp_avg"]) and int(s["step"]) == 2 * N for s in opt.values())


def test_divergence_through_the_cli(base):
    root, ov = base
    out = root / "diverged"
    proc = _mm("run", CONFIG, "--out", str(out), *ov, "train.lr=1e6", "train.ckpt_every=1", "anneal.steps=0",
               "phases=[{steps: 8, seq_len: 32, batch_size: 4}]", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and _last_json(proc)["ok"] is False
    assert not (out / "result.json").exists()
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert str(ckpt) in lines[0]  # the message names the last good checkpoint ...
    from mm.model.runs import load_lm

    model, _, meta = load_lm(out)  # ... and it loads, with finite weights
    assert meta["step"] == int(ckpt.name.split("_")[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- the Trainer directly ---------------------------------------------------------------------------------------
def _trainer(run_dir: Path, loss_fn=lm_loss, **cfg) -> Trainer:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16))
    model.reset_parameters(seed=0)
    tcfg = TrainConfig(**{"progress": False, "dtype": "fp32", "device": "cpu", "log_every": 1, "ckpt_every": 1,
                          "keep_last": 2, **cfg})
    return Trainer(model, tcfg, run_dir, loss_fn=loss_fn, lr_at=lambda s: 1e-2, info=DistInfo(), desc="t")


def _batches(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(step)
    w = torch.randint(0, 64, (2, 9), generator=g)
    return [{"tokens": w[:, :-1], "labels": w[:, 1:], "doc_ids": torch.zeros(2, 8, dtype=torch.long)}]


def test_checkpoints_pruned_atomic_and_tmp_ignored(tmp_path):
    t = _trainer(tmp_path, keep_last=2)
    t.fit(_batches, 4)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000003", "step_0000004"]  # pruned, no temp leftovers
    # an interrupted write leaves a .tmp-* folder (even a complete-looking one) or a step folder without meta.json
    shutil.copytree(ck / "step_0000004", ck / ".tmp-step_0000009-x1y2")
    (ck / ".tmp-step_0000009-x1y2" / "meta.json").write_text(json.dumps({"step": 9}))
    (ck / "step_0000010").mkdir()
    shutil.copy(ck / "step_0000004" / "model.safetensors", ck / "step_0000010" / "model.safetensors")
    fresh = _trainer(tmp_path)
    assert fresh.resume() == 4
    saved = load_tensors(ck / "step_0000004" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items())


DAMAGE = {
    "garbage": lambda f: f.write_bytes(b"\x00not a safetensors file" * 4),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "one_byte_flipped": lambda f: f.write_bytes((lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:])(f.read_bytes())),
    "missing": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_newest_checkpoint_is_skipped_and_resume_is_still_exact(tmp_path, damage, capfd):
    straight = _trainer(tmp_path / "straight")
    straight.fit(_batches, 6)
    _trainer(tmp_path / "cut").fit(_batches, 4)  # step_3 and step_4 kept
    bad = tmp_path / "cut" / "checkpoints" / "step_0000004" / "model.safetensors"
    DAMAGE[damage](bad)
    fresh = _trainer(tmp_path / "cut")
    assert fresh.resume() == 3  # the newest that verifies
    warning = capfd.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "step_0000004" in warning[0] and str(bad) in warning[0]
    fresh.fit(_batches, 6)
    want = straight.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.model.state_dict().items())  # bitwise, as if uninterrupted


def test_corrupt_meta_json_is_skipped(tmp_path):
    _trainer(tmp_path).fit(_batches, 4)
    (tmp_path / "checkpoints" / "step_0000004" / "meta.json").write_text('{"step": 4, "fi')
    assert _trainer(tmp_path).resume() == 3


def test_no_checkpoint_verifies_is_a_one_line_error(tmp_path):
    _trainer(tmp_path).fit(_batches, 2)
    for step in (1, 2):
        DAMAGE["truncated"](tmp_path / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        _trainer(tmp_path).resume()
    msg = str(e.value)
    assert str(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors") in msg and "\n" not in msg


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    k = 3  # the 3rd update (metrics step 3) sees a NaN loss

    def poisoned(model, mb) -> StepOutput:
        out = lm_loss(model, mb)
        return StepOutput(out.loss * float("nan"), out.tokens) if trainer.step + 1 == k else out

    trainer = _trainer(tmp_path, loss_fn=poisoned, keep_last=5)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit(_batches, 6)
    good = tmp_path / "checkpoints" / f"step_{k - 1:07d}"
    assert f"at step {k}" in str(e.value) and str(good) in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == good.name
    saved = load_tensors(good / "model.safetensors")  # the failed step did not touch the weights
    assert all(torch.equal(v, saved[k_]) for k_, v in trainer.model.state_dict().items())
    fresh = _trainer(tmp_path)
    assert fresh.resume() == k - 1
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())
    fresh.fit(_batches, k + 1)  # and training goes on from it
    assert fresh.step == k + 1
