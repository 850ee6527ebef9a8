"""Data-loader throughput per modality next to the rate a small training step consumes samples.

For each modality with shards under --root (image/, video/, and audio/ when data.audio imports): a
`data.loader.Loader` with --workers DataLoader workers reads --batches batches after --warmup; its samples/s
is printed next to the samples/s of a training step (forward + backward + AdamW) of a stand-in model on a
batch of the same size and shape: image: a tiny ViT (patch 8, width 128, 4 layers, 4 heads, ~0.8M params) on
(B, 3, 64, 64); video: the same ViT on every frame, mean over time; audio: 80-bin log-mel + 2 conv1d layers.
"loader_bound" says whether the loader is slower than that step. Prints one JSON line.
    python benchmarks/data.py --root .cache/shards --workers 2 --batch 32
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

from data.loader import Loader  # noqa: E402

VIT = "tiny ViT: patch 8, width 128, 4 layers, 4 heads, mean-pooled, linear head"


class TinyViT(nn.Module):
    """A stand-in image encoder: patch embedding + learned positions + nn.TransformerEncoder + linear head."""

    def __init__(self, size: int = 64, patch: int = 8, dim: int = 128, depth: int = 4, heads: int = 4,
                 classes: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float -> (N, dim) pooled features."""
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, P, dim)
        return self.blocks(t).mean(1)


def _step_rate(model: nn.Module, make_batch, loss_fn, batch: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = make_batch()
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def train_rate(modality: str, batch: int, sample: dict, steps: int) -> tuple[float, str]:
    """Samples/s of the stand-in training step for this modality on a batch shaped like `sample`'s."""
    torch.manual_seed(0)
    if modality in ("image", "video"):
        vit = TinyViT(size=64)
        head = vit.head
        if modality == "image":
            shape = (batch, 3, 64, 64)
            def loss(m, x):
                return nn.functional.cross_entropy(head(m(x)), torch.zeros(len(x), dtype=torch.long))
            return _step_rate(vit, lambda: torch.randn(shape), loss, batch, steps), VIT
        t = sample["frames"].shape[1]

        def vloss(m, x):  # x: (B, T, 3, H, W) -> per-frame ViT -> mean over T
            feats = m(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1).mean(1)  # (B, dim)
            return nn.functional.cross_entropy(head(feats), torch.zeros(x.shape[0], dtype=torch.long))
        return _step_rate(vit, lambda: torch.randn(batch, t, 3, 64, 64), vloss, batch, steps), \
            f"{VIT}; applied to each of {t} frames, mean over time"
    import torchaudio

    lengths = [len(a) for a in sample["audio"]]
    n = int(sorted(lengths)[len(lengths) // 2])
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=80)
    net = nn.Sequential(nn.Conv1d(80, 128, 3, 2), nn.GELU(), nn.Conv1d(128, 128, 3, 2), nn.GELU())
    aloss = lambda m, x: m(torch.log(mel(x) + 1e-6)).mean(-1).pow(2).mean()  # noqa: E731
    return _step_rate(net, lambda: torch.randn(batch, n), aloss, batch, steps), \
        f"80-bin log-mel + 2 conv1d (128 ch) on {n / 16000:.1f} s clips"


def bench_modality(modality: str, spec: str, args) -> dict:
    """Loader samples/s (after warm-up batches) and the stand-in training step's samples/s."""
    opts = {"num_frames": args.frames} if modality == "video" else {}
    loader = Loader(spec, modality, args.batch, num_workers=args.workers, seed=0, **opts)
    it = iter(loader)
    for _ in range(args.warmup):
        first = next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        n += next(it)["size"]
    rate = n / (time.perf_counter() - t0)
    it.close()
    step, model = train_rate(modality, args.batch, first, args.steps)
    return {"loader_samples_per_s": round(rate, 1), "workers": args.workers, "batch": args.batch,
            "batches_timed": args.batches, "train_step_samples_per_s": round(step, 1), "train_model": model,
            "loader_bound": rate < step, "skipped": loader.skipped}


def main(argv=None) -> dict:
    """Run the benchmark for every modality found under --root; print and return the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".cache/shards", help="kit output folder with image/, video/, audio/")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=50, help="timed batches (the first few may be prefetched)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--frames", type=int, default=8, help="video frames sampled per clip")
    p.add_argument("--modalities", default="image,video,audio")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    results: dict = {}
    for mod in args.modalities.split(","):
        spec = str(Path(args.root) / {"audio": "audio"}.get(mod, mod) / "train-*.tar")
        if mod == "audio" and importlib.util.find_spec("data.audio") is None:
            results[mod] = "skipped: data.audio not importable"
        elif not list(Path(args.root, mod).glob("train-*.tar")):
            results[mod] = f"skipped: no shards at {spec}"
        else:
            results[mod] = bench_modality(mod, spec, args)
    out = {"benchmark": "data_loader", "device": "cpu", "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
