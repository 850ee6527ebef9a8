"""Offline speech recognisers a user would pick instead, scored on the same held-out utterances as the speech model
with the same normaliser and corpus WER (DATA.md §6): Moonshine base-en (`pip install moonshine-cpp`, a neural
encoder-decoder; the English model ships in the wheel) and PocketSphinx (`pip install pocketsphinx`, an HMM
recogniser with its bundled en-us model). Both are optional dependencies (`pip install -e .[peers]`)."""
from __future__ import annotations

import importlib.util
import multiprocessing
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data.audio import SAMPLE_RATE
from data.speech_tasks import task_choices
from mm.eval.ocr_peer import PeerMissing
from mm.eval.wer import corpus_wer, grouped_wer, item_tags, paired_wer_delta

PEERS = ("moonshine", "pocketsphinx")
MOONSHINE_UTTERANCES = 16  # per worker process (its leak: about 17 MB per second of audio)
_MOONSHINE: list = []  # the worker's model


def _moonshine_init() -> None:
    import moonshine_cpp

    _MOONSHINE.append(moonshine_cpp.MoonshineModel())  # base-en from inside the wheel: nothing is downloaded


def _moonshine_transcribe(pcm: np.ndarray) -> str:
    with tempfile.TemporaryDirectory() as d:  # its Python binding reads 16-bit wav files
        path = Path(d) / "utt.wav"
        sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16")
        return _MOONSHINE[0].transcribe_wav(str(path)).strip()


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2")  # (T,) int16


def transcriber(name: str) -> Callable[[np.ndarray], str]:
    """name -> transcribe(16 kHz float waveform (T,)) -> text; PeerMissing (saying how to install it) when absent."""
    if name == "moonshine":
        if importlib.util.find_spec("moonshine_cpp") is None:  # it loads in the worker processes
            raise PeerMissing("moonshine-cpp is not installed (pip install moonshine-cpp==0.1.4)")
        # moonshine-cpp 0.1.4 keeps about 17 MB per second of audio it has transcribed until its process ends, so the
        # model lives in a worker process that is replaced every MOONSHINE_UTTERANCES utterances (a daemon: it ends
        # with this process)
        pool = multiprocessing.get_context("spawn").Pool(1, initializer=_moonshine_init,
                                                         maxtasksperchild=MOONSHINE_UTTERANCES)

        def transcribe(audio: np.ndarray) -> str:
            return pool.apply(_moonshine_transcribe, (_pcm16(audio),))
        return transcribe
    if name == "pocketsphinx":
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise PeerMissing("pocketsphinx is not installed (pip install pocketsphinx==5.1.1)") from None
        decoder = Decoder(samprate=SAMPLE_RATE, logfn="/dev/null")

        def transcribe(audio: np.ndarray) -> str:
            decoder.start_utt()
            decoder.process_raw(_pcm16(audio).tobytes(), full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
            return hyp.hypstr.strip() if hyp is not None else ""
        return transcribe
    raise ValueError(f"unknown speech peer {name!r}; known: {', '.join(PEERS)}")


def peer_eval(items: list[dict], transcribe: Callable[[np.ndarray], str], progress: bool = False) -> dict:
    """The peer's transcripts of audio items (load_audio_items' records) scored like speech_eval's ASR:
    {"items", "wer", "wer_by_voice", "wer_by_tag" (when the items carry json "tags"), "per_item": {"refs", "hyps"}}."""
    refs, hyps, voices, tags = [], [], [], []
    for it in tqdm(items, desc="peer", disable=not progress, leave=False):
        meta = it.get("meta") or {}
        refs.append(task_choices(it["text"], meta)["asr"][1])
        hyps.append(transcribe(it["audio"]))
        voices.append((meta.get("voice", "?"),))
        tags.append(item_tags(meta))
    out = {"items": len(items), "wer": corpus_wer(refs, hyps), "wer_by_voice": grouped_wer(refs, hyps, voices)}
    if any(tags):
        out["wer_by_tag"] = grouped_wer(refs, hyps, tags)
    out["per_item"] = {"refs": refs, "hyps": hyps}
    return out


def peer_figures(name: str, items: list[dict], ours: list[str] | None = None) -> dict:
    """The peer `name` on audio items: peer_eval's figures without its transcripts, and with our transcripts `ours`
    of the same items the paired difference "ours_minus_peer" (our WER minus the peer's) with its bootstrap "ci95";
    {"name", "error"} when the peer is not installed."""
    try:
        transcribe = transcriber(name)
    except PeerMissing as e:
        return {"name": name, "error": str(e)}
    res = peer_eval(items, transcribe, progress=True)
    per = res.pop("per_item")
    out = {"name": name, **res}
    if ours is not None and res["wer"] is not None:
        d = paired_wer_delta(per["refs"], ours, per["hyps"], n_boot=1000)
        out.update({"ours": d["wer_a"], "ours_minus_peer": d["delta"], "ci95": d["ci95"]})
    return out
