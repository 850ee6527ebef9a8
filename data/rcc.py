"""Reading Qt resource bundles (.rcc, the binary `rcc` format of Qt 5 and 6) without Qt: the files they hold, by path.

Layout (Qt's rcc.cpp): a 20-byte header ("qres", version, offsets of the tree, the data and the names; version 3 adds
a flags word), a tree of 14-byte (version 1) or 22-byte (versions 2, 3) big-endian nodes (name offset, flags, then a
directory's child count and first child, or a file's locale and data offset), names as length + hash + UTF-16BE,
data as a 4-byte size and the bytes, zlib-compressed (flag 1: a 4-byte size then the zlib stream) or zstd-compressed
(flag 4). Written by hand: no Python package reads rcc files, and Qt is not a dependency here.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

COMPRESSED, DIRECTORY, COMPRESSED_ZSTD = 1, 2, 4
MAX_FILE = 64 << 20  # refuse a member that claims more than 64 MiB


class RccError(ValueError):
    """A file that is not a readable rcc bundle (one line naming it)."""


def read_rcc(path: str | Path) -> dict[str, bytes]:
    """{path inside the bundle: bytes} of every file in an .rcc bundle (decompressed)."""
    path = Path(path)
    buf = path.read_bytes()
    if buf[:4] != b"qres" or len(buf) < 20:
        raise RccError(f"{path}: not a Qt resource bundle (no 'qres' header)")
    version, tree, data, names = struct.unpack(">IIII", buf[4:20])
    if version not in (1, 2, 3):
        raise RccError(f"{path}: rcc format version {version} is not supported (1-3)")
    node = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        n = struct.unpack(">H", buf[names + off:names + off + 2])[0]
        return buf[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    def payload(off: int, flags: int) -> bytes:
        size = struct.unpack(">I", buf[data + off:data + off + 4])[0]
        if size > MAX_FILE or data + off + 4 + size > len(buf):
            raise RccError(f"{path}: a member of {size} bytes does not fit the bundle")
        raw = buf[data + off + 4:data + off + 4 + size]
        if flags & COMPRESSED:  # bounded like the zstd path: a member may not inflate past MAX_FILE
            z = zlib.decompressobj()
            inflated = z.decompress(raw[4:], MAX_FILE)
            if z.unconsumed_tail:
                raise RccError(f"{path}: a compressed member inflates past {MAX_FILE} bytes")
            return inflated
        if flags & COMPRESSED_ZSTD:
            import zstandard  # Qt 6 bundles built with zstd; an optional dependency

            return zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_FILE)
        return raw

    out: dict[str, bytes] = {}
    stack = [(0, "")]
    seen = set()
    while stack:
        index, prefix = stack.pop()
        if index in seen:
            raise RccError(f"{path}: the resource tree has a cycle")
        seen.add(index)
        at = tree + index * node
        name_off, flags = struct.unpack(">IH", buf[at:at + 6])
        name = name_at(name_off) if index else ""
        full = f"{prefix}/{name}" if prefix else name
        if flags & DIRECTORY:
            count, first = struct.unpack(">II", buf[at + 6:at + 14])
            stack += [(first + k, full) for k in range(count)]
        else:
            out[full] = payload(struct.unpack(">I", buf[at + 10:at + 14])[0], flags)
    return out
