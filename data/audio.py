"""Our own decoder for audio-text shard samples (DESIGN.md invariant 8): flac/wav via soundfile, 16 kHz mono."""
from __future__ import annotations

import io
import json
import math
import struct
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from data.decode import CAPS
from data.shards import MAX_MEMBER_BYTES, BadSample, SkipCounter, iter_samples

SAMPLE_RATE = 16000
AUDIO_EXTS = ("flac", "wav")


def _wav_truncated(raw: bytes) -> bool:
    """True if a RIFF/WAVE header declares more bytes than the member holds (libsndfile would silently cut)."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return False
    (riff_size,) = struct.unpack("<I", raw[4:8])
    return riff_size not in (0, 0xFFFFFFFF) and riff_size + 8 > len(raw)


def _decode_audio(raw: bytes, max_seconds: float | None = None) -> np.ndarray:
    """Bytes of a flac/wav file -> 16 kHz mono float32 (T,); BadSample("bad_audio" | "audio_too_long").
    max_seconds None: CAPS.max_audio_seconds."""
    max_seconds = max_seconds or CAPS.max_audio_seconds
    if _wav_truncated(raw):
        raise BadSample("bad_audio", "truncated WAV (RIFF size exceeds the data)")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            sr = f.samplerate
            if sr <= 0:
                raise BadSample("bad_audio", f"sample rate {sr}")
            if f.frames > 0 and f.frames / sr > max_seconds:  # check the header before decoding anything
                raise BadSample("audio_too_long", f"{f.frames / sr:.1f} s > {max_seconds} s")
            x = f.read(dtype="float32", always_2d=True)  # (T, C)
    except BadSample:  # a ValueError itself: keep its reason
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise BadSample("bad_audio", str(e)[:200]) from None
    if x.shape[0] == 0:
        raise BadSample("bad_audio", "no samples")
    if x.shape[0] / sr > max_seconds:
        raise BadSample("audio_too_long", f"{x.shape[0] / sr:.1f} s > {max_seconds} s")
    if not np.isfinite(x).all():
        raise BadSample("bad_audio", "non-finite samples")
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]  # (T,) downmix
    if sr != SAMPLE_RATE:
        g = math.gcd(sr, SAMPLE_RATE)
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr // g, SAMPLE_RATE // g).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def decode_audio_sample(sample: dict, max_seconds: float | None = None) -> dict:
    """Decode a raw audio-text sample to {"key", "audio": float32 (T,) at 16 kHz, "sr", "text", "meta"}.

    Reasons for BadSample: "missing_audio", "missing_txt", "bad_utf8", "bad_json" (unparsable or not an object),
    "bad_audio" (bad header, truncated, undecodable, empty), "audio_too_long" (> max_seconds). json is optional.
    """
    key = sample.get("__key__")
    ext = next((e for e in AUDIO_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_audio", str(key))
    if sample.get("txt") is None:
        raise BadSample("missing_txt", str(key))
    try:
        text = bytes(sample["txt"]).decode("utf-8", errors="strict")
        meta = json.loads(bytes(sample["json"]).decode("utf-8", errors="strict")) if "json" in sample else {}
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", str(e)) from None
    except (ValueError, RecursionError) as e:
        raise BadSample("bad_json", str(e)[:200]) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    audio = _decode_audio(bytes(sample[ext]), max_seconds)
    return {"key": key, "audio": audio, "sr": SAMPLE_RATE, "text": text.strip(), "meta": meta}


def iter_audio_samples(paths: Iterable, skips: SkipCounter | None = None, *, max_seconds: float | None = None,
                       max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield decoded audio-text samples from shards, skipping and counting bad tars, members and samples."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_samples(paths, skips, max_member_bytes=max_member_bytes):
        try:
            yield decode_audio_sample(sample, max_seconds)
        except BadSample as e:
            skips.add(e.reason)
