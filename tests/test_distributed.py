"""Data-parallel training under torchrun (gloo, CPU): FSDP2 and DDP reproduce the one-process run of the same global
batch step for step, and the checkpoint an FSDP run writes loads into a plain single-process model."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from data.text_kit import pydoc_documents, write_text_shards
from data.token_stream import eval_windows

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/lm/pretrain_tiny.yaml"
STEPS = 5

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")


def _overrides(shards: Path) -> list[str]:
    return [f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", "data.mix={}",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "tokenizer.vocab_size=300",
            f"phases=[{{steps: {STEPS}, seq_len: 32, batch_size: 4}}]", "anneal.steps=0",
            "train.warmup_steps=2",  # a real learning rate within 5 steps, so a wrong gradient would show
            "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.threads=1", "train.dtype=fp32"]


def _run(out: Path, overrides: list[str], nproc: int = 1) -> dict:
    """`mm run` (or `torchrun --standalone --nproc_per_node N -m mm.cli run`) -> its closing JSON line."""
    launcher = [sys.executable, "-m", "mm.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*launcher, "run", CONFIG, "--out", str(out), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    return [r["loss"] for r in recs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    docs = list(itertools.islice(pydoc_documents(), 45))
    # paragraphs as documents: many document boundaries per window, so the two ranks' shares of a step hold
    # different numbers of predicted tokens (a mean of per-rank means would then differ from the one-process loss)
    paras = [dict(d, key=f"{d['key']}_{i}", text=t.strip()) for d in docs[:30]
             for i, t in enumerate(d["text"].split("\n\n")) if t.strip()]
    write_text_shards(paras, root / "shards", "train")
    write_text_shards(docs[40:], root / "shards", "val")
    base = _overrides(root / "shards")
    out = {"single": root / "single"}
    _run(out["single"], base)  # trains the tokenizer the other runs reuse, so all three see the same tokens
    shared_tok = [f"tokenizer.path={out['single'] / 'tokenizer.json'}"]
    for mode in ("fsdp", "ddp"):
        out[mode] = root / mode
        res = _run(out[mode], base + shared_tok + [f"train.parallel={mode}"], nproc=2)
        assert res["ok"] and res["steps"] == STEPS
    return out


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one(runs, mode):
    one, two = _losses(runs["single"]), _losses(runs[mode])
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, f"{mode}: {two} vs one process: {one}"
    assert one[0] != one[-1]  # the model actually trained


def test_fsdp_checkpoint_loads_in_one_process(runs):
    from mm.model.checkpoint import load_state, load_tensors
    from mm.model.runs import load_lm

    single, _, _ = load_lm(runs["single"])
    fsdp, tok, _ = load_lm(runs["fsdp"])  # final/ written from the gathered FSDP state
    assert list(fsdp.state_dict()) == list(single.state_dict())
    texts = [d["text"] for d in itertools.islice(pydoc_documents(), 40, 42)]
    x = eval_windows([tok.encode(t, bos=True, eos=True) for t in texts], 32, tok.pad_id)["tokens"][:8]
    with torch.no_grad():
        a, b = single(x), fsdp(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), f"max |diff| {float((a - b).abs().max())}"

    # the step checkpoint holds full (unsharded) tensors and a weights_only-loadable optimizer state
    step = runs["fsdp"] / "checkpoints" / f"step_{STEPS:07d}"
    sd = load_tensors(step / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in single.state_dict().items()}
    state = load_state(step)
    opt = state["optimizer"]["state"]
    assert set(opt) == set(sd) and all(int(s["step"]) == STEPS for s in opt.values())
    assert all(opt[k]["exp_avg"].shape == sd[k].shape for k in sd)


def test_sigterm_under_torchrun_checkpoints_and_resumes_bitwise(runs, tmp_path):
    """SIGTERM to the torchrun agent (as a scheduler sends it): it forwards the signal, both ranks agree on one step
    boundary (the flag rides the step's all-reduce), rank 0 writes the checkpoint, and --resume under torchrun gives
    the uninterrupted run's weights bitwise."""
    import signal
    import time

    from mm.model.checkpoint import list_checkpoints, load_tensors

    steps = 60
    shards = runs["single"].parent / "shards"
    ov = [*_overrides(shards), f"phases=[{{steps: {steps}, seq_len: 64, batch_size: 8}}]", "train.parallel=ddp",
          f"tokenizer.path={runs['single'] / 'tokenizer.json'}", "train.ckpt_every=1000"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(ref, ov, nproc=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([*launcher, "run", CONFIG, "--out", str(cut), *ov], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    for _ in range(12000):
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "preempted: SIGTERM at step" in err, err[-4000:]
    found = list_checkpoints(cut / "checkpoints")
    assert len(found) == 1 and 3 <= int(found[0].name.split("_")[1]) < steps and not (cut / "final").exists()
    _run(cut, [*ov, "--resume"], nproc=2)
    a, b = load_tensors(ref / "final" / "model.safetensors"), load_tensors(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
