"""The project's own decoders for shard members (DESIGN.md invariant 8).

Images: PIL (PNG/JPEG only) with a pixel cap checked from the header before any pixel is decoded; alpha is
composited on white; -> (H, W, 3) uint8. Video: decord with a PyAV fallback, N frames sampled uniformly over the
whole clip (the middle frame of each of N equal segments) -> (N, H, W, 3) uint8. Text/json strict UTF-8, npy
without pickle. Every failure raises `BadSample(reason)` at once (no retries with sleeps).
"""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile

from data.shards import BadSample

MAX_IMAGE_PIXELS = 4096 * 4096  # the cap; PIL's own bomb check (2x its MAX_IMAGE_PIXELS) stays on behind it
MAX_VIDEO_PIXELS = 1920 * 1080  # per frame
MAX_VIDEO_FRAMES = 100_000
IMAGE_EXTS = ("jpg", "jpeg", "png")
VIDEO_EXTS = ("mp4",)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error)


def decode_text(data: bytes, what: str = "txt") -> str:
    """Strict UTF-8 -> str; BadSample("bad_utf8")."""
    try:
        return bytes(data).decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", f"{what}: {e}") from None


def decode_json(data: bytes) -> dict:
    """Strict UTF-8 JSON object -> dict; BadSample("bad_utf8" | "bad_json")."""
    try:
        obj = json.loads(decode_text(data, "json"))
    except (ValueError, RecursionError) as e:
        raise BadSample("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f"expected an object, got {type(obj).__name__}")
    return obj


def decode_npy(data: bytes) -> np.ndarray:
    """A .npy member without pickle (allow_pickle=False); BadSample("bad_npy")."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSample("bad_npy", str(e)) from None


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, size: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB (alpha over white); resized to size x size when given.

    Raises BadSample("image_too_large") from the header size before decoding, or ("bad_image") for anything
    PIL cannot fully decode, truncated files included (ImageFile.LOAD_TRUNCATED_IMAGES is forced off).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            w, h = im.size
            if w * h > max_pixels:
                raise BadSample("image_too_large", f"{w}x{h} > {max_pixels} pixels")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)  # (H, W, 3) uint8
    except BadSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadSample("image_too_large", str(e)) from None
    except _IMAGE_ERRORS as e:
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None


def uniform_indices(total: int, n: int) -> list[int]:
    """The middle frame of each of n equal segments of [0, total): int((i + 0.5) * total / n)."""
    if total <= 0 or n <= 0:
        raise ValueError(f"need total > 0 and n > 0, got total={total}, n={n}")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def _resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR)) for f in frames])


def _check_video(w: int, h: int, total: int) -> None:
    if w * h > MAX_VIDEO_PIXELS or total > MAX_VIDEO_FRAMES:
        raise BadSample("video_too_large", f"{w}x{h}, {total} frames")
    if total <= 0:
        raise BadSample("bad_video", "no frames")


def _decord_frames(data: bytes, n: int) -> tuple[np.ndarray, float, int, list[int]]:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)  # a fresh reader per clip (decord#208 leaks)
    total = len(vr)
    h, w = vr[0].shape[:2] if total else (0, 0)
    _check_video(w, h, total)
    idx = uniform_indices(total, n)
    return vr.get_batch(idx).asnumpy(), float(vr.get_avg_fps()), total, idx


def _pyav_frames(data: bytes, n: int) -> tuple[np.ndarray, float, int, list[int]]:
    """Decode every frame in order (short clips: cheaper than seeking to keyframes) and keep the sampled ones."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        _check_video(stream.codec_context.width, stream.codec_context.height, max(1, stream.frames))
        fps = float(stream.average_rate or 0)
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) > MAX_VIDEO_FRAMES:
                raise BadSample("video_too_large", "too many frames")
    total = len(frames)
    _check_video(1, 1, total)
    idx = uniform_indices(total, n)
    return np.stack([frames[i] for i in idx]), fps, total, idx


def decode_video(data: bytes, num_frames: int = 8, size: int | None = None, backend: str = "auto") -> dict:
    """MP4 bytes -> {"frames": (N, H, W, 3) uint8, "fps", "total_frames", "indices"} (N uniform samples).

    backend "auto": decord when importable (x86_64 wheel), PyAV if decord is missing or fails on this file;
    "decord" / "pyav" force one. Raises BadSample("bad_video" | "video_too_large").
    """
    order = {"auto": ("decord", "pyav"), "decord": ("decord",), "pyav": ("pyav",)}[backend]
    last: Exception | None = None
    for name in order:
        try:
            frames, fps, total, idx = (_decord_frames if name == "decord" else _pyav_frames)(bytes(data), num_frames)
        except ImportError as e:
            last = e
            continue
        except BadSample as e:
            if e.reason == "video_too_large":
                raise
            last = e
            continue
        except Exception as e:  # decord raises bare RuntimeError/DECORDError, PyAV av.error.* (ValueError/OSError)
            last = e
            continue
        return {"frames": _resize_frames(frames, size), "fps": fps, "total_frames": total, "indices": idx}
    if isinstance(last, ImportError):
        raise RuntimeError(f"no video backend available ({last}); pip install decord or av") from last
    raise BadSample("bad_video", f"{type(last).__name__}: {str(last)[:200]}")


def _member(sample: dict, exts, reason: str) -> tuple[str, bytes]:
    for ext in exts:
        if ext in sample:
            return ext, sample[ext]
    raise BadSample(reason, str(sample.get("__key__")))


def _caption_meta(sample: dict) -> tuple[str, dict]:
    if "txt" not in sample:
        raise BadSample("missing_caption", str(sample.get("__key__")))
    return decode_text(sample["txt"]), (decode_json(sample["json"]) if "json" in sample else {})


def decode_image_sample(sample: dict, size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """An image-text sample of raw members -> {"key", "image": (H, W, 3) uint8, "caption", "meta"}.

    Raises BadSample: missing_image, missing_caption, bad_utf8, bad_json, bad_image, image_too_large.
    """
    _, raw = _member(sample, IMAGE_EXTS, "missing_image")
    caption, meta = _caption_meta(sample)
    return {"key": sample.get("__key__"), "image": decode_image(raw, max_pixels, size), "caption": caption,
            "meta": meta}


def decode_video_sample(sample: dict, num_frames: int = 8, size: int | None = None, backend: str = "auto") -> dict:
    """A video-text sample -> {"key", "frames": (N, H, W, 3) uint8, "caption", "meta", "fps", "indices"}.

    Raises BadSample: missing_video, missing_caption, bad_utf8, bad_json, bad_video, video_too_large.
    """
    _, raw = _member(sample, VIDEO_EXTS, "missing_video")
    caption, meta = _caption_meta(sample)
    video = decode_video(raw, num_frames, size, backend)
    return {"key": sample.get("__key__"), "frames": video["frames"], "caption": caption, "meta": meta,
            "fps": video["fps"], "indices": video["indices"]}
