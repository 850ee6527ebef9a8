"""`mm data inspect`: read shards of any modality with our own decoders, count what is there and what was
skipped (by reason), and draw a contact sheet of the first examples."""
from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.decode import IMAGE_EXTS, VIDEO_EXTS, decode_image_sample, decode_json, decode_npy, decode_video_sample
from data.shards import BadSample, SkipCounter, decode_text_sample, expand_shards, iter_samples

AUDIO_EXTS = ("flac", "wav")
THUMB = 96


def _waveform_thumb(decoded: dict) -> np.ndarray | None:
    """A (THUMB, THUMB, 3) envelope plot of the first 1-D array in an audio decoder's output dict."""
    wave = next((np.asarray(v, dtype=np.float32) for v in decoded.values()
                 if hasattr(v, "shape") and len(getattr(v, "shape", ())) == 1 and v.shape[0] > 1), None)
    if wave is None:
        return None
    img = np.full((THUMB, THUMB, 3), 255, np.uint8)
    chunks = np.array_split(np.abs(wave), THUMB)
    peak = max(1e-6, float(np.abs(wave).max()))
    for x, c in enumerate(chunks):
        half = int((c.max() if c.size else 0.0) / peak * (THUMB // 2 - 1))
        img[THUMB // 2 - half:THUMB // 2 + half + 1, x] = (40, 90, 200)
    return img


def decode_any(sample: dict) -> dict:
    """Decode one raw sample by its members -> {"modality", "thumb" (H, W, 3) uint8 or None, "caption", "info"}.

    Images and the middle video frame go through data.decode; audio through data.audio.decode_audio_sample when
    that module exists; txt/json/npy-only samples through the strict text/json/npy decoders. Raises BadSample.
    """
    keys = {k for k in sample if not k.startswith("__")}
    if keys & set(IMAGE_EXTS):
        d = decode_image_sample(sample)
        return {"modality": "image", "thumb": d["image"], "caption": d["caption"], "info": d["meta"]}
    if keys & set(VIDEO_EXTS):
        d = decode_video_sample(sample, num_frames=1)  # the middle frame (uniform sampling with N=1)
        return {"modality": "video", "thumb": d["frames"][0], "caption": d["caption"],
                "info": {**d["meta"], "decoded_fps": d["fps"]}}
    if keys & set(AUDIO_EXTS):
        try:
            from data.audio import decode_audio_sample
        except ImportError:
            raise BadSample("no_audio_decoder", "data.audio is not available") from None
        d = decode_audio_sample(sample)
        caption = d.get("text") or d.get("transcript") or d.get("caption") or ""
        return {"modality": "audio", "thumb": _waveform_thumb(d), "caption": str(caption),
                "info": {k: v for k, v in d.items() if isinstance(v, (str, int, float))}}
    if "txt" in keys:
        d = decode_text_sample(sample)
        return {"modality": "text", "thumb": None, "caption": d["text"], "info": {"source": d["source"]}}
    if "npy" in keys:
        arr = decode_npy(sample["npy"])
        return {"modality": "npy", "thumb": None, "caption": "", "info": {"shape": list(arr.shape)}}
    if "json" in keys:
        return {"modality": "json", "thumb": None, "caption": "", "info": decode_json(sample["json"])}
    raise BadSample("unknown_sample", f"{sample.get('__key__')}: members {sorted(keys)}")


def contact_sheet(examples: list[tuple[np.ndarray, str]], out_png, cols: int = 8) -> Path:
    """Grid of (thumbnail, caption) cells, THUMB px images with two caption lines under each; saved as PNG."""
    from data.image_synth import font

    cols = max(1, min(cols, len(examples)))
    rows = (len(examples) + cols - 1) // cols
    cell_h = THUMB + 24
    sheet = Image.new("RGB", (cols * THUMB, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(examples):
        x, y = (i % cols) * THUMB, (i // cols) * cell_h
        if img is not None:
            thumb = Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        lines = textwrap.wrap(" ".join(caption.split()), 22)[:2]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + THUMB + 1 + 11 * j), line, fill=(0, 0, 0), font=font(9))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def inspect_shards(spec, out_png: Path | None = None, max_examples: int = 16, limit: int | None = None) -> dict:
    """Read the shards of `spec` (glob, brace pattern, dir or list; a non-tar file counts as bad_tar) and decode
    every sample with our decoders (pickle members are never decoded). Returns {"samples", "decoded",
    "modalities", "extensions": {ext: count}, "skipped": {reason: count}, "examples": [...], "contact_sheet"}.
    `limit` stops after that many samples."""
    skips = SkipCounter()
    exts: Counter = Counter()
    modalities: Counter = Counter()
    examples, thumbs, n = [], [], 0
    for sample in iter_samples(expand_shards(spec), skips):
        n += 1
        exts.update(k for k in sample if not k.startswith("__"))
        try:
            d = decode_any(sample)
        except BadSample as e:
            skips.add(e.reason)
            continue
        modalities[d["modality"]] += 1
        if len(examples) < max_examples:
            info = d["info"]
            examples.append({"key": sample["__key__"], "shard": Path(sample["__url__"]).name,
                             "modality": d["modality"], "caption": d["caption"][:160],
                             "shape": None if d["thumb"] is None else list(np.asarray(d["thumb"]).shape),
                             **{k: info[k] for k in ("source", "family", "label") if k in info}})
            thumbs.append((d["thumb"], d["caption"]))
        if limit is not None and n >= limit:
            break
    sheet = contact_sheet(thumbs, out_png) if out_png is not None and thumbs else None
    return {"samples": n, "decoded": sum(modalities.values()), "modalities": dict(modalities),
            "extensions": dict(sorted(exts.items())), "skipped": skips.as_dict(), "examples": examples,
            "contact_sheet": None if sheet is None else str(sheet)}
