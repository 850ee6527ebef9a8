"""Recorded human speech for evaluation only (DATA.md §6; never trained on): the 568 Asterisk English prompts, one
professional speaker (en_US_f_Allison), 16 kHz G.722 from Debian asterisk-core-sounds-en-g722, with the transcripts of
asterisk-core-sounds-en. Transcripts are written as spoken: digits and symbols spelled out, bracketed notes dropped;
prompts that hold no speech (tones, silence) get an empty transcript, which corpus WER counts as no words.
Writes out_dir/speech_human/val-000000.tar (members flac, txt, json: the audio-text shard format) + manifest.json.
Every sample's json has engine "human", voice "en_US_f_Allison", the prompt name and "tags": "letters_only" for the
prompts whose written transcript has only letters and punctuation and at least 3 words (the subset the offline peers
are quoted on in DATA.md).
"""
from __future__ import annotations

import gzip
import io
import json
import random
import re
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from num2words import num2words

from data.audio import SAMPLE_RATE
from data.fetch import fetch_one
from data.image_kit import write_shards

VOICE = "en_US_f_Allison"
KEYS = ("asterisk_en_g722", "asterisk_en")
_NOTE = re.compile(r"\s*\[[^\]]*\]")  # "dot [.]" -> "dot": the bracket shows the symbol a word names
_NONSPEECH = re.compile(r"\s*(\[.*\]|<.*>|\(\d+ seconds? of silence\))\s*")
_SYMBOLS = {"*": " star ", "#": " pound ", "&": " and ", "%": " percent ", "@": " at ", "+": " plus ", "=": " equals "}
_NUMBER = re.compile(r"\d+(\.\d+)?")
_LETTERS_ONLY = re.compile(r"[^0-9\[\]<>()*#$@/=+&%]+")


def spoken(text: str) -> str:
    """A written prompt as spoken words: "press 1 or #" -> "press one or pound", "28.8" -> "twenty-eight point
    eight", "dot [.]" -> "dot"; a prompt of no speech ("[beep tone]", "(5 seconds of silence)") -> ""."""
    if _NONSPEECH.fullmatch(text):
        return ""
    text = _NOTE.sub("", text)
    for sym, word in _SYMBOLS.items():
        text = text.replace(sym, word)
    text = _NUMBER.sub(lambda m: f" {num2words(float(m[0]) if m[1] else int(m[0]))} ", text)
    return " ".join(re.sub(r"\s+([,.;:!?])", r"\1", text).split())


def letters_only(text: str) -> bool:
    """The peers' subset: a written transcript of letters and punctuation only, at least 3 words."""
    return bool(_LETTERS_ONLY.fullmatch(text)) and len(text.split()) >= 3


def transcripts(doc_dir: Path) -> dict[str, str]:
    """{prompt name (e.g. "digits/5"): written transcript} from core-sounds-en.txt.gz (`name: text` lines, `;`
    comments)."""
    out = {}
    for line in gzip.decompress((doc_dir / "core-sounds-en.txt.gz").read_bytes()).decode("utf-8").splitlines():
        if line.strip() and not line.startswith(";"):
            name, sep, text = line.partition(":")
            if sep:
                out[name.strip()] = text.strip()
    return out


def decode_g722(path: Path) -> np.ndarray:
    """One G.722 file -> 16 kHz mono float32 (T,) in [-1, 1] (PyAV's FFmpeg decoder; G.722 is headerless)."""
    with av.open(str(path), format="g722") as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])  # (T,) int16
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz G.722, expected {SAMPLE_RATE}")
    return (x.astype(np.float32) / 32768.0).clip(-1.0, 1.0)


def prompts(audio_dir: Path, doc_dir: Path) -> list[dict]:
    """Every prompt with both audio and a transcript, sorted by name: {name, written, text (spoken), letters_only,
    audio (T,) float32}."""
    written = transcripts(doc_dir)
    out = []
    for path in sorted(audio_dir.rglob("*.g722")):
        name = path.relative_to(audio_dir).with_suffix("").as_posix()
        if name in written:
            out.append({"name": name, "written": written[name], "text": spoken(written[name]),
                        "letters_only": letters_only(written[name]), "audio": decode_g722(path)})
    return out


def fetch_human_speech(cache_dir, progress: bool = True) -> dict:
    """Fetch (pinned, sha256-checked) the two packages; {key: dir}."""
    return {k: str(fetch_one(k, Path(cache_dir), progress)) for k in KEYS}


def build_human_speech_kit(cache_dir, out_dir, seed: int = 0) -> dict:
    """Fetch the packages, write out_dir/speech_human/val-000000.tar and its manifest; returns the manifest. The
    prompts are in a seeded random order, so the first N (an eval's max_items) are a random sample of them."""
    dirs = {k: Path(v) for k, v in fetch_human_speech(cache_dir, progress=False).items()}
    items = prompts(dirs["asterisk_en_g722"], dirs["asterisk_en"])
    random.Random(f"{seed}:speech_human").shuffle(items)
    out = Path(out_dir) / "speech_human"
    for stale in out.glob("val-*.tar"):
        stale.unlink()

    def sample(i: int, p: dict) -> dict:
        buf = io.BytesIO()
        sf.write(buf, p["audio"], SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        meta = {"engine": "human", "voice": VOICE, "language": "en", "prompt": p["name"], "written": p["written"],
                "seconds": round(len(p["audio"]) / SAMPLE_RATE, 3),
                "tags": ["letters_only"] if p["letters_only"] else []}
        return {"__key__": f"human_{i:05d}", "flac": buf.getvalue(), "txt": p["text"].encode(),
                "json": json.dumps(meta, sort_keys=True).encode()}

    shards = write_shards((sample(i, p) for i, p in enumerate(items)), out, "val", 1000)
    manifest = {"samples": len(items), "shards": [s.name for s in shards],
                "with_speech": sum(bool(p["text"]) for p in items),
                "letters_only": sum(p["letters_only"] for p in items),
                "hours": round(sum(len(p["audio"]) for p in items) / SAMPLE_RATE / 3600, 3),
                "max_seconds": round(max(len(p["audio"]) for p in items) / SAMPLE_RATE, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
