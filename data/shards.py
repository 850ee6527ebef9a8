"""Safe WebDataset shard reading (DESIGN.md invariant 8).

Members are returned as raw bytes and decoded only by our own decoders; pickle-bearing members are never
even read. Bad tars, unsafe members and bad samples are skipped and counted by reason in a `SkipCounter`.
"""
from __future__ import annotations

import glob
import json
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

MAX_MEMBER_BYTES = 64 << 20
PICKLE_EXTS = frozenset({"pyd", "pkl", "pickle", "pth"})


class SkipCounter:
    """Counts skipped members/samples/shards by reason."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        """Count `n` skips for `reason`."""
        self.counts[reason] += n

    def as_dict(self) -> dict:
        """Return the counts as a plain {reason: count} dict (sorted by reason)."""
        return dict(sorted(self.counts.items()))

    def total(self) -> int:
        """Return the number of skips over all reasons."""
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


class BadSample(ValueError):
    """A sample that cannot be decoded; `reason` is the skip-counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _unsafe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or "\x00" in name or (len(name) > 1 and name[1] == ":")


def _member_reason(m: tarfile.TarInfo, max_bytes: int) -> str | None:
    """Return why member `m` must be skipped (None if it may be read)."""
    if not m.isreg():
        return None if m.isdir() else "non_file_member"
    if _unsafe_name(m.name):
        return "unsafe_name"
    key, ext = base_plus_ext(m.name)
    if key is None:
        return "no_extension"
    if PICKLE_EXTS & set(ext.lower().split(".")):
        return "pickle_member"
    if m.size > max_bytes:
        return "oversize_member"
    return None


def safe_members(tar: tarfile.TarFile, skips: SkipCounter, max_member_bytes: int = MAX_MEMBER_BYTES):
    """Yield (member, key, lowercase ext) for the regular members that may be read; the others are counted."""
    for m in tar:
        reason = _member_reason(m, max_member_bytes)
        if reason is not None:
            skips.add(reason)
            continue
        if m.isreg():
            key, ext = base_plus_ext(m.name)
            yield m, key, ext.lower()


def iter_samples(paths: Iterable, skips: SkipCounter | None = None, *,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield {"__key__", "__url__", ext: raw bytes, ...} groups from WebDataset tars, never decoding anything.

    Streams with `tarfile` (not webdataset's tar_file_iterator) because that reads each member before we can
    check its size and cannot drop the possibly incomplete last group of a truncated shard.
    """
    skips = skips if skips is not None else SkipCounter()
    for path in paths:
        url = str(path)
        group: dict | None = None
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for m, key, ext in safe_members(tar, skips, max_member_bytes):
                    if group is not None and group["__key__"] != key:
                        yield group
                        group = None
                    if group is None:
                        group = {"__key__": key, "__url__": url}
                    src = tar.extractfile(m)
                    data = src.read() if src is not None else b""
                    if len(data) != m.size:
                        raise tarfile.ReadError("short member read")
                    if ext in group:
                        skips.add("duplicate_member")
                        continue
                    group[ext] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            skips.add("bad_tar")
            group = None  # the group being read when the shard broke may be incomplete
        if group is not None:
            yield group


def decode_text_sample(sample: dict) -> dict:
    """Decode a text sample to {"key","text","source","genre","quality"}; raise BadSample(reason) if unusable.

    Reasons: "missing_txt", "bad_utf8" (txt or json not strict UTF-8), "bad_json" (unparsable or not a dict).
    A missing json member is allowed (source/genre "unknown", quality None).
    """
    raw = sample.get("txt")
    if raw is None:
        raise BadSample("missing_txt", str(sample.get("__key__")))
    try:
        text = bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", str(e)) from None
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]).decode("utf-8", errors="strict"))
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", str(e)) from None
        except (ValueError, RecursionError) as e:
            raise BadSample("bad_json", str(e)) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    quality = meta.get("quality")
    if quality is not None and not isinstance(quality, (int, float)):
        raise BadSample("bad_json", "quality is not a number")
    return {
        "key": sample.get("__key__"),
        "text": text,
        "source": str(meta.get("source", "unknown")),
        "genre": str(meta.get("genre", "unknown")),
        "quality": None if quality is None else float(quality),
    }


def iter_text_docs(paths: Iterable, skips: SkipCounter | None = None, *,
                   max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield decoded text documents from shards, skipping and counting bad tars, members and samples."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_samples(paths, skips, max_member_bytes=max_member_bytes):
        try:
            yield decode_text_sample(sample)
        except BadSample as e:
            skips.add(e.reason)


def expand_shards(spec) -> list[Path]:
    """Expand a shard spec (glob, brace pattern, directory of *.tar, or a list of these) to existing paths."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in specs:
        s = str(s)
        if Path(s).is_dir():
            out.extend(sorted(Path(s).glob("*.tar")))
            continue
        for pattern in expand_urls(s):  # webdataset's brace expansion ("a-{000..003}.tar", "a::b")
            if glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found and len(specs) + s.count("::") > 1:  # one part of a mix missing: never train on the rest
                    raise FileNotFoundError(f"no shards match {pattern!r} of the shard mix {spec!r}")
                out.extend(Path(p) for p in found)
            elif Path(pattern).is_file():
                out.append(Path(pattern))
            else:
                raise FileNotFoundError(f"shard {pattern!r} from spec {spec!r} does not exist")
    if not out:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return out
