"""Process groups under torchrun, FSDP2 / DDP wrapping, and full (gathered) state dicts for checkpoints."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)


@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_pref)
    if world <= 1:
        return DistInfo(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, device)


def wrap_model(model: torch.nn.Module, mode: str, info: DistInfo) -> torch.nn.Module:
    """'fsdp': fully_shard every block, then the root; 'ddp': DistributedDataParallel; 'none': as is."""
    if mode == "none" or not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    raise ValueError(f"train.parallel must be none|ddp|fsdp, got {mode!r}")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op on one process): readers pass only after the writer (rank 0) is done."""
    if info.enabled:
        dist.barrier()


def rank_slice(n: int, info: DistInfo) -> slice:
    """This rank's contiguous share of n global rows (n must divide evenly)."""
    if n % info.world:
        raise ValueError(f"global batch {n} does not divide over {info.world} processes")
    per = n // info.world
    return slice(info.rank * per, (info.rank + 1) * per)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Gathered model (and optimizer) state dicts, keyed by parameter names; works wrapped or not.

    On one process the tensors are the live parameters, not copies: clone before keeping them across steps.
    """
    msd = get_model_state_dict(model, options=_FULL)
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer is not None else None
    return msd, osd


def load_full_state(model: torch.nn.Module, msd: dict, optimizer=None, osd: dict | None = None) -> None:
    """Inverse of full_state: every rank loads the full dicts into its (possibly sharded) model/optimizer."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 modifies in place, so it is returned as is)."""
    return getattr(model, "module", model)
