"""Speech data: TTS engines, the audio-text decoder and the speech kit builder (CPU, no data cache needed)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from webdataset import TarWriter

from data import tts
from data.audio import decode_audio_sample, iter_audio_samples
from data.fetch import default_cache_dir
from data.shards import BadSample, SkipCounter, iter_samples
from data.speech_kit import build_speech_kit, sqa_items, voice_pools

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def espeak():
    try:
        return tts.EspeakEngine()
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"espeak-ng unavailable: {e}")


def _flac(x: np.ndarray, sr: int = 16000, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _tone(seconds: float, sr: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ---- engines --------------------------------------------------------------------------------------------

def test_espeak_sentence_is_16k_and_plausibly_long(espeak):
    wav = tts.synthesize(espeak, SENTENCE, "en-us")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 1.0 < len(wav) / tts.SR < 6.0  # nine words at ~175 wpm
    assert float(np.sqrt((wav ** 2).mean())) > 0.01 and np.abs(wav).max() <= 1.0


def test_espeak_voices_rate_and_pitch_change_the_audio(espeak):
    a = tts.synthesize(espeak, SENTENCE, "en-us+m3")
    b = tts.synthesize(espeak, SENTENCE, "en-gb-scotland+f2")
    c = tts.synthesize(espeak, SENTENCE, "en-gb")  # id en-gb maps to espeak-ng's "en" voice file
    assert len({a.tobytes(), b.tobytes(), c.tobytes()}) == 3
    fast = tts.synthesize(espeak, SENTENCE, "en-us", rate=1.3)
    slow = tts.synthesize(espeak, SENTENCE, "en-us", rate=0.8)
    assert len(fast) < 0.8 * len(slow)
    high = tts.synthesize(espeak, SENTENCE, "en-us", pitch=1.3)
    assert not np.array_equal(high[: len(a)], tts.synthesize(espeak, SENTENCE, "en-us")[: len(high)])
    with pytest.raises(ValueError, match="not found"):
        espeak.synth("hello", "xx-nonexistent")


@pytest.mark.data_cache
@pytest.mark.parametrize("engine", ["flite", "festival"])
def test_debian_engines_from_the_cache(engine):
    try:
        eng = tts.make_engine(engine, tts.engine_spec(engine, default_cache_dir(), fetch=False))
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"{engine} not fetched: {e}")
    outs = [tts.synthesize(eng, SENTENCE, v) for v in eng.voices]
    for wav in outs:
        assert wav.dtype == np.float32 and 1.0 < len(wav) / tts.SR < 8.0
    assert len({w.tobytes() for w in outs}) == len(outs)


def test_to_16k_resamples_downmixes_and_speed_perturbs():
    x = _tone(1.0, 22050)
    assert abs(len(tts.to_16k(x, 22050)) - 16000) <= 1
    stereo = np.stack([x, -x], axis=1)  # (T, 2): downmix cancels
    assert np.abs(tts.to_16k(stereo, 22050)).max() < 1e-6
    assert len(tts.to_16k(x, 22050, speed=1.1)) < len(tts.to_16k(x, 22050, speed=0.9))


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_add_noise_hits_the_snr(color):
    clean = 0.3 * _tone(1.0)
    noisy = tts.add_noise(clean, 10.0, np.random.default_rng(0), color)
    snr = 10 * np.log10((clean ** 2).sum() / ((noisy - clean) ** 2).sum())
    assert noisy.dtype == np.float32 and abs(snr - 10.0) < 0.5


# ---- decoding ---------------------------------------------------------------------------------------------

def _write(path, samples):
    with TarWriter(str(path), mtime=0.0) as w:
        for s in samples:
            w.write(s)
    return path


def test_decode_round_trip(tmp_path):
    tone = _tone(1.5)
    stereo = np.stack([_tone(1.0, 22050), _tone(1.0, 22050)], axis=1)
    meta = {"language": "en", "voice": "espeak:en-us", "engine": "espeak", "duration": 1.5, "task": "asr"}
    shard = _write(tmp_path / "a.tar", [
        {"__key__": "u0", "flac": _flac(tone), "txt": b"a tone", "json": json.dumps(meta).encode()},
        {"__key__": "u1", "wav": _flac(stereo, 22050, "WAV"), "txt": "zwei".encode()},
    ])
    out = [decode_audio_sample(s) for s in iter_samples([shard])]
    assert [o["key"] for o in out] == ["u0", "u1"]
    assert out[0]["sr"] == 16000 and out[0]["text"] == "a tone" and out[0]["meta"] == meta
    assert out[0]["audio"].dtype == np.float32 and out[0]["audio"].shape == tone.shape
    assert np.abs(out[0]["audio"] - tone).max() < 1e-3  # 16-bit FLAC is lossless up to quantisation
    assert abs(len(out[1]["audio"]) - 16000) <= 1 and out[1]["meta"] == {}  # resampled, downmixed, json optional


def _reason(sample: dict) -> str:
    with pytest.raises(BadSample) as e:
        decode_audio_sample(sample)
    return e.value.reason


def test_bad_samples_give_the_right_reasons(tmp_path):
    wav, flac = _flac(_tone(1.0), fmt="WAV"), _flac(_tone(1.0))
    ok = {"__key__": "k", "txt": b"hi"}
    assert _reason({**ok, "wav": b"JUNK" + wav[4:]}) == "bad_audio"  # corrupt header
    assert _reason({**ok, "wav": wav[: len(wav) // 2]}) == "bad_audio"  # truncated WAV
    assert _reason({**ok, "flac": flac[: len(flac) // 2]}) == "bad_audio"  # truncated FLAC
    assert _reason({**ok, "flac": b""}) == "bad_audio"
    assert _reason({"__key__": "k", "flac": flac}) == "missing_txt"
    assert _reason({**ok}) == "missing_audio"
    assert _reason({**ok, "flac": flac, "json": b"{not json"}) == "bad_json"
    assert _reason({**ok, "flac": flac, "json": b"[1, 2]"}) == "bad_json"
    assert _reason({**ok, "flac": _flac(np.zeros(61 * 8000, np.float32), 8000)}) == "audio_too_long"
    shard = _write(tmp_path / "b.tar", [{"__key__": "good", "flac": flac, "txt": b"fine"},
                                        {"__key__": "bad", "flac": flac[:100], "txt": b"cut"},
                                        {"__key__": "notxt", "flac": flac}])
    skips = SkipCounter()
    assert [s["key"] for s in iter_audio_samples([shard], skips)] == ["good"]
    assert skips.as_dict() == {"bad_audio": 1, "missing_txt": 1}


# ---- the kit ------------------------------------------------------------------------------------------------

CAPTIONS = [{"caption": c, "category": cat, "label": lab, "translations": tr} for c, cat, lab, tr in [
    ("A brown hen.", "animals", "brown hen", {"es": "Una gallina marrón.", "fr": "Une poule brune."}),
    ("A red apple.", "food", "red apple", {"es": "Una manzana roja.", "fr": "Une pomme rouge."}),
    ("A yellow bus.", "vehicles", "yellow bus", {"es": "Un autobús amarillo.", "fr": "Un bus jaune."}),
    ("A green frog.", "animals", "green frog", {"es": "Una rana verde.", "fr": "Une grenouille verte."}),
]]
SENTENCES = [f"The {a} {b} walked to the {c}." for a in ("old", "young", "tall") for b in ("man", "dog", "cat")
             for c in ("store", "river")]


def test_tiny_kit_holds_out_whole_voices_and_carries_translations(tmp_path, espeak):
    cfg = {"engines": ["espeak"], "voices": ["espeak:en-us", "espeak:en-gb"], "heldout_voices": ["espeak:en-gb"],
           "sentences": SENTENCES, "captions": CAPTIONS, "n_asr": 16, "caption_share": 0.25, "n_ast": 6,
           "ast_languages": ["es", "fr"], "n_sqa": 6, "val_frac": 0.3, "processes": 1, "shard_size": 8}
    m = build_speech_kit(None, tmp_path, cfg)
    assert m["heldout_voices"] == ["espeak:en-gb"] and m["failed"] == {}
    seen: dict = {"train": [], "val": []}
    for split in seen:
        shards = [tmp_path / "audio" / s for s in m["splits"][split]["shards"]]
        skips = SkipCounter()
        seen[split] = list(iter_audio_samples(shards, skips))
        assert skips.total() == 0 and len(seen[split]) == m["splits"][split]["utterances"] > 0
    assert {s["meta"]["voice"] for s in seen["train"]} == {"espeak:en-us"}
    assert {s["meta"]["voice"] for s in seen["val"]} == {"espeak:en-gb"}
    assert not {s["text"] for s in seen["train"]} & {s["text"] for s in seen["val"]}
    samples = seen["train"] + seen["val"]
    assert m["total_utterances"] == len(samples) == 28
    by_caption = {c["caption"]: c["translations"] for c in CAPTIONS}
    ast = [s for s in samples if s["meta"]["task"] == "ast"]
    assert len(ast) == 6
    for s in ast:
        tr = s["meta"]["translation"]
        assert tr["lang"] in ("es", "fr") and tr["text"] == by_caption[s["text"]][tr["lang"]]
    for s in samples:
        assert s["sr"] == 16000 and abs(len(s["audio"]) / 16000 - s["meta"]["duration"]) < 0.01
        assert s["meta"]["engine"] == "espeak" and s["meta"]["language"] == "en"
        if s["meta"]["task"] == "sqa":
            assert s["meta"]["question"] == s["text"] and s["meta"]["answer"]
        if s in seen["val"]:
            assert s["meta"]["snr_db"] is None and s["meta"]["speed"] == 1.0  # val audio is clean


def test_voice_pools_and_sqa_templates():
    cfg = {"voices": None, "heldout_voices": ["espeak:en-gb-scotland+f4", "flite:awb"]}
    pools = voice_pools(cfg, ["espeak"])  # flite unavailable: its held-out voice simply does not occur
    assert pools["val"] == {"espeak": ["espeak:en-gb-scotland+f4"]}
    assert "espeak:en-gb-scotland+f4" not in pools["train"]["espeak"] and len(pools["train"]["espeak"]) == 89
    with pytest.raises(ValueError, match="unknown voice"):
        voice_pools({"voices": ["espeak:en-us+nope"], "heldout_voices": []}, ["espeak"])
    import random

    qa = {q["question"]: q["answer"] for q in sqa_items(CAPTIONS, random.Random(0))}
    assert qa["What is two plus three?"] == "five" and qa["What colour is the hen?"] == "brown"
    assert qa["What kind of thing is a red apple?"] == "food"
