"""Checkpoints: tensors as safetensors, metadata as JSON, optimizer/RNG state via torch.save loaded with weights_only=True.

Every write goes to a temporary folder that is renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the model: one line naming the file."""


def _atomic_dir_write(final: Path, write) -> Path:
    """Call write(tmp_dir) then rename tmp_dir to final (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses that; tied embeddings do it)."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_weights(directory: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                 state: dict | None = None) -> Path:
    """Atomically write {name}.safetensors per tensor group, meta.json, and (optionally) state.pt."""

    def write(tmp: Path) -> None:
        for name, sd in tensors.items():
            save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"))
        if state is not None:
            with open(tmp / "state.pt", "wb") as f:  # a file object: a failed write surfaces its OSError
                torch.save(state, f)
        files = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    directory = Path(directory)
    try:
        return _atomic_dir_write(directory, write)
    except Exception as e:  # ENOSPC / EFBIG / EIO part-way: the temp folder is gone, older checkpoints untouched
        raise CheckpointError(f"{directory}: checkpoint write failed, nothing replaced ({_os_reason(e)})") from None


def _os_reason(e: BaseException) -> str:
    """The OS error behind a failed write (torch.save and safetensors wrap it in their own exception types)."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:  # torch.save keeps the OSError as the context of its own error
        if isinstance(cur, OSError) and cur.strerror:
            return f"{cur.strerror} [errno {cur.errno}]"
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def verify_checkpoint(directory: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (meta.json unreadable, a file missing, or its size / sha256 not
    what the writer recorded), or None when it verifies. Folders written before sizes were recorded are checked
    by reading their tensors and state."""
    directory = Path(directory)
    try:
        meta = load_meta(directory)
    except CheckpointError as e:
        return str(e)
    files = meta.get("files")
    if not isinstance(files, dict):
        try:
            for f in directory.glob("*.safetensors"):
                load_tensors(f)
            if (directory / "state.pt").exists():
                load_state(directory)
        except CheckpointError as e:
            return str(e)
        return None
    for name, rec in files.items():
        f = directory / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != rec.get("size"):
            return f"{f}: {f.stat().st_size} bytes, the writer recorded {rec.get('size')}"
        if file_sha256(f) != rec.get("sha256"):
            return f"{f}: sha256 differs from the one the writer recorded"
    return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read one safetensors file, with a one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks), e.g. to tell a retrained checkpoint from the one a
    result was computed with when both sit at the same path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_meta(directory: Path) -> dict:
    """A checkpoint folder's meta.json."""
    path = Path(directory) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a checkpoint folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def load_state(directory: Path) -> dict:
    """Optimizer/RNG state, loaded with weights_only=True (no arbitrary unpickling)."""
    path = Path(directory) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training state ({str(e).splitlines()[0]})") from None


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints under root, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last step checkpoints."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path, strict: bool = True) -> None:
    """load_state_dict with a one-line error naming the file and the first mismatching key or shape."""
    own = module.state_dict()
    if strict:
        missing = sorted(set(own) - set(sd))
        extra = sorted(set(sd) - set(own))
        if missing or extra:
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise CheckpointError(f"{source}: does not fit the model: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{source}: does not fit the model: {k!r} has shape {tuple(v.shape)}, "
                                  f"model expects {tuple(own[k].shape)}")
    module.load_state_dict(sd, strict=strict)
