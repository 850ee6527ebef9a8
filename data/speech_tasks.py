"""Speech tasks as dialogs (PAPER.md §9.1): the ASR / AST system prompts, the tasks an audio sample supports, and the
character targets of the encoder's character CTC."""
from __future__ import annotations

from data.audio import SAMPLE_RATE

ASR_PROMPT = "Repeat after me in {language}:"
AST_PROMPT = "Translate the following sentence into {language}:"
# ISO 639-1 codes of the paper's 34 languages (PAPER.md §9.1) -> the names the prompts use
LANGUAGES = {"ar": "Arabic", "bn": "Bengali", "zh": "Chinese", "cs": "Czech", "nl": "Dutch", "en": "English",
             "fi": "Finnish", "fr": "French", "de": "German", "el": "Greek", "gu": "Gujarati", "hi": "Hindi",
             "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "kn": "Kannada", "ko": "Korean",
             "ml": "Malayalam", "mr": "Marathi", "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
             "ru": "Russian", "es": "Spanish", "sw": "Swahili", "sv": "Swedish", "ta": "Tamil", "te": "Telugu",
             "th": "Thai", "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese"}
CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # the character CTC's symbols; id 0 is the blank, so CHARS[i] has id i + 1
REPLY_TOKENS_PER_S = 12.5  # a reply's cap per second of audio: one token per 80 ms, above any speaking rate


def reply_cap(n_samples: int, max_new_tokens: int) -> int:
    """max_new_tokens, at most REPLY_TOKENS_PER_S per second of 16 kHz audio (at least 1): a greedy repetition loop
    cannot add unbounded insertions to a transcript."""
    return min(max_new_tokens, max(1, round(n_samples * REPLY_TOKENS_PER_S / SAMPLE_RATE)))


def language_name(code: str) -> str:
    """'es' -> 'Spanish' (unknown codes are used as given)."""
    return LANGUAGES.get(code, code)


def task_choices(text: str, meta: dict) -> dict[str, tuple[str | None, str]]:
    """The tasks one audio sample supports: {"asr": (system, transcript), "ast": (system, translation)?,
    "sqa": (None, answer)?} (spoken questions take no system prompt, PAPER.md §9.1)."""
    lang = (meta or {}).get("language") or "en"
    out = {"asr": (ASR_PROMPT.format(language=language_name(lang)), text)}
    tr = (meta or {}).get("translation")
    if isinstance(tr, dict) and tr.get("text") and tr.get("lang"):
        out["ast"] = (AST_PROMPT.format(language=language_name(tr["lang"])), str(tr["text"]))
    if (meta or {}).get("answer"):
        out["sqa"] = (None, str(meta["answer"]))
    return out


def char_text(text: str) -> str:
    """Transcript -> what the character CTC spells: lower-cased, other characters dropped, runs of spaces collapsed."""
    return " ".join("".join(c for c in text.lower() if c in CHARS).split())


def char_ids(text: str) -> list[int]:
    """Transcript -> character CTC targets (the ids of char_text's characters)."""
    return [CHARS.index(c) + 1 for c in char_text(text)]
