"""The composed herd (mm.model.store.compose; DESIGN.md invariants 1, 5, 7): one frozen LM with the image, video and
speech streams at once. No media: bitwise the bare LM; one medium: bitwise the single-modality run's model (the video
run for image/video, the speech run for audio); all three in one user turn generate with cached media exactly as
uncached greedy decoding; `mm compose` compares LM weights (not paths) and refuses different LMs naming both files;
the composed checkpoint round-trips exactly; `mm chat` takes --image, --video and --audio together on a composed run
and keeps the single-modality paths."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from adapters.speech import SpeechAdapter, SpeechAdapterConfig, SpeechTokens
from adapters.temporal import AggregatorConfig
from data.dialog import dialog
from data.text_kit import pydoc_documents, write_text_shards
from data.video_kit import encode_mp4
from encoders.speech import ConformerEncoder, speech_shape
from encoders.vision import VisionEncoder
from llm.model import Llama, LlamaConfig
from llm.tokenizer import ChatFormat, Tokenizer, train_tokenizer
from mm.config import HerdReportConfig
from mm.model.chat import chat
from mm.model.checkpoint import CheckpointError, load_meta, load_tensors
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.media import Featurizer, read_audio_file
from mm.model.runs import load_lm, save_lm
from mm.model.store import lm_fingerprint, load_model, same_tokenizer, save_model
from mm.model.streams import Audio, ImageStream, SpeechStream, VideoStream
from mm.runner import run_config
from mm.stages.herd_report import herd_rows
from tests.shard_helpers import write_tar
from tests.test_video_stage import VCFG

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")
N = VCFG.tokens_per_tile  # encoder tokens per image / frame
AGG = AggregatorConfig(factor=4, width=16, n_latents=2, depth=1, heads=2, max_frames=8, max_tokens=N)
ENC = dict(dim=32, layers=2, heads=2, ffn_dim=64, kernel=7)


def _cli(*argv) -> tuple[int, dict]:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, json.loads(buf.getvalue().strip().splitlines()[-1])


def _speech_run(root: Path, name: str, lm_run: Path, tok) -> Path:
    torch.manual_seed(3)  # the same encoder + adapter for every speech run: only the LM differs
    enc = ConformerEncoder(speech_shape("tiny", **ENC))
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=16, heads=2, ffn_dim=32, out_dim=32))
    base, _, _ = load_lm(lm_run)
    save_model(root / name / "final", ComposedLM(base, speech=SpeechStream(enc, adapter, SpeechTokens.of(tok))), tok,
               {"stage": "speech_sft", "lm": str(lm_run / "final")})
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny LM (+ a copy in another folder, + another LM), a video run (image + video streams, gates open), the
    image run holding its image stream alone and speech runs on each LM, all built at init in-process; media files;
    the herd composed by `mm compose`."""
    root = tmp_path_factory.mktemp("herd")
    tok = train_tokenizer(["describe the image and the video. what do you hear? repeat after me in english: "
                           "a red hen and a blue car"] * 20, 300)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160)
    for name, seed in (("lm", 0), ("other", 5)):
        torch.manual_seed(seed)
        save_lm(root / name / "final", Llama(cfg).state_dict(), cfg, tok, {"stage": "lm_pretrain"})
    shutil.copytree(root / "lm", root / "lm_copy")  # the same weights in another folder
    lm, tok, _ = load_lm(root / "lm")
    torch.manual_seed(1)
    vision = VisionEncoder(VCFG)
    model = ComposedLM(lm, image=ImageStream.build(lm, tok.special_id("<|image|>"), vision,
                                                   {"kind": "gated_xattn", "every": 1}))
    torch.manual_seed(2)
    model.attach(VideoStream.build(model.lm, tok.special_id("<|video|>"), model.image, AGG, every=2, num_frames=8))
    with torch.no_grad():  # streams that do something
        for blk in [*model.image.blocks.values(), *model.video.blocks.values()]:
            blk.gate_attn.fill_(0.5)
            blk.gate_ffn.fill_(-0.5)
        for table in (model.image.token, model.video.token):  # trained `<|image|>` / `<|video|>` rows
            table.weight.add_(0.5 * torch.randn(table.weight.shape))
    lm_final = str(root / "lm" / "final")
    save_model(root / "video" / "final", model, tok, {"stage": "video_sft", "lm": lm_final})
    save_model(root / "image" / "final", ComposedLM(lm, image=model.image), tok, {"stage": "image_sft", "lm": lm_final})
    w = {"root": root, "video": root / "video", "image": root / "image", "lm": root / "lm", "other": root / "other"}
    for name, lm_run in (("speech", root / "lm"), ("speech_copy", root / "lm_copy"), ("speech_other", root / "other")):
        w[name] = _speech_run(root, name, lm_run, tok)
    # media files: a 16x16 PNG, an 8-frame MP4, 0.5 s of audio at 16 kHz
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "a.png")
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    for t in range(8):
        frames[t, 4:8, t:t + 4] = 230
    (root / "a.mp4").write_bytes(encode_mp4(frames, 8))
    t = np.arange(8000) / 16000
    sf.write(root / "a.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    rc, res = _cli("compose", "--video", w["video"], "--speech", w["speech"], "--out", root / "herd")
    assert rc == 0 and res["streams"] == ["image", "speech", "video"] and res["lm_sha256"] == lm_fingerprint(lm), res
    w["herd"] = root / "herd"
    return w


@pytest.fixture(scope="module")
def parts(world) -> dict:
    """The composed herd (loaded from disk) and, separately loaded, the runs it was composed from."""
    herd, tok, meta = load_model(world["herd"])
    video, _, _ = load_model(world["video"])
    speech, _, _ = load_model(world["speech"])
    lm, _, _ = load_lm(world["lm"])
    return {"herd": herd, "tok": tok, "meta": meta, "video": video, "speech": speech, "lm": lm}


def _feats(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _audio(model, seconds: float = 0.5, seed: int = 4) -> tuple[Audio, int]:
    wave = np.random.default_rng(seed).normal(size=int(16000 * seconds)).astype(np.float32) * 0.1
    return Featurizer()([wave]), model.speech.n_tokens(len(wave))


def _media_ids(model, n_speech: int) -> list[int]:
    """One user turn's media ids: the image, the clip, the speech span (the order of mm.model.chat)."""
    return [*model.image.placeholder_ids(), *model.video.placeholder_ids(), *model.speech.placeholder_ids(n_speech)]


def test_no_media_is_bitwise_the_bare_lm(parts):
    herd, lm = parts["herd"], parts["lm"]
    lm_sd = lm.state_dict()
    assert {k for k in herd.state_dict() if k in lm_sd} == lm_sd.keys()  # the LM's keys, unchanged
    assert all(torch.equal(herd.state_dict()[k], v) for k, v in lm_sd.items())  # LM unchanged
    toks = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(herd(toks), lm(toks))


def test_one_medium_is_bitwise_the_single_modality_model(parts):
    herd, video_run, speech, lm, tok = parts["herd"], parts["video"], parts["speech"], parts["lm"], parts["tok"]
    img, vid, ids = tok.special_id("<|image|>"), tok.special_id("<|video|>"), herd.speech.ids
    text = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    image = _feats(1, 1, N, VCFG.out_dim)
    video = _feats(1, 1, 8, N, VCFG.out_dim, seed=2)
    audio, n = _audio(herd)
    t_img = torch.cat([text[:, :3], torch.tensor([[img]]), text[:, 3:]], 1)
    t_vid = torch.cat([text[:, :3], torch.tensor([[vid]]), text[:, 3:]], 1)
    t_sp = torch.cat([text[:, :3], torch.tensor([ids.run(n)]), text[:, 3:]], 1)
    labels = torch.cat([t_sp[:, 1:], torch.full((1, 1), -100)], 1)
    with torch.no_grad():
        out_img = herd(t_img, image=image)
        assert torch.equal(out_img, video_run(t_img, image=image)) and not torch.equal(out_img, lm(t_img))
        out_vid = herd(t_vid, video=video)
        assert torch.equal(out_vid, video_run(t_vid, video=video)) and not torch.equal(out_vid, lm(t_vid))
        out_sp = herd(t_sp, speech=audio)
        assert torch.equal(out_sp, speech(t_sp, speech=audio)) and not torch.equal(out_sp, lm(t_sp))
        assert torch.equal(herd(t_sp, speech=audio, labels=labels),
                           speech(t_sp, speech=audio, labels=labels))  # speech positions ignored by the loss alike
        # all three in one sequence: each medium changes the logits after its own marker
        t3 = torch.cat([text[:, :2], torch.tensor([[img, vid]]), torch.tensor([ids.run(n)]), text[:, 2:]], 1)
        full = herd(t3, image=image, video=video, speech=audio)
        after = 4 + n + 1  # the first position after <|speech_end|>
        for other in (herd(t3, video=video, speech=audio), herd(t3, image=image, speech=audio),
                      herd(t3, image=image, video=video)):
            assert not torch.equal(full[:, after:], other[:, after:])
        assert torch.equal(full[:, :2], lm(t3)[:, :2])  # before any medium: the bare LM
        # up to <|video|>: the video run on that prefix (the trained marker rows are used under the speech splice too)
        assert torch.allclose(full[:, :4], video_run(t3[:, :4], image=image, video=video), atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="adapter embeddings for a run of"):
            herd(torch.cat([text[:, :2], torch.tensor([ids.run(n + 1)])], 1), speech=audio)


def test_dialog_puts_every_medium_in_one_user_turn(world, parts, monkeypatch):
    herd, tok = parts["herd"], parts["tok"]
    ids = herd.speech.ids
    fmt = ChatFormat(tok)
    q = "what do you hear?"
    head, tail = [tok.bos_id, *fmt.encode_header("user")], [*tok.encode(q), tok.eot_id, *fmt.encode_header("assistant")]
    assert dialog(fmt, q)[0] == fmt.encode_dialog([{"role": "user", "content": q}])[0]
    assert dialog(fmt, q, media=herd.image.placeholder_ids())[0] == [*head, tok.special_id("<|image|>"), *tail]
    assert dialog(fmt, q, media=herd.video.placeholder_ids())[0] == [*head, tok.special_id("<|video|>"), *tail]
    system, _ = fmt.encode_dialog([{"role": "system", "content": "Be brief."}], add_generation_prompt=False)
    assert dialog(fmt, q, media=herd.speech.placeholder_ids(5), system="Be brief.")[0] == \
        [*system, *fmt.encode_header("user"), *ids.run(5), *tail]  # the speech run's training format
    p = dialog(fmt, q, media=_media_ids(herd, 3))[0]
    user = 1 + len(fmt.encode_header("user"))
    assert p[user:user + 7] == [tok.special_id("<|image|>"), tok.special_id("<|video|>"), *ids.run(3)]
    assert p[user + 7:] == tail
    assert p.count(tok.special_id("<|start_header_id|>")) == 2  # one user turn, then the assistant header
    # `mm chat` builds exactly this turn from the three files
    r = world["root"]
    prompts = []
    monkeypatch.setattr("mm.model.chat.generate", lambda model, prompt, n, **kw: prompts.append(prompt) or [])
    chat(herd, tok, q, image=r / "a.png", video=r / "a.mp4", audio=r / "a.wav", max_new_tokens=1)
    n = herd.speech.n_tokens(len(read_audio_file(r / "a.wav")))
    assert prompts == [dialog(fmt, q, media=_media_ids(herd, n))[0]]


def test_three_media_cached_generation_matches_uncached(parts):
    herd, tok = parts["herd"], parts["tok"]
    audio, n = _audio(herd)
    prompt, _ = dialog(ChatFormat(tok), "what do you hear?", media=_media_ids(herd, n))
    image = _feats(1, N, VCFG.out_dim)
    video = _feats(1, 1, 8, N, VCFG.out_dim, seed=2)
    calls = {"speech": 0, "agg": 0}
    hooks = [herd.speech.encoder.register_forward_hook(lambda *a: calls.__setitem__("speech", calls["speech"] + 1)),
             herd.video.aggregator.register_forward_hook(lambda *a: calls.__setitem__("agg", calls["agg"] + 1))]
    kw = dict(image=image, video=video, speech=audio)
    try:
        cached = generate(herd, prompt, 10, **kw)
        assert calls == {"speech": 1, "agg": 1}  # speech and clip encoded once for the whole reply
    finally:
        for h in hooks:
            h.remove()
    assert len(cached) == 10
    assert generate(herd, prompt, 10, use_cache=False, cache_media=False, **kw) == cached
    assert generate(herd, prompt, 10, cache_media=False, **kw) == cached
    with torch.no_grad():  # the first token is the forward pass's greedy choice on the full prompt
        logits = herd(torch.tensor([prompt]), image=image[None], video=video, speech=audio)
    assert cached[0] == int(logits[0, -1].argmax())
    assert generate(herd, prompt, 10, image=image, video=video) != cached  # the audio is heard (placeholders alone)


def test_compose_compares_lm_weights_not_paths(world, tmp_path):
    rc, err = _cli("compose", "--video", world["video"], "--speech", world["speech_other"], "--out", tmp_path / "bad")
    assert rc == 2 and not err["ok"] and "\n" not in err["error"], err
    assert str((world["lm"] / "final" / "model.safetensors").resolve()) in err["error"]
    assert str((world["other"] / "final" / "model.safetensors").resolve()) in err["error"]
    assert not (tmp_path / "bad").exists()
    # the same weights read from another folder compose; an image run gives a herd without video
    rc, res = _cli("compose", "--image", world["image"], "--speech", world["speech_copy"], "--out", tmp_path / "img")
    assert rc == 0, res
    herd, tok, meta = load_model(tmp_path / "img")
    assert herd.video is None and "video" not in meta["streams"] and meta["sources"]["image"]
    speech, _, _ = load_model(world["speech_copy"])
    audio, n = _audio(herd)
    t = torch.tensor([[5, 6, 7, *herd.speech.ids.run(n), 8, 9]])
    with torch.no_grad():
        assert torch.equal(herd(t, speech=audio), speech(t, speech=audio))
    rc, err = _cli("chat", "--ckpt", tmp_path / "img", "--video", world["root"] / "a.mp4")
    assert rc == 2 and "has no video stream" in err["error"], err
    # --image takes a run's image stream only, even from a video run
    rc, res = _cli("compose", "--image", world["video"], "--speech", world["speech"], "--out", tmp_path / "img2")
    assert rc == 0 and res["streams"] == ["image", "speech"], res


def test_save_load_round_trip_is_exact(world, parts, tmp_path):
    herd, tok, meta = parts["herd"], parts["tok"], parts["meta"]
    src = {**parts["video"].state_dict(), **parts["speech"].state_dict()}  # the LM's tensors: the same LM in both
    sd = herd.state_dict()
    assert sd.keys() == src.keys() and all(torch.equal(sd[k], v) for k, v in src.items())
    saved = load_tensors(world["herd"] / "final" / "model.safetensors")
    assert not any(k in saved for k in parts["lm"].state_dict())  # no LM copy
    keep = {k: meta[k] for k in ("stage", "lm", "sources")}
    again = save_model(tmp_path / "again" / "final", herd, tok, keep)
    two = load_tensors(again / "model.safetensors")
    assert two.keys() == saved.keys() and all(torch.equal(two[k], v) for k, v in saved.items())
    assert load_meta(again) == meta
    back, _, _ = load_model(tmp_path / "again")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in sd.items())
    # the LM folder a herd names must still hold the LM it was composed on
    m = load_meta(again)
    (again / "meta.json").write_text(json.dumps({**m, "lm": str(world["other"] / "final")}))
    with pytest.raises(CheckpointError, match=r"other/final/model\.safetensors: its weights .* are not the LM "
                                              r".*again/final was trained on"):
        load_model(tmp_path / "again")


def test_chat_takes_image_video_and_audio_together(world, parts):
    r = world["root"]
    files = dict(image=r / "a.png", video=r / "a.mp4", audio=r / "a.wav")
    rc, res = _cli("chat", "--ckpt", world["herd"], "--image", files["image"], "--video", files["video"], "--audio",
                   files["audio"], "--prompt", "what do you hear?", "--greedy", "--max-new-tokens", 6)
    assert rc == 0 and res["audio"] == str(files["audio"]) and res["video"] == str(files["video"]), res
    want = chat(parts["herd"], parts["tok"], "what do you hear?", greedy=True, max_new_tokens=6, **files)
    assert res["text"] == want
    # single-modality runs keep their own paths; a medium the run has no stream for is refused
    rc, res = _cli("chat", "--ckpt", world["speech"], "--audio", files["audio"], "--max-new-tokens", 2)
    assert rc == 0 and res["system"] == "Repeat after me in English:", res
    rc, err = _cli("chat", "--ckpt", world["video"], "--video", files["video"], "--audio", files["audio"])
    assert rc == 2 and "has no speech stream" in err["error"], err


def test_compose_stage_and_report_row(world, tmp_path):
    """`compose` as a pipeline stage gives the same herd as `mm compose`; the report's herd row checks that the herd
    with no media scores held-out text exactly like the bare LM, and flags a herd whose LM was swapped."""
    res = run_config(REPO / "experiments/herd/compose.yaml", [f"video={world['video']}", f"speech={world['speech']}"],
                     tmp_path / "herd")
    assert res["streams"] == ["image", "speech", "video"]
    assert res["lm_sha256"] == lm_fingerprint(load_lm(world["lm"])[0])
    a = load_tensors(tmp_path / "herd" / "final" / "model.safetensors")
    b = load_tensors(world["herd"] / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    write_text_shards(list(pydoc_documents())[:4], tmp_path / "text", "val")
    cfg = HerdReportConfig(lm=str(world["lm"]), herd=str(tmp_path / "herd"),
                           text_shards=str(tmp_path / "text" / "val-*.tar"))
    (row,), _ = herd_rows(cfg, tmp_path / "bench")
    assert row["beats"] is True and row["model"] == row["baseline"] and row["model"] > 0
    # the kept JSON line is what a rerun reads: a herd whose numbers differ from the LM's is reported as failing
    kept = tmp_path / "bench" / "herd.json"
    numbers = json.loads(kept.read_text())
    kept.write_text(json.dumps({**numbers, "herd_text_bpb": numbers["herd_text_bpb"] * (1 + 1e-9)}))
    (row,), _ = herd_rows(cfg, tmp_path / "bench")
    assert row["beats"] is False


def test_same_tokenizer_compares_the_whole_tokenizer(world, tmp_path):
    _, tok, _ = load_lm(world["lm"])
    assert same_tokenizer(tok, load_lm(world["root"] / "lm_copy")[1])  # read from another folder
    tok.save(tmp_path / "tok.json")
    assert same_tokenizer(tok, Tokenizer.load(tmp_path / "tok.json"))
    other = train_tokenizer(["a completely different corpus of words for merges"] * 20, 300)
    assert not same_tokenizer(tok, other)


HOSTILE_SCRIPT = r'''
import contextlib, io, json, resource, sys
from mm.cli import main
out = []
for case in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as so, contextlib.redirect_stderr(err):
        rc = main(case["argv"])
    out.append({"name": case["name"], "rc": rc, "stderr": err.getvalue(), "last": so.getvalue().strip().splitlines()[-1]})
print(json.dumps({"cases": out, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def test_hostile_media_at_the_cli_one_line_each_and_bounded_memory(world, tmp_path):
    """A decompression-bomb PNG, a 2-hour WAV, 10^5 frames, 7680x4320 frames, lying extensions, a missing path,
    and a cap lowered by a flag: each refused by `mm chat` with one error line, no traceback, peak RSS < 2 GB; in eval
    shards the same files are skipped and counted."""
    root = world["root"]
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 4e8 pixels in ~100 KB
    with sf.SoundFile(tmp_path / "long.wav", "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        block = np.zeros(8000 * 600, np.int16)
        for _ in range(12):  # 2 hours
            f.write(block)
    (tmp_path / "many.mp4").write_bytes(encode_mp4(np.zeros((100_000, 16, 16, 3), np.uint8), 30))
    (tmp_path / "huge.mp4").write_bytes(encode_mp4(np.zeros((2, 4320, 7680, 3), np.uint8), 8))
    (tmp_path / "wav.png").write_bytes((root / "a.wav").read_bytes())
    (tmp_path / "png.wav").write_bytes((root / "a.png").read_bytes())
    (tmp_path / "png.mp4").write_bytes((root / "a.png").read_bytes())
    chat = ["chat", "--ckpt", str(world["herd"]), "--prompt", "hi", "--max-new-tokens", "2", "--greedy"]
    cases = {"bomb": ["--image", tmp_path / "bomb.png"], "2h_wav": ["--audio", tmp_path / "long.wav"],
             "1e5_frames": ["--video", tmp_path / "many.mp4"], "8k_frames": ["--video", tmp_path / "huge.mp4"],
             "wav_as_png": ["--image", tmp_path / "wav.png"], "png_as_wav": ["--audio", tmp_path / "png.wav"],
             "png_as_mp4": ["--video", tmp_path / "png.mp4"], "missing": ["--image", tmp_path / "nope.png"],
             "max_frames_flag": ["--video", root / "a.mp4", "--max-frames", "4"]}
    want = {"bomb": "pixels", "2h_wav": "7200 s of audio", "1e5_frames": "100000 frames", "8k_frames": "7680x4320",
            "wav_as_png": "not a readable PNG/JPEG", "png_as_wav": "not a readable wav/flac",
            "png_as_mp4": "not a readable MP4", "missing": "no such image file", "max_frames_flag": "8 frames > 4"}
    spec = [{"name": k, "argv": [*chat, *map(str, v)]} for k, v in cases.items()]
    # eval shards holding the same hostile files: skipped and counted, the good sample scored
    qa = json.dumps({"qa": [{"question": "q", "answers": ["a"]}]}).encode()
    write_tar(tmp_path / "img.tar", [("bomb.png", (tmp_path / "bomb.png").read_bytes()), ("bomb.txt", b"x"),
                                     ("bomb.json", qa), ("ok.png", (root / "a.png").read_bytes()), ("ok.txt", b"x"),
                                     ("ok.json", qa)])
    spec.append({"name": "eval_image", "argv": ["eval", "image", "--ckpt", str(world["video"]), "--shards",
                                                str(tmp_path / "img.tar"), "--no-blind"]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT, json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS over every hostile input: {res['peak_rss_mb']:.0f} MB")
    assert res["peak_rss_mb"] < 2048
    by = {c["name"]: c for c in res["cases"]}
    for name, needle in want.items():
        c = by[name]
        lines = [x for x in c["stderr"].splitlines() if x.strip()]
        assert c["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, c["stderr"][-2000:])
        assert needle in lines[0] and "Traceback" not in c["stderr"], (name, lines[0])
    ev = by["eval_image"]
    assert "Traceback" not in ev["stderr"], ev["stderr"][-2000:]
    assert "image_too_large" in ev["last"], ev["last"]
