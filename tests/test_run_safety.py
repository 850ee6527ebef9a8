"""Runs that cannot be silently wrong: one writer per run directory (lock), reuse / resume only with the same config
and inputs (fingerprint), SIGTERM -> checkpoint + distinct exit + bitwise resume, a failed checkpoint write keeps
what was there."""
from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.text_kit import pydoc_documents, write_text_shards
from mm.model.checkpoint import CheckpointError, list_checkpoints, load_tensors, save_weights, verify_checkpoint
from mm.train.rundir import LOCK, ConfigDrift, RunLock, RunLocked
from mm.runner import run_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments/lm/pretrain_tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _phases(steps: int, seq: int = 32, batch: int = 4) -> str:
    return f"phases=[{{steps: {steps}, seq_len: {seq}, batch_size: {batch}}}]"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    docs = list(itertools.islice(pydoc_documents(), 30))
    write_text_shards(docs[:25], root / "shards", "train")
    write_text_shards(docs[25:], root / "shards", "val")
    return root / "shards"


def _ov(shards: Path, steps: int = 3, *extra: str) -> list[str]:
    return [f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", "data.mix={}",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "tokenizer.vocab_size=300",
            _phases(steps), "anneal.steps=0", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
            "train.progress=false", "train.threads=1", "train.dtype=fp32", "data.val_max_tokens=1000", *extra]


def _mm_popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mm.cli", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finals_equal(a: Path, b: Path) -> bool:
    x, y = load_tensors(a / "final" / "model.safetensors"), load_tensors(b / "final" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- 1. one writer per run directory ------------------------------------------------------------------------------
def _holder(run_dir: Path) -> subprocess.Popen:
    """Another live process holding run_dir's lock."""
    code = (f"import time; from mm.train.rundir import RunLock; RunLock({str(run_dir)!r}).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_lock_refuses_and_stale_lock_is_taken_over(shards, tmp_path, capfd):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunLocked) as e:
            run_config(CONFIG, _ov(shards), run)
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and str(run) in msg and "\n" not in msg
        assert not (run / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == holder.pid
    capfd.readouterr()
    res = run_config(CONFIG, _ov(shards), run)
    assert res["steps"] == 3 and not res.get("reused")
    err = [line for line in capfd.readouterr().err.splitlines() if "stale lock" in line]
    assert len(err) == 1 and f"pid {holder.pid}" in err[0]
    assert not (run / LOCK).exists()  # released when the run ended


def test_lock_from_another_host_needs_break_lock(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "node-17.cluster", "started": time.time(), "cmd": "mm run"}))
    with pytest.raises(RunLocked, match="node-17.cluster.*--break-lock"):
        run_config(CONFIG, _ov(shards, 2), run)
    assert run_config(CONFIG, _ov(shards, 2), run, break_lock=True)["steps"] == 2


def test_two_concurrent_runs_one_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    procs = [_mm_popen("run", CONFIG, "--out", str(run), *_ov(shards, 150)) for _ in range(2)]  # started together
    outs = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert "in use by" in outs[loser][1] and f"pid {procs[winner].pid}" in outs[loser][1]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # each step logged once


def test_pipeline_locks_each_step(shards, tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(json.dumps({"stage": "pipeline", "steps": [
        {"name": "a", "config": CONFIG, "per_round": False, "overrides": _ov(shards, 2)}]}))
    holder = _holder(tmp_path / "run" / "a")
    try:
        with pytest.raises(RunLocked, match=str(tmp_path / "run" / "a")):
            run_config(pipe, [], tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


# ---- 2. reuse and resume only what matches ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def done(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("done") / "run"
    run_config(CONFIG, _ov(shards), run)
    return run


def test_reuse_needs_the_same_config(shards, done):
    assert run_config(CONFIG, _ov(shards), done)["reused"]
    assert run_config(CONFIG, _ov(shards, 3, "train.log_every=5", "train.progress=true"), done)["reused"]  # safe keys
    with pytest.raises(ConfigDrift) as e:
        run_config(CONFIG, _ov(shards, 4), done)
    msg = str(e.value)
    assert "phases[0].steps was 3, now 4" in msg and "--force" in msg and str(done) in msg and "\n" not in msg
    with pytest.raises(ConfigDrift, match="train.lr was 0.003, now 0.002"):
        run_config(CONFIG, _ov(shards, 3, "train.lr=0.002"), done)
    # a key added to a free-form mapping (a data mix, an adapter block) is a setting the old run did not have
    with pytest.raises(ConfigDrift, match=r"data.mix.books was null, now 2.0"):
        run_config(CONFIG, _ov(shards, 3, "data.mix={books: 2.0}"), done)
    with pytest.raises(ConfigDrift, match=r"train.lr_mult.layers. was null, now 0.5"):
        run_config(CONFIG, _ov(shards, 3, "train.lr_mult={layers.: 0.5}"), done)


def test_a_knob_newer_than_the_run_matches_only_at_its_default(shards, done, tmp_path):
    """A run made before a config field existed (its fingerprint lacks the key) had the field's default behaviour:
    reused while the field keeps its default, a difference once it is set to anything else (a new `vision.stem` set
    to conv must not reuse a patch-stem run)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(done, old)
    fp = json.loads((old / "fingerprint.json").read_text())
    del fp["config.train.adam_eps"]
    fp.pop("defaults", None)  # written before defaults were recorded
    (old / "fingerprint.json").write_text(json.dumps(fp))
    assert run_config(CONFIG, _ov(shards), old)["reused"]
    with pytest.raises(ConfigDrift, match=r"train.adam_eps was 1e-08, now 1e-06"):
        run_config(CONFIG, _ov(shards, 3, "train.adam_eps=1e-6"), old)


def test_reuse_needs_the_same_inputs(shards, tmp_path):
    own = tmp_path / "shards"
    own.mkdir()
    for f in shards.iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "run"
    run_config(CONFIG, _ov(own), run)
    first = load_tensors(run / "final" / "model.safetensors")
    assert run_config(CONFIG, _ov(own), run)["reused"]
    shard = sorted(own.glob("train-*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a rebuilt shard
    with pytest.raises(ConfigDrift, match="input: data.shards was"):
        run_config(CONFIG, _ov(own), run)
    res = run_config(CONFIG, _ov(own), run, force=True)  # --force retrains, then the new inputs are recorded
    assert not res.get("reused") and run_config(CONFIG, _ov(own), run)["reused"]
    assert all(torch.equal(v, first[k]) for k, v in load_tensors(run / "final" / "model.safetensors").items())


def test_resume_with_a_changed_config_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    assert run_config(CONFIG, _ov(shards, 4, "train.stop_after=2"), run)["stopped_at"] == 2
    with pytest.raises(ConfigDrift, match="--resume of a run made with a different config: train.lr"):
        run_config(CONFIG, _ov(shards, 4, "train.lr=0.01"), run, resume=True)
    assert run_config(CONFIG, _ov(shards, 4, "train.log_every=2"), run, resume=True)["steps"] == 4  # safe keys


def test_run_written_before_fingerprints_is_checked_on_its_config(shards, tmp_path, capfd):
    run = tmp_path / "run"
    run_config(CONFIG, _ov(shards), run)
    (run / "fingerprint.json").unlink()
    capfd.readouterr()
    assert run_config(CONFIG, _ov(shards), run)["reused"]
    assert "no fingerprint.json" in capfd.readouterr().err
    with pytest.raises(ConfigDrift, match="phases\\[0\\].seq_len was 32, now 16"):
        run_config(CONFIG, [*_ov(shards), _phases(3, 16)], run)


def test_pipeline_force_retrains_only_what_changed(shards, tmp_path):
    def pipe(a_extra: list[str]) -> Path:
        path = tmp_path / "pipe.yaml"
        path.write_text(json.dumps({"stage": "pipeline", "steps": [
            {"name": "a", "config": CONFIG, "per_round": False, "overrides": _ov(shards, 2, *a_extra)},
            {"name": "b", "config": CONFIG, "per_round": False,
             "overrides": _ov(shards, 2, "tokenizer.path={run}/a/tokenizer.json")}]}))
        return path

    run = tmp_path / "run"
    first = run_config(pipe([]), [], run)
    again = run_config(pipe([]), [], run)["steps"]
    assert again["a"]["reused"] and again["b"]["reused"]
    # what each stage cost when made is kept in its result.json (a reuse shows it again); the pipeline's peak is
    # the largest of its steps'
    made = json.loads((run / "a" / "result.json").read_text())
    assert made["run_s"] > 0 and made["peak_rss_mb"] > 50 and again["a"]["run_s"] == made["run_s"]
    assert first["peak_rss_mb"] == max(first["steps"][k]["peak_rss_mb"] for k in ("a", "b"))
    with pytest.raises(ConfigDrift, match=f"{run / 'a'}: completed with a different config: phases"):
        run_config(pipe([_phases(3)]), [], run)
    res = run_config(pipe([_phases(3)]), [], run, force=True)["steps"]
    assert not res["a"].get("reused") and res["b"]["reused"]  # b's input (a's tokenizer) is bitwise the same
    res = run_config(pipe([_phases(3), "tokenizer.vocab_size=280"]), [], run, force=True)["steps"]
    assert not res["a"].get("reused") and not res["b"].get("reused")  # now it is not: b retrains too


# ---- 4. preemption ------------------------------------------------------------------------------------------------
def _signal_at_step(proc: subprocess.Popen, run: Path, step: int, sig=signal.SIGTERM) -> None:
    metrics = run / "metrics.jsonl"
    for _ in range(6000):
        if metrics.exists() and sum(1 for _ in metrics.open()) >= step:
            proc.send_signal(sig)
            return
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}: {proc.communicate()[1][-3000:]}")


PRE_STEPS = 60


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> tuple[Path, list[str]]:
    run = tmp_path_factory.mktemp("straight") / "run"
    ov = _ov(shards, 0, _phases(PRE_STEPS - 10, 64, 8), "anneal.steps=10", "anneal.average_every=3",
             "anneal.mix={}", "train.ckpt_every=1000")
    run_config(CONFIG, ov, run)
    return run, [*ov, f"tokenizer.path={run / 'tokenizer.json'}"]


def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(straight, tmp_path):
    ref, ov = straight
    run = tmp_path / "run"
    proc = _mm_popen("run", CONFIG, "--out", str(run), *ov)
    _signal_at_step(proc, run, 3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("preempted")]
    assert len(line) == 1 and "--resume" in line[0] and str(run) in line[0]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["preempted"] and 3 <= res["step"] < PRE_STEPS
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [f"step_{res['step']:07d}"]
    assert verify_checkpoint(run / "checkpoints" / f"step_{res['step']:07d}") is None
    assert not (run / "final").exists() and not (run / LOCK).exists()
    again = _mm_popen("run", CONFIG, "--out", str(run), *ov, "--resume")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    assert _finals_equal(ref, run)  # averaged annealing weights included
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, PRE_STEPS + 1))


# ---- 5. a failed checkpoint write ---------------------------------------------------------------------------------
def test_checkpoint_write_past_a_file_size_limit_keeps_the_previous_one(shards, tmp_path):
    run = tmp_path / "run"
    ov = _ov(shards, 6, "train.ckpt_every=1", "train.keep_last=3")
    run_config(CONFIG, [*ov, "train.stop_after=2"], run)
    good = run / "checkpoints" / "step_0000002"
    model_size, state_size = ((good / f).stat().st_size for f in ("model.safetensors", "state.pt"))
    assert model_size < state_size
    limit = (model_size + state_size) // 2  # model.safetensors fits, state.pt does not: a write fails part-way

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "mm.cli", "run", CONFIG, "--out", str(run), *ov, "--resume"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=limited)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "step_0000003: checkpoint write failed" in errors[0] and "File too large" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]  # no temp
    assert verify_checkpoint(good) is None and not (run / "final").exists()
    assert run_config(CONFIG, ov, run, resume=True)["steps"] == 6  # and it resumes from there


def test_failed_write_over_final_leaves_the_old_final(tmp_path):
    final = tmp_path / "final"
    save_weights(final, {"model": {"w": torch.arange(10.0)}}, {"step": 1})
    big = {"model": {"w": torch.zeros(1 << 20)}}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(CheckpointError, match=f"{final}: checkpoint write failed.*File too large"):
            save_weights(final, big, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert torch.equal(load_tensors(final / "model.safetensors")["w"], torch.arange(10.0))
    assert verify_checkpoint(final) is None


def test_a_started_run_without_checkpoints_keeps_its_config(shards, tmp_path):
    """Stopped before its first checkpoint (tokenizer and token caches already written), a run is not restarted
    under another config: those caches would silently be reused."""
    run = tmp_path / "run"
    run_config(CONFIG, _ov(shards), run)
    for sub in ("result.json", "final"):  # as if it had stopped mid-training, before any checkpoint
        p = run / sub
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ConfigDrift, match="a run started with a different config: tokenizer.vocab_size"):
        run_config(CONFIG, _ov(shards, 3, "tokenizer.vocab_size=280"), run)
    assert run_config(CONFIG, _ov(shards), run)["steps"] == 3  # the same config goes on


def test_an_empty_lock_file_left_by_a_crash_is_stale(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("")  # a crash between creating the lock and writing it
    old = time.time() - 60
    os.utime(run / LOCK, (old, old))
    assert run_config(CONFIG, _ov(shards, 2), run)["steps"] == 2
