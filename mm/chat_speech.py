"""`mm chat --audio F.wav` on a speech_sft run: the file decoded by the project's audio decoder (soundfile, any rate
resampled to 16 kHz mono, truncated or unreadable files refused), spliced into the frozen LM's input and answered
greedily. The instruction is the system prompt the model was trained with (ASR by default)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import soundfile as sf

from data.audio import _decode_audio
from data.decode import CAPS
from data.shards import BadSample
from llm.tokenizer import ChatFormat
from mm.eval.speech import respond
from mm.speech import ASR_PROMPT, SpeechLM

DEFAULT_PROMPT = ASR_PROMPT.format(language="English")


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


def chat_about_audio(model: SpeechLM, tok, path: str | Path, system: str | None = DEFAULT_PROMPT,
                     max_new_tokens: int = 64) -> str:
    """Greedy reply to the audio file under a system prompt (None or "": no system prompt, spoken dialogue)."""
    return respond(model, ChatFormat(tok), system or None, read_audio_file(path), max_new_tokens)
