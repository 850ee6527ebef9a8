"""Recorded human speech and the offline ASR peers: the Asterisk transcripts written as spoken, the G.722 prompts
into an audio-text shard the speech eval reads with its subsets, and peers scored (and paired) on the same items."""
import gzip
import json

import av
import numpy as np
import pytest
import torch

from data import human_speech_kit as hk
from data.audio import SAMPLE_RATE
from mm.eval import asr_peer
from mm.eval.ocr_peer import PeerMissing
from mm.eval.speech import load_audio_items
from mm.eval.wer import grouped_wer, item_tags


def write_g722(path, seconds: float, freq: float) -> None:
    """A tone encoded with FFmpeg's G.722 encoder (the packages' format: headerless, 16 kHz)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="g722") as out:
        st = out.add_stream("g722", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in st.encode(frame):
            out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)


def test_transcripts_are_written_as_spoken():
    assert hk.spoken("Press 1 or #.") == "Press one or pound."
    assert hk.spoken("at least a 28.8 kilobit modem") == "at least a twenty-eight point eight kilobit modem"
    assert hk.spoken("dial 500 now, or *") == "dial five hundred now, or star"
    assert hk.spoken("dot [.]") == "dot"
    for silent in ("[this is a simple beep tone]", "(5 seconds of silence)", "<beep ascending>"):
        assert hk.spoken(silent) == ""
    assert hk.letters_only("Please hold while I try that extension.")
    assert not hk.letters_only("Thank you.")  # two words
    assert not hk.letters_only("Press 4 for the previous message")
    assert not hk.letters_only("dollar [$] sign here")


def test_kit_writes_the_prompts_the_speech_eval_reads_with_subsets(tmp_path, monkeypatch):
    audio, doc = tmp_path / "audio", tmp_path / "doc"
    (audio / "digits").mkdir(parents=True)
    doc.mkdir()
    write_g722(audio / "agent-pass.g722", 1.0, 440.0)
    write_g722(audio / "digits" / "5.g722", 0.5, 660.0)
    write_g722(audio / "beep.g722", 0.3, 1000.0)
    write_g722(audio / "orphan.g722", 0.3, 1000.0)  # no transcript: not a prompt
    lines = ["; Core Asterisk Sounds in English", "", "agent-pass: Please enter your password followed by the pound key.",
             "digits/5: 5", "beep: [this is a simple beep tone]", "missing-audio: Goodbye."]
    (doc / "core-sounds-en.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    got = hk.prompts(audio, doc)
    assert [p["name"] for p in got] == ["agent-pass", "beep", "digits/5"]
    assert abs(len(got[0]["audio"]) - SAMPLE_RATE) < 400 and got[0]["audio"].dtype == np.float32
    assert 0.2 < float(np.abs(got[0]["audio"]).max()) < 0.4  # the tone's level survives the codec
    monkeypatch.setattr(hk, "fetch_human_speech", lambda cache, progress=True: {"asterisk_en_g722": audio,
                                                                                "asterisk_en": doc})
    m = hk.build_human_speech_kit(tmp_path / "cache", tmp_path / "out")
    assert (m["samples"], m["with_speech"], m["letters_only"]) == (3, 2, 1)
    items, skips = load_audio_items(str(tmp_path / "out" / "speech_human" / "val-*.tar"))
    assert not skips
    by = {it["meta"]["prompt"]: it for it in items}
    assert by["digits/5"]["text"] == "five" and by["beep"]["text"] == ""
    assert item_tags(by["agent-pass"]["meta"]) == ("letters_only",) and item_tags(by["digits/5"]["meta"]) == ()
    assert {it["meta"]["voice"] for it in items} == {hk.VOICE}


def test_grouped_wer_and_tags_take_only_lists():
    refs, hyps = ["a b c d", "e f", "g h"], ["a b c d", "x f", "g h"]
    assert grouped_wer(refs, hyps, [("v1", "t"), ("v2", "t"), ("v1",)]) == {"t": 1 / 6, "v1": 0.0, "v2": 0.5}
    assert item_tags({"tags": "letters_only"}) == () and item_tags({"tags": [1]}) == ("1",) and item_tags({}) == ()


def test_peer_scored_on_the_same_items_and_paired_against_ours(monkeypatch):
    rng = np.random.default_rng(0)
    items = [{"audio": rng.standard_normal(1600 + 10 * i).astype(np.float32), "text": t,
              "meta": {"voice": "v", "tags": ["letters_only"] if i % 2 else []}}
             for i, t in enumerate(["the cat sat", "a dog ran", "red blue green", "big small tall"] * 2)]
    truth = {len(it["audio"]): it["text"] for it in items}
    perfect = lambda audio: truth[len(audio)]  # noqa: E731  a recogniser that is always right
    monkeypatch.setattr(asr_peer, "transcriber", lambda name: perfect)
    ours = ["the cat sat", "a dog", "red blue green", "big"] * 2  # 6 errors in 24 words
    fig = asr_peer.peer_figures("moonshine", items, ours)
    assert fig["wer"] == 0.0 and fig["wer_by_tag"] == {"letters_only": 0.0} and fig["items"] == 8
    assert fig["ours"] == pytest.approx(0.25) and fig["ours_minus_peer"] == pytest.approx(0.25)
    assert fig["ci95"][0] > 0  # the peer makes no error; half the utterances hold ours

    def missing(name):
        raise PeerMissing(f"{name} is not installed (pip install it)")
    monkeypatch.setattr(asr_peer, "transcriber", missing)
    assert asr_peer.peer_figures("pocketsphinx", items, ours) == {
        "name": "pocketsphinx", "error": "pocketsphinx is not installed (pip install it)"}
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown speech peer 'whisper'"):
        asr_peer.transcriber("whisper")


def test_speech_benchmark_refuses_no_model_and_no_peer(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_speech", Path(__file__).resolve().parent.parent / "benchmarks" / "speech.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shards", "nothing-*.tar"]) == 2
    err = capsys.readouterr()
    assert "give --ckpt (a speech run) or --peer" in err.err
    assert json.loads(err.out.strip().splitlines()[-1])["ok"] is False


def test_text_oracle_types_each_transcript_under_the_asr_prompt(monkeypatch):
    from data.speech_tasks import ASR_PROMPT
    from mm.eval import speech

    calls = []

    def fake_respond(model, fmt, system, audio, max_new_tokens=48, featurize=None, text=""):
        calls.append((system, audio, text))
        return text if "copy" in text else "something else entirely"  # copies only some sentences
    monkeypatch.setattr(speech, "respond", fake_respond)
    items = [{"audio": np.zeros(160, np.float32), "text": "please copy this line", "meta": {"tags": ["letters_only"]}},
             {"audio": np.zeros(160, np.float32), "text": "a dog ran", "meta": {}}]
    out = speech.text_oracle(torch.nn.Identity(), None, items)
    assert all(s == ASR_PROMPT.format(language="English") and a is None for s, a, _ in calls)  # typed, never heard
    assert [t for _, _, t in calls] == ["please copy this line", "a dog ran"]
    assert out["text_wer_by_tag"] == {"letters_only": 0.0} and out["text_wer"] == pytest.approx(3 / 7)
    assert out["items"] == 2 and out["text_examples"][1] == {"ref": "a dog ran", "hyp": "something else entirely"}
