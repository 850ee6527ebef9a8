"""Media into model inputs: images and frames into normalised tiles (Pixels / Frames), waveforms into log-mel
(Audio), and media files read by the project's decoders (caps, DESIGN.md invariant 8) with one-line errors naming
the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from data.audio import _decode_audio
from data.decode import CAPS, decode_image, decode_video
from data.shards import BadSample
from encoders.speech import LogMel, SpecAugment, pad_features
from encoders.vision import VisionConfig, normalize_pixels, tile_batch, tile_counts
from mm.model.streams import Audio, Frames, Pixels


def images_to_pixels(images, vcfg: VisionConfig) -> Pixels:
    """uint8 images (B, 3, H, W) (or a list of (3, H, W)) -> Pixels: normalised (B, vcfg.tile_slots, 3, t, t) tiled
    as the encoder takes them (vcfg's tile size, max_tiles, thumbnail), aspect ids (B,)."""
    px, aspect = tile_batch(list(images), vcfg.image_size, vcfg.max_tiles, vcfg.thumbnail)
    return Pixels(normalize_pixels(px), aspect)


def frames_to_pixels(frames, vcfg: VisionConfig) -> Frames:
    """uint8 frames (B, F, 3, H, W) -> Frames: tiles (B, F, n, 3, t, t) and aspect ids (B, F); n = the most real
    tiles any frame needs (<= vcfg.tile_slots; padding tiles are masked by the encoder)."""
    frames = torch.as_tensor(frames)
    B, Fr = frames.shape[:2]
    px, aspect = images_to_pixels(frames.flatten(0, 1), vcfg)  # (B*F, tile_slots, ...)
    n = int(tile_counts(vcfg, aspect).max())
    return Frames(px[:, :n].reshape(B, Fr, n, *px.shape[2:]), aspect.view(B, Fr))


class Featurizer:
    """Waveforms -> Audio: padded normalised log-mel (B, F, 80) + lengths; optional SpecAugment and a frame crop."""

    def __init__(self, augment: SpecAugment | None = None):
        self.logmel, self.augment = LogMel(), augment

    def __call__(self, waves, max_frames: int = 0, rng: np.random.Generator | None = None) -> Audio:
        feats = []
        for w in waves:
            f = self.logmel(torch.as_tensor(np.asarray(w, dtype=np.float32)))  # (F, 80)
            if max_frames and f.shape[0] > max_frames:  # random crop of long utterances (PAPER.md §9.4)
                s = int((rng or np.random.default_rng(0)).integers(0, f.shape[0] - max_frames + 1))
                f = f[s:s + max_frames]
            feats.append(self.augment(f) if self.augment is not None else f)
        return Audio(*pad_features(feats))


def decode_size(vcfg: VisionConfig) -> int | None:
    """Decode resolution for one image: single-tile encoders see the image squashed to their square tile, as in
    training and benchmarks/image.py; tiled encoders get the native image, tiled with its aspect ratio kept."""
    return vcfg.image_size if vcfg.max_tiles == 1 else None


def read_image_file(path: str | Path, max_pixels: int | None = None, size: int | None = None) -> np.ndarray:
    """A PNG/JPEG file -> (3, H, W) uint8 via data.decode.decode_image (resized to size x size when given).
    FileNotFoundError / ValueError, both naming the file, for a missing, unreadable, truncated or non-image file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
    try:
        img = decode_image(p.read_bytes(), max_pixels, size)  # (H, W, 3)
    except BadSample as e:
        why = str(e) if e.reason == "image_too_large" else e.reason  # PIL's detail names a BytesIO, not the file
        raise ValueError(f"{p}: not a readable PNG/JPEG image ({why})") from None
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def read_video_file(path: str | Path, num_frames: int, size: int | None = None, backend: str = "auto") -> np.ndarray:
    """An MP4 file -> (num_frames, 3, H, W) uint8 sampled uniformly (data.decode.decode_video; size x size when
    given). FileNotFoundError / ValueError naming the file for a missing or undecodable one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such video file")
    try:
        frames = decode_video(p.read_bytes(), num_frames, size, backend)["frames"]  # (N, H, W, 3)
    except BadSample as e:
        raise ValueError(f"{p}: not a readable MP4 video ({e})") from None
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def read_audio_file(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """A wav/flac file -> float32 (N,) at 16 kHz; FileNotFoundError / ValueError naming the file otherwise. A file
    longer than max_seconds (None: CAPS.max_audio_seconds) is refused from its header, before it is read."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such audio file")
    max_seconds = max_seconds or CAPS.max_audio_seconds
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        info = None  # not a sound file: _decode_audio names why
    if info is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise ValueError(f"{p}: {info.frames / info.samplerate:.0f} s of audio > the {max_seconds:g} s cap "
                         f"(--max-audio-seconds)")
    try:
        return _decode_audio(p.read_bytes(), max_seconds)
    except BadSample as e:
        raise ValueError(f"{p}: not a readable wav/flac file ({str(e).splitlines()[0]})") from None
