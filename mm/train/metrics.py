"""Training metrics: tokens/s, MFU against a per-device peak table, metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data.atomic import atomic_write_text

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device | str) -> float | None:
    """Peak FLOP/s of a device (None where unknown, e.g. CPU, unless MM_PEAK_FLOPS is set)."""
    env = os.environ.get("MM_PEAK_FLOPS")
    if env:
        return float(env)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return val
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device peak."""
    return None if not peak else flops_per_token * tokens_per_s / peak


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional at runtime
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def drop_after(self, step: int, stage: str) -> None:
        """Remove `stage`'s records past `step` (a resume repeats those steps; they are logged again)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not (rec.get("stage") == stage and isinstance(rec.get("step"), int) and rec["step"] > step):
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
