"""`mm chat --audio F.wav` on a speech_sft run: the file decoded by the project's audio decoder (soundfile, any rate
resampled to 16 kHz mono, truncated or unreadable files refused), spliced into the frozen LM's input and answered
greedily. The instruction is the system prompt the model was trained with (ASR by default)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.audio import MAX_SECONDS, _decode_audio
from data.shards import BadSample
from llm.tokenizer import ChatFormat
from mm.eval_speech import respond
from mm.speech import ASR_PROMPT, SpeechLM

DEFAULT_PROMPT = ASR_PROMPT.format(language="English")


def read_audio_file(path: str | Path, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """A wav/flac file -> float32 (N,) at 16 kHz; FileNotFoundError / ValueError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such audio file")
    try:
        return _decode_audio(p.read_bytes(), max_seconds)
    except BadSample as e:
        raise ValueError(f"{p}: not a readable wav/flac file ({str(e).splitlines()[0]})") from None


def chat_about_audio(model: SpeechLM, tok, path: str | Path, system: str | None = DEFAULT_PROMPT,
                     max_new_tokens: int = 64) -> str:
    """Greedy reply to the audio file under a system prompt (None or "": no system prompt, spoken dialogue)."""
    return respond(model, ChatFormat(tok), system or None, read_audio_file(path), max_new_tokens)
