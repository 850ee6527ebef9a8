"""Synthetic structured images (PAPER.md §8.2 item 5) drawn from real text and real sprites, at tiny sizes.

Rendered words and short documents (PIL + the DejaVu Sans font that matplotlib ships, so no system font is
needed), matplotlib bar/line charts of real Brown-corpus counts, and counting canvases of pasted sprites.
Every function takes a `random.Random` so images are reproducible.
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": "#d62728", "blue": "#1f77b4", "green": "#2ca02c", "orange": "#ff7f0e", "purple": "#9467bd"}
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_ALPHA_WORD = re.compile(r"^[A-Za-z]+$")


@functools.lru_cache(maxsize=None)
def font(px: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at `px` pixels (the TTF inside matplotlib; PIL's bitmap default if that is missing)."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), px)
    except OSError:
        return ImageFont.load_default(px)


def sentences(text: str) -> list[str]:
    """Split running text into sentences (a regex on end punctuation followed by a capital)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENT.split(flat) if s.strip()]


def text_words(text: str, min_len: int = 3, max_len: int = 9) -> list[str]:
    """Purely alphabetic words of `text` with min_len..max_len letters, in order."""
    words = (w.strip(".,;:!?\"'()") for w in text.split())
    return [w for w in words if _ALPHA_WORD.match(w) and min_len <= len(w) <= max_len]


def _light(rng: random.Random) -> tuple:
    return tuple(rng.randint(205, 255) for _ in range(3))


def _dark(rng: random.Random) -> tuple:
    return tuple(rng.randint(0, 70) for _ in range(3))


def render_word(word: str, size: int, rng: random.Random) -> Image.Image:
    """One word, dark on a light background, as large as fits 90% of the width (RGB, size x size)."""
    img = Image.new("RGB", (size, size), _light(rng))
    draw = ImageDraw.Draw(img)
    px = max(8, int(size * 0.45))
    while px > 8 and draw.textlength(word, font=font(px)) > size * 0.9:
        px -= 1
    f = font(px)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=f)
    w, h = right - left, bottom - top
    x = rng.randint(0, max(0, size - w)) - left
    y = rng.randint(0, max(0, size - h)) - top
    draw.text((x, y), word, fill=_dark(rng), font=f)
    return img


def wrap_lines(words: list[str], size: int, px: int, max_lines: int) -> list[str]:
    """Greedily fill lines that fit `size` pixels at font `px`; at most max_lines lines (the rest is dropped)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    cur: list[str] = []
    for w in words:
        trial = " ".join(cur + [w])
        if cur and draw.textlength(trial, font=font(px)) > size - 4:
            lines.append(" ".join(cur))
            cur = [w]
            if len(lines) == max_lines:
                return lines
        else:
            cur.append(w)
    if cur and len(lines) < max_lines:
        lines.append(" ".join(cur))
    return lines


def render_document(lines: list[str], size: int, px: int, rng: random.Random) -> Image.Image:
    """A tiny page: the given lines top-left aligned, dark on near-white (RGB, size x size)."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    ink = _dark(rng)
    step = int(px * 1.25)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * step), line, fill=ink, font=font(px))
    return img


def word_counts(text: str, k: int, rng: random.Random, min_len: int = 3) -> list[tuple[str, int]]:
    """k words of the text with their real counts: drawn from its 12 most frequent words of >= min_len letters,
    distinct counts (so "which is tallest" has one answer), in random order."""
    counts = Counter(w.lower() for w in text_words(text, min_len, 12))
    pool, seen = [], set()
    for w, c in counts.most_common(12):
        if c not in seen:
            pool.append((w, c))
            seen.add(c)
    if len(pool) < k:
        return []
    picked = rng.sample(pool, k)
    return picked


def _figure(size: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1), dpi=size)  # no pyplot: no global state, safe in worker processes
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.08, 0.88, 0.88))
    return fig, canvas, ax


def _to_image(canvas) -> Image.Image:
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())  # (size, size, 3)


def bar_chart(values: list[float], colors: list[str], size: int) -> Image.Image:
    """A bar chart (one bar per value, in COLORS names) without tick labels: colours identify the bars."""
    fig, canvas, ax = _figure(size)
    ax.bar(range(len(values)), values, color=[COLORS[c] for c in colors], width=0.7)
    ax.set_xticks([])
    ax.tick_params(labelsize=4, length=1, pad=0.5)
    ax.set_ylim(0, max(values) * 1.08)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _to_image(canvas)


def line_chart(values: list[float], size: int, color: str = "blue") -> Image.Image:
    """A line chart with point markers, one point per value, left to right."""
    fig, canvas, ax = _figure(size)
    ax.plot(range(len(values)), values, color=COLORS[color], marker="o", markersize=2.5, linewidth=1.2)
    ax.set_xticks([])
    ax.tick_params(labelsize=4, length=1, pad=0.5)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 + 1e-6
    ax.set_ylim(lo - pad, hi + pad)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _to_image(canvas)


def gray_sprite(gray: np.ndarray, ink=(0, 0, 0)) -> Image.Image:
    """An MNIST-style (h, w) uint8 image as an RGBA sprite: colour `ink`, alpha = intensity."""
    gray = np.asarray(gray, dtype=np.uint8)
    rgba = np.empty((*gray.shape, 4), dtype=np.uint8)  # (h, w, 4)
    rgba[..., :3] = np.array(ink, dtype=np.uint8)
    rgba[..., 3] = gray
    return Image.fromarray(rgba, "RGBA")


def paste_sprites(canvas: Image.Image, sprites: list[Image.Image], cell: int, rng: random.Random) -> list[tuple]:
    """Paste each RGBA sprite (fitted into cell-2 px) into a distinct random cell of a grid; return the boxes."""
    cols = canvas.width // cell
    rows = canvas.height // cell
    if len(sprites) > cols * rows:
        raise ValueError(f"{len(sprites)} sprites do not fit a {cols}x{rows} grid")
    cells = rng.sample(range(cols * rows), len(sprites))
    boxes = []
    for sprite, c in zip(sprites, cells):
        s = sprite.copy()
        s.thumbnail((cell - 2, cell - 2), Image.Resampling.LANCZOS)
        x0 = (c % cols) * cell + rng.randint(0, cell - s.width)
        y0 = (c // cols) * cell + rng.randint(0, cell - s.height)
        canvas.alpha_composite(s, (x0, y0))
        boxes.append((x0, y0, x0 + s.width, y0 + s.height))
    return boxes
