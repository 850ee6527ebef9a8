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
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from data.shards import BadSample

MAX_IMAGE_PIXELS = 4096 * 4096  # the cap; PIL's own bomb check (2x its MAX_IMAGE_PIXELS) stays on behind it
MAX_VIDEO_PIXELS = 1920 * 1080  # per frame
MAX_VIDEO_FRAMES = 18_000  # frames in a clip (10 min at 30 fps); a decoder never decodes more
MAX_AUDIO_SECONDS = 60.0


@dataclass
class MediaCaps:
    """What one media file may cost before it is refused: image pixels, video frame pixels, video frames (from the
    header; no decoder goes past it), seconds of audio. Set per process by stage configs (`media:`) and by the
    `mm chat` / `mm eval` flags; the decoders read CAPS when no explicit cap is given."""

    max_pixels: int = MAX_IMAGE_PIXELS
    max_frame_pixels: int = MAX_VIDEO_PIXELS
    max_frames: int = MAX_VIDEO_FRAMES
    max_audio_seconds: float = MAX_AUDIO_SECONDS


CAPS = MediaCaps()


def set_media_caps(caps: MediaCaps) -> MediaCaps:
    """Make `caps` the process's caps (CAPS is updated in place, so every importer sees them); returns the old ones."""
    old = MediaCaps(**vars(CAPS))
    for k, v in vars(caps).items():
        setattr(CAPS, k, v)
    return old
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


def decode_image(data: bytes, max_pixels: int | None = None, size: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB (alpha over white); resized to size x size when given.

    Raises BadSample("image_too_large") from the header size before decoding, or ("bad_image") for anything
    PIL cannot fully decode, truncated files included (ImageFile.LOAD_TRUNCATED_IMAGES is forced off).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    max_pixels = max_pixels or CAPS.max_pixels
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
    if w * h > CAPS.max_frame_pixels:
        raise BadSample("video_too_large", f"{w}x{h} frames > {CAPS.max_frame_pixels} pixels")
    if total > CAPS.max_frames:
        raise BadSample("video_too_large", f"{total} frames > {CAPS.max_frames}")
    if total <= 0:
        raise BadSample("bad_video", "no frames")


def _probe(data: bytes) -> None:
    """The container (MP4 only: ffmpeg would also open a PNG or a WAV renamed .mp4), frame size and frame count
    from the header (PyAV, no frame decoded): what exceeds CAPS is refused before any backend allocates a frame."""
    try:
        import av
    except ImportError:
        return  # decode_video reports the missing backend
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if "mp4" not in container.format.name.split(","):
                raise BadSample("bad_video", f"not an MP4 container ({container.format.name})")
            if not container.streams.video:
                raise BadSample("bad_video", "no video stream")
            stream = container.streams.video[0]
            _check_video(stream.codec_context.width, stream.codec_context.height, max(1, stream.frames))
    except BadSample:
        raise
    except Exception as e:  # av.error.* for a file ffmpeg cannot open
        raise BadSample("bad_video", f"{type(e).__name__}: {str(e)[:200]}") from None


def _decord_frames(data: bytes, n: int) -> tuple[np.ndarray, float, int, list[int]]:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)  # a fresh reader per clip (decord#208 leaks)
    total = len(vr)
    _check_video(1, 1, total)  # the count from decord's index, before any frame is decoded
    h, w = vr[0].shape[:2]
    _check_video(w, h, total)
    idx = uniform_indices(total, n)
    return vr.get_batch(idx).asnumpy(), float(vr.get_avg_fps()), total, idx


def _pyav_frames(data: bytes, n: int) -> tuple[np.ndarray, float, int, list[int]]:
    """Decode frames in order (short clips: cheaper than seeking to keyframes), keeping only the sampled ones when the
    header gives the count (else every frame, up to CAPS.max_frames)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        declared = stream.frames
        _check_video(stream.codec_context.width, stream.codec_context.height, max(1, declared))
        fps = float(stream.average_rate or 0)
        want = set(uniform_indices(declared, n)) if declared > 0 else None
        frames: dict[int, np.ndarray] = {}
        count = 0
        for frame in container.decode(stream):
            if want is None or count in want:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > CAPS.max_frames:
                raise BadSample("video_too_large", f"more than {CAPS.max_frames} frames")
    _check_video(1, 1, count)
    idx = uniform_indices(count, n)
    if any(i not in frames for i in idx):  # the header's count was wrong: decode again keeping the right ones
        if want is None:
            raise BadSample("bad_video", "sampled frame missing")
        return _pyav_frames_all(data, n)
    return np.stack([frames[i] for i in idx]), fps, count, idx


def _pyav_frames_all(data: bytes, n: int) -> tuple[np.ndarray, float, int, list[int]]:
    """_pyav_frames for a header whose frame count is wrong: count first, then keep the sampled frames."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        fps = float(stream.average_rate or 0)
    idx = uniform_indices(count, n)
    keep, frames = set(idx), {}
    with av.open(io.BytesIO(data), mode="r") as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in keep:
                frames[i] = frame.to_ndarray(format="rgb24")
    return np.stack([frames[i] for i in idx]), fps, count, idx


def decode_video(data: bytes, num_frames: int = 8, size: int | None = None, backend: str = "auto") -> dict:
    """MP4 bytes -> {"frames": (N, H, W, 3) uint8, "fps", "total_frames", "indices"} (N uniform samples).

    backend "auto": decord when importable (x86_64 wheel), PyAV if decord is missing or fails on this file;
    "decord" / "pyav" force one. Raises BadSample("bad_video" | "video_too_large").
    """
    order = {"auto": ("decord", "pyav"), "decord": ("decord",), "pyav": ("pyav",)}[backend]
    _probe(bytes(data))
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


def decode_image_sample(sample: dict, size: int | None = None, max_pixels: int | None = None) -> dict:
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
