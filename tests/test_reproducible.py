"""The same run twice gives the same model (issue 25): each adapter stage (and clip_pretrain), run for a few steps in
two separate processes with different PYTHONHASHSEED values, writes bitwise-equal final weights. image_sft /
image_anneal / image_dpo train through the image_pretrain runner (mm.stages.image_pretrain.run) and video_sft through
video_pretrain's, so these runs cover their training; image_sft itself (sweep + held-out scoring) is too slow here.

Separate processes, started together, because what breaks reproducibility is per-process: hash order, memory
layout, thread timing (an in-process repeat can hide it). train.threads=2: a thread-order race (e.g. the float atomics
of CPU index_put_(accumulate=True), the backward of advanced indexing, which made image_pretrain drift) only shows with
more than one intra-op thread and tensors of >= 32768 elements, so the image batches are sized to cross that.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm import demo
from mm.model.checkpoint import load_tensors
from mm.runner import run_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train.warmup_steps=1", "train.log_every=1", "train.progress=false", "train.threads=2", "train.lr=1e-2"]
# image batch 16 x 65 tokens x width 32 = 33280 elements per tile-table gather: past torch's parallel GRAIN_SIZE
IMAGE = ["adapter.every=2", "seq_len=48", "caption_prob=0.2", "steps=3", "train.batch_size=16", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Synthetic image / video / audio shards (mm.demo), a tiny LM, a tiny ViT, and a 2-step image run to start the
    video stage from."""
    root = tmp_path_factory.mktemp("repro")
    w = {"root": root, "image": demo.write_image_shards(root / "image", n_train=32, n_val=4),
         "video": demo.write_video_shards(root / "video", n_train=8, n_val=2),
         "audio": demo.write_audio_shards(root / "audio", n_train=8, n_val=2),
         "lm": demo.save_tiny_lm(root / "lm"), "clip": demo.save_tiny_vision(root / "clip")}
    w["image_run"] = root / "image_run"
    n = torch.get_num_threads()
    try:
        run_config(REPO / "experiments/image/image_pretrain_tiny.yaml", [*image_overrides(w), *TRAIN, "steps=2",
                                                                         "train.threads=1"], w["image_run"])
    finally:
        torch.set_num_threads(n)
    return w


def image_overrides(w: dict) -> list[str]:
    return [f"lm={w['lm']}", f"vision={w['clip']}", f"data.shards={w['image']['train']}",
            f"data.val_shards={w['image']['val']}", *IMAGE]


def run_twice(w: dict, name: str, yaml: str, overrides: list[str]) -> tuple[dict, dict]:
    """`python -m mm.cli run yaml` into two run dirs, concurrently, PYTHONHASHSEED 1 and 2; both final weights."""
    procs, outs = [], []
    for seed in (1, 2):
        out = w["root"] / f"{name}_{seed}"
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "mm.cli", "run", str(REPO / "experiments" / yaml), "--out", str(out), "--force",
               *overrides, *TRAIN]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        outs.append(out)
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-2000:]
    return tuple(load_tensors(o / "final" / "model.safetensors") for o in outs)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ between the two runs, e.g. {differ[:3]}"


def test_image_pretrain_is_bitwise_reproducible(world):
    assert_bitwise_equal(*run_twice(world, "image", "image/image_pretrain_tiny.yaml", image_overrides(world)))


def test_video_pretrain_is_bitwise_reproducible(world):
    v = world["video"]
    assert_bitwise_equal(*run_twice(world, "video", "video/video_pretrain_tiny.yaml", [
        f"init_from={world['image_run']}", f"data.shards={v['train']}", f"data.val_shards={v['val']}",
        "num_frames=8", "factor=8", "aggregator.width=16", "aggregator.n_latents=1", "aggregator.depth=1",
        "aggregator.heads=2", "aggregator.max_frames=16", "aggregator.spatial_depth=1", "seq_len=96",
        "eval_items=0", "steps=3", "train.batch_size=4", "train.ckpt_every=3"]))


def test_speech_sft_is_bitwise_reproducible(world):
    a = world["audio"]
    assert_bitwise_equal(*run_twice(world, "speech", "speech/speech_sft_tiny.yaml", [
        f"lm={world['lm']}", "encoder_from=null", f"data.shards={a['train']}", f"data.val_shards={a['val']}",
        "encoder.dim=32", "encoder.layers=2", "encoder.heads=2", "encoder.ffn_dim=64", "adapter.dim=16",
        "adapter.heads=2", "adapter.ffn_dim=32", "seq_len=96", "eval_items=0", "steps=3", "train.batch_size=4",
        "train.ckpt_every=3"]))


def test_clip_pretrain_is_bitwise_reproducible(world):
    i = world["image"]
    assert_bitwise_equal(*run_twice(world, "clip", "image/clip_pretrain_tiny.yaml", [
        f"data.shards={i['train']}", f"data.val_shards={i['val']}", "vision.image_size=32", "vision.patch_size=4",
        "vision.width=32", "vision.layers=2", "vision.heads=2", "vision.mlp_dim=64", "vision.taps=[0]",
        "vision.n_gated=1", "text.width=32", "text.heads=2", "text.layers=1", "embed_dim=32",
        "tokenizer.vocab_size=300", "data.eval_samples=4", "steps=3", "train.batch_size=16", "train.eval_every=0",
        "train.ckpt_every=3"]))
