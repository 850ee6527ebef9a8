"""Speech understanding (PAPER.md §9; DESIGN.md invariants 1, 4, 5): the log-mel front end, the Conformer's
independence from batch padding and its 1B shape, BEST-RQ targets/masks/loss, the adapter splice and its errors,
WER aggregation, and the two stages end to end (trainable sets, LM unchanged, no-audio logits bitwise equal to the
bare LM, mm eval speech / mm chat --audio)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from webdataset import TarWriter

from adapters.speech import SpeechAdapter, SpeechAdapterConfig, SpeechTokens, embedding_rms, mask_speech_labels, \
    splice_speech, token_ctc_loss
from data.dialog import dialog
from data.speech_tasks import ASR_PROMPT, CHARS, char_ids
from encoders.best_rq import BestRQ, code_stats, span_mask
from encoders.speech import ConformerEncoder, LogMel, count_speech_params, pad_features, speech_shape
from mm.config import BestRQConfig
from mm.model.composed import ComposedLM
from mm.model.store import load_model, load_speech_encoder
from mm.model.streams import Audio, SpeechStream
from mm.stages.speech_sft import SpeechModel, build_model

REPO = Path(__file__).resolve().parents[1]
ENC = dict(dim=32, layers=2, heads=2, ffn_dim=64, kernel=7)
pytestmark = pytest.mark.usefixtures("one_thread")


def _enc(seed: int = 0) -> ConformerEncoder:
    torch.manual_seed(seed)
    return ConformerEncoder(speech_shape("tiny", **ENC)).eval()


def test_log_mel_is_80_bins_10ms_hop_normalised_per_utterance():
    wave = torch.from_numpy(np.random.default_rng(0).normal(size=16000).astype(np.float32))
    lm = LogMel()
    m = lm.mel
    assert (m.n_fft, m.win_length, m.hop_length, m.n_mels, m.sample_rate) == (400, 400, 160, 80, 16000)
    f = lm(wave * 0.3)  # 1 s -> 101 frames of 80 bins, each bin zero-mean unit-variance over the utterance
    assert f.shape == (101, 80)
    assert f.mean(0).abs().max() < 1e-4 and (f.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert torch.allclose(lm(wave * 3.0), f, atol=1e-3)  # gain-invariant thanks to the normalisation


def test_encoder_and_adapter_ignore_batch_padding():
    enc = _enc()
    torch.manual_seed(1)
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=24, heads=2, ffn_dim=48, out_dim=40)).eval()
    short, long = torch.randn(37, 80), torch.randn(90, 80)  # 37 frames: a partial last stack of 4
    with torch.no_grad():
        alone, n_alone = enc(short[None], torch.tensor([37]))
        a_alone, na = adapter(alone, n_alone)
        feats, lens = pad_features([short, long])
        feats[0, 37:] = 5.0  # garbage in the padding must not reach the valid frames
        both, n_both = enc(feats, lens)
        a_both, nb = adapter(both, n_both)
    assert n_alone.tolist() == [10] and n_both.tolist() == [10, 23] and na.tolist() == [5] and nb.tolist() == [5, 12]
    assert torch.allclose(both[0, :10], alone[0], atol=1e-5) and both[0, 10:].abs().max() == 0
    assert torch.allclose(a_both[0, :5], a_alone[0], atol=1e-5)
    assert not torch.allclose(both[1, :10], alone[0], atol=1e-2)  # and the outputs do depend on the input
    # a coarser adapter (stride 4: 160 ms, kernel 7) keeps the count ceil(n / 4) and the padding independence
    torch.manual_seed(1)
    coarse = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=24, heads=2, ffn_dim=48, out_dim=40, stride=4)).eval()
    with torch.no_grad():
        c_alone, nca = coarse(alone, n_alone)
        c_both, ncb = coarse(both, n_both)
    assert nca.tolist() == [3] and ncb.tolist() == [3, 6] and c_both.shape[1] == 6
    assert torch.allclose(c_both[0, :3], c_alone[0], atol=1e-5) and c_both[0, 3:].abs().max() == 0


def test_paper_1b_shape_has_about_a_billion_parameters():
    cfg = speech_shape("1b")
    assert (cfg.layers, cfg.dim, cfg.ffn_dim, cfg.kernel, cfg.heads) == (24, 1536, 4096, 7, 24)
    assert 0.95e9 < count_speech_params(cfg) < 1.05e9


def test_best_rq_targets_masks_and_loss():
    cfg = BestRQConfig(codebooks=4, codebook_size=64, code_dim=16, mask_prob=0.05, span=8)
    model = BestRQ(_enc(), cfg, seed=3)
    assert {n for n, _ in model.named_buffers()} == {"quantizer.proj", "quantizer.codebooks"}
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"encoder", "head"}
    books = model.quantizer.codebooks
    assert torch.allclose(books.norm(dim=-1), torch.ones(4, 64))
    # cosine nearest neighbour over the LAST dim, from the stacked (unmasked) frames
    x = torch.randn(2, 5, 320)
    z = torch.nn.functional.normalize((x @ model.quantizer.proj).view(2, 5, 4, 16), dim=-1)
    want = torch.stack([(z[:, :, k] @ books[k].T).argmax(-1) for k in range(4)], -1)
    assert torch.equal(model.quantizer(x), want)
    # spans: 8 frames long, inside the valid frames, at least one per utterance
    lens = torch.tensor([60, 25])
    m = span_mask(lens, 60, BestRQConfig(mask_prob=0.0, span=8, min_spans=1), torch.Generator().manual_seed(0))
    assert m[0].sum() == 8 and m[1].sum() == 8 and not m[1, 25:].any()
    # the quantiser sees the unmasked features; the loss is over masked encoder frames only; it trains
    feats, lens = pad_features([torch.randn(64, 80), torch.randn(40, 80)])
    seen = []
    model.quantizer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = {k: v.clone() for k, v in model.named_buffers()}
    losses = []
    for _ in range(25):
        loss, stats = model.train()(feats, lens, torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert torch.equal(seen[0], model.encoder.stack_frames(feats, lens)[0])
    assert 0 < stats["masked_frames"] < 26 and losses[-1] < losses[0] - 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())  # frozen quantiser
    one = code_stats(torch.zeros(50, 2, dtype=torch.long), 8)
    flat = code_stats(torch.arange(8).repeat(2)[:, None], 8)
    assert one == {"code_usage": 1 / 8, "code_perplexity": 1.0} and flat["code_perplexity"] == pytest.approx(8.0)


def test_splice_fills_placeholder_runs_and_rejects_mismatches():
    ids = SpeechTokens(start=90, placeholder=91, end=92)
    tokens = torch.tensor([[1, 2, *ids.run(3), 3, 0], [1, *ids.run(2), 4, 5, 6, 7]])  # (2, 9)
    h = torch.randn(2, 9, 6)
    speech = torch.randn(2, 3, 6)
    out = splice_speech(h, tokens, speech, torch.tensor([3, 2]), ids)
    assert torch.equal(out[0, 3:6], speech[0]) and torch.equal(out[1, 2:4], speech[1, :2])
    keep = tokens != ids.placeholder
    assert torch.equal(out[keep], h[keep])
    with pytest.raises(ValueError, match="2 adapter embeddings for a run of 3"):
        splice_speech(h, tokens, speech, torch.tensor([2, 2]), ids)
    with pytest.raises(ValueError, match="2 speech placeholder runs in the tokens but 1 speech items"):
        splice_speech(h, tokens, speech[:1], torch.tensor([3]), ids)
    bad = tokens.clone()
    bad[0, 2] = 7  # run without its <|speech_start|>
    with pytest.raises(ValueError, match="enclosed"):
        splice_speech(h, bad, speech, torch.tensor([3, 2]), ids)
    # the adapter's own marker vectors go over every <|speech_start|> / <|speech_end|>, nothing else changes
    markers = torch.randn(2, 6)
    marked = splice_speech(h, tokens, speech, torch.tensor([3, 2]), ids, markers)
    starts, ends = tokens == ids.start, tokens == ids.end
    assert (marked[starts] == markers[0]).all() and (marked[ends] == markers[1]).all() and int(starts.sum()) == 2
    assert torch.equal(marked[~(starts | ends)], out[~(starts | ends)])
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1)
    masked = mask_speech_labels(tokens, labels, ids)
    speechy = (labels >= 90) | (tokens == 91)
    assert (masked[speechy] == -100).all() and torch.equal(masked[~speechy], labels[~speechy])


def test_adapter_output_starts_on_the_lm_embedding_scale():
    emb = torch.randn(300, 40) * 0.07  # an LM's token embeddings, RMS ~0.07
    rms = embedding_rms(emb)
    assert rms == pytest.approx(0.07, rel=0.05)
    enc, _ = _enc()(torch.randn(2, 90, 80), torch.tensor([90, 60]))
    kw = dict(in_dim=32, dim=24, heads=2, ffn_dim=48, out_dim=40)
    torch.manual_seed(0)
    scaled = SpeechAdapter(SpeechAdapterConfig(**kw, out_rms=rms))
    torch.manual_seed(0)
    plain = SpeechAdapter(SpeechAdapterConfig(**kw))  # the paper's plain Linear: no norm, a different scale
    with torch.no_grad():
        (y, n), (y0, _) = scaled(enc, torch.tensor([23, 15])), plain(enc, torch.tensor([23, 15]))
    valid = y[0, :12]  # (12, 40)
    assert valid.pow(2).mean(-1).sqrt().sub(rms).abs().max() < 1e-3 * rms + 1e-6  # every frame at the LM's RMS
    assert y[1, 8:].abs().max() == 0 and plain.out_norm is None
    assert abs(float(y0[0, :12].pow(2).mean().sqrt()) - rms) > 0.5 * rms


def test_token_ctc_loss_is_finite_and_trains_the_adapter_towards_token_embeddings():
    torch.manual_seed(0)
    emb = torch.randn(50, 16) * 0.1  # frozen token embeddings; id 49 is the blank (the <|speech|> placeholder)
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=24, heads=2, ffn_dim=48, out_dim=16,
                                                out_rms=embedding_rms(emb)))
    with torch.no_grad():
        enc, lens = _enc()(torch.randn(2, 120, 80), torch.tensor([120, 100]))  # -> 15 / 13 adapter frames
    targets, tlens = torch.tensor([[3, 7, 7, 12], [5, 9, 0, 0]]), torch.tensor([4, 2])
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        sp, n = adapter(enc, lens)
        loss = token_ctc_loss(sp, n, emb, targets, tlens, blank=49)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0], losses


def test_char_ctc_targets_and_head_train_the_encoder_not_the_lm():
    from llm.model import Llama, LlamaConfig

    assert char_ids("Don't  STOP, 42!") == [CHARS.index(c) + 1 for c in "don't stop"]  # blank 0 never a target
    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=60, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64))
    ids = SpeechTokens(57, 58, 59)
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=24, heads=2, ffn_dim=48, out_dim=16))
    model = SpeechModel(ComposedLM(lm, speech=SpeechStream(_enc(), adapter, ids)), torch.nn.Linear(32, len(CHARS) + 1))
    feats, lens = torch.randn(2, 120, 80), torch.tensor([120, 100])  # -> 30 / 25 encoder frames
    with torch.no_grad():
        n = model.model.speech.embeds(Audio(feats, lens)).lens.tolist()  # placeholders per utterance
    rows = [[1] + ids.run(k) + [5, 6] for k in n]
    tokens = torch.tensor([r + [0] * (len(rows[0]) - len(r)) for r in rows])
    chars = [torch.tensor(char_ids(t)) for t in ("cat sat", "dog")]
    targets = torch.nn.utils.rnn.pad_sequence(chars, batch_first=True)
    lm_ids = {id(p) for p in lm.parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in lm_ids], lr=3e-3)
    losses = []
    for _ in range(25):
        _, aux = model(tokens, feats, lens, chars=(targets, torch.tensor([7, 3])))
        opt.zero_grad()
        aux["char_ctc"].backward()
        assert all(p.grad is None for p in lm.parameters()) and \
            model.model.speech.encoder.proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(aux["char_ctc"].item())
    assert set(aux) == {"char_ctc"} and np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_corpus_wer_normalises_and_aggregates_over_words():
    from mm.eval.speech import corpus_bleu
    from mm.eval.wer import corpus_wer, normalise_text

    assert normalise_text("Mr. Smith won't pay twenty-five!") == "mister smith will not pay 25"
    assert corpus_wer(["Hello, World!"], ["hello world"]) == 0.0
    # corpus WER = all errors / all reference words (1/5), not a mean of utterance WERs (0.5)
    assert corpus_wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(0.2)
    assert corpus_bleu(["el gato es rojo hoy"], ["el gato es rojo hoy"]) == pytest.approx(100.0)


def test_paired_wer_delta_matches_corpus_wer_and_resolves_real_gaps():
    """The ablation's comparison: a minus b on the same utterances equals the corpus WERs' difference; identical
    systems give exactly 0 with a zero-width interval; a system better on every utterance has an interval below 0."""
    from mm.eval.wer import corpus_wer, paired_wer_delta

    rng = np.random.default_rng(0)
    vocab = "the a red hen blue car sun tree sat on".split()
    refs = [" ".join(rng.choice(vocab, 6)) for _ in range(60)]
    good = [" ".join(r.split()[:5] + ["x"]) for r in refs]  # one substitution each
    bad = [" ".join(["x", "y"] + r.split()[2:]) for r in refs]  # two each
    d = paired_wer_delta(refs, good, bad, n_boot=500)
    assert d["wer_a"] == pytest.approx(corpus_wer(refs, good)) and d["wer_b"] == pytest.approx(corpus_wer(refs, bad))
    assert d["delta"] == pytest.approx(1 / 6 - 2 / 6) and d["ci95"][1] < 0 and d["p_a_better"] == 1.0, d
    same = paired_wer_delta(refs, bad, bad, n_boot=200)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_a_better"] == 0.0
    mixed = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))]  # better on half: a gap the CI still sees
    m = paired_wer_delta(refs, mixed, bad, n_boot=500)
    assert m["ci95"][0] < m["delta"] < m["ci95"][1] < 0
    noisy = [b if i % 2 else g for i, (g, b) in enumerate(zip(good, bad))]
    coin = paired_wer_delta(refs, mixed, noisy, n_boot=500)  # same totals, different utterances: CI spans 0
    assert coin["delta"] == 0 and coin["ci95"][0] < 0 < coin["ci95"][1]
    empty = paired_wer_delta(["a b", "c"], ["", "c"], ["a b", "c"], n_boot=20)  # an empty reply deletes every word
    assert empty["delta"] == pytest.approx(2 / 3)


# ---- the stages end to end ------------------------------------------------------------------------------------------

def _flac(i: int, seconds: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 60 * (i % 5)) * t) + 0.01 * np.random.default_rng(i).normal(size=t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny audio shards (tones; asr / ast / sqa samples), a tiny LM run."""
    from llm.model import Llama, LlamaConfig
    from llm.tokenizer import train_tokenizer
    from mm.model.runs import save_lm

    root = tmp_path_factory.mktemp("speech")
    words = ["red hen", "blue car", "green tree", "yellow sun"]
    for split, n in (("train", 12), ("val", 4)):
        with TarWriter(str(root / f"{split}-000000.tar")) as w:
            for i in range(n):
                meta = {"language": "en", "voice": f"espeak:v{i % 2}", "engine": "espeak", "task": "asr"}
                if i % 3 == 1:
                    meta.update(task="ast", translation={"lang": "es", "text": "la gallina roja"})
                if i % 3 == 2:
                    meta.update(task="sqa", question="what is one plus one?", answer="two")
                w.write({"__key__": f"{split}{i:04d}", "flac": _flac(i, 0.5 + 0.1 * (i % 3)),
                         "txt": f"a {words[i % 4]}.", "json": json.dumps(meta)})
    tok = train_tokenizer([" ".join(words) + " la gallina roja what is one plus two"] * 20, 300)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160)
    torch.manual_seed(0)
    save_lm(root / "lm" / "final", Llama(cfg).state_dict(), cfg, tok, {"stage": "lm_pretrain"})
    return {"root": root, "lm": root / "lm"}


def _common(world) -> list[str]:
    r = world["root"]
    return [f"data.shards={r}/train-*.tar", f"data.val_shards={r}/val-*.tar", "steps=2", "train.batch_size=4",
            "train.warmup_steps=1", "train.threads=0", "train.log_every=1", "train.progress=false",
            "encoder.dim=32", "encoder.layers=2", "encoder.heads=2", "encoder.ffn_dim=64"]


def _mm(*argv) -> tuple[int, dict]:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(map(str, argv)))
    return rc, json.loads(buf.getvalue().strip().splitlines()[-1])


def _sft_overrides(world, tmp, encoder_from) -> list[str]:
    return [*_common(world), f"lm={world['lm']}", f"encoder_from={encoder_from}", "adapter.dim=16",
            "adapter.heads=2", "adapter.ffn_dim=32", "seq_len=96", "eval_items=2"]


def test_speech_eval_reports_the_text_oracle_ceiling(world):
    """Issue 7: the speech path can at best do what the frozen LM does with the transcript typed in the user turn;
    the eval reports that ceiling (text_wer, text_asr_loss) next to the audio and blind figures."""
    from data.token_stream import IGNORE
    from llm.tokenizer import ChatFormat
    from mm.eval.speech import speech_eval
    from mm.model.runs import load_lm

    lm, tok, _ = load_lm(world["lm"])
    torch.manual_seed(0)
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=32, dim=16, heads=2, ffn_dim=32, out_dim=lm.cfg.dim))
    model = ComposedLM(lm, speech=SpeechStream(_enc(), adapter, SpeechTokens.of(tok))).eval()
    rng = np.random.default_rng(0)
    items = [{"audio": rng.normal(size=8000).astype(np.float32) * 0.1, "text": t, "meta": {"language": "en"}}
             for t in ("a red hen.", "a blue car.")]
    out = speech_eval(model, tok, items, max_new_tokens=4)
    assert out["text_wer"] is not None and np.isfinite(out["text_asr_loss"]), out
    fmt, system = ChatFormat(tok), ASR_PROMPT.format(language="English")
    nll, n = 0.0, 0
    with torch.no_grad():  # the oracle is the bare LM's loss on the answer with the transcript as the user's text
        for it in items:
            ids, mask = dialog(fmt, it["text"], it["text"], system=system)
            labels = torch.tensor([[t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]])
            k = int((labels != IGNORE).sum())
            nll, n = nll + float(lm(torch.tensor([ids[:-1]]), labels=labels)) * k, n + k
    assert out["text_asr_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert out["text_asr_loss"] != pytest.approx(out["blind_asr_loss"], rel=1e-4)  # the transcript is really there


def test_stages_trainable_sets_lm_unchanged_and_cli(world, tmp_path, monkeypatch):
    from mm.model.checkpoint import load_tensors
    from mm.config import load_config
    from mm.train.distributed import DistInfo
    from mm.model.runs import load_lm
    from mm.train.trainer import Trainer

    monkeypatch.chdir(REPO)
    rc, pre = _mm("run", "experiments/speech/speech_pretrain_tiny.yaml", "--out", tmp_path / "pre", *_common(world),
                  "best_rq.codebooks=2", "best_rq.codebook_size=32")
    assert rc == 0 and pre["final_code_perplexity"] > 1, pre
    pre_sd = load_tensors(tmp_path / "pre" / "final" / "model.safetensors")
    assert {k.split(".")[0] for k in pre_sd} == {"encoder", "head", "quantizer"}

    # speech_sft: exactly encoder + adapter trainable; the LM frozen and outside the optimizer
    cfg = load_config(REPO / "experiments/speech/speech_sft_tiny.yaml", _sft_overrides(world, tmp_path, tmp_path / "pre"))
    model, tok = build_model(cfg)
    counts = model.model.train_only("speech")
    sp = model.model.speech
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.speech.encoder.{n}" for n, _ in sp.encoder.named_parameters()} | \
        {f"model.speech.adapter.{n}" for n, _ in sp.adapter.named_parameters()} | \
        {f"char_head.{n}" for n, _ in model.char_head.named_parameters()}
    assert counts["frozen"] == sum(p.numel() for p in model.model.lm.parameters())
    trainable = counts["trainable"] + sum(p.numel() for p in model.char_head.parameters())
    # the YAML's adapter: 160 ms embeddings and its own markers, which start as the LM's embedding of '"'
    quote = model.model.lm.tok_embeddings.weight[tok.encode('"')[0]]
    assert sp.adapter.cfg.stride == 4 and torch.equal(sp.adapter.markers.detach(), quote.expand(2, -1))
    tr = Trainer(model, cfg.train, tmp_path / "probe", loss_fn=None, lr_at=lambda s: 0.0, info=DistInfo())
    assert {id(p) for g in tr.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if n in names}

    rc, res = _mm("run", "experiments/speech/speech_sft_tiny.yaml", "--out", tmp_path / "sft",
                  *_sft_overrides(world, tmp_path, tmp_path / "pre"))
    assert rc == 0 and res["n_asr"] == 2 and res["wer"] is not None and res["blind_wer"] is not None, res
    vb = res["wer_vs_blind"]  # WER - blind WER over the same utterances, paired
    assert vb["delta"] == pytest.approx(res["wer"] - res["blind_wer"]) and vb["ci95"][0] <= vb["delta"] <= vb["ci95"][1]
    assert res["params_trainable"] == trainable
    # the YAML's character CTC (scored on held-out audio by its head) and the teacher-forced held-out losses (with vs
    # without audio) are reported; the token CTC is off
    assert np.isfinite(res["final_char_ctc"]) and np.isfinite(res["final_lm_loss"]) and res["asr_loss"] > 0 and \
        res["blind_asr_loss"] > 0 and "final_ctc" not in res, res
    assert 0 <= res["char_cer"] and res["char_items"] == 2 and set(res["char_cer_by_voice"]), res
    # the LM in the step checkpoint is bitwise the LM run's; no-audio logits equal the bare LM's
    lm, _, _ = load_lm(world["lm"])
    ck = sorted((tmp_path / "sft" / "checkpoints").glob("step_*"))[-1]
    c = load_tensors(ck / "model.safetensors")
    assert all(torch.equal(c[f"model.{k}"], v) for k, v in lm.state_dict().items())
    trained, tok, meta = load_model(tmp_path / "sft")
    assert meta["kind"] == "composed" and meta["streams"]["speech"]["encoder"]["kind"] == "conformer"
    toks = torch.randint(0, 280, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(toks), lm(toks))
        ids = trained.speech.ids
        wave = torch.randn(2, 3200)
        audio = Audio(*pad_features([LogMel()(w) for w in wave]))
        sp = torch.cat([toks[:, :2], torch.tensor([ids.run(2)] * 2), toks[:, :3]], 1)  # 2 = ceil(ceil(21/4)/4)
        assert not torch.equal(trained(sp, speech=audio), lm(sp))
        # the trained markers (saved with the adapter) sit on the start / end positions
        h = trained.splice(sp, None, speech=audio)
        markers = trained.speech.adapter.markers
        assert torch.equal(h[:, 2], markers[0].expand(2, -1)) and torch.equal(h[:, 5], markers[1].expand(2, -1))
        assert not torch.equal(markers[0], quote)
        with pytest.raises(ValueError, match="adapter embeddings for a run of"):
            trained(torch.cat([toks[:, :2], torch.tensor([ids.run(3)] * 2)], 1), speech=audio)

    # mm eval speech on user shards; mm chat --audio; a truncated file is one clear error naming it
    rc, ev = _mm("eval", "speech", "--ckpt", tmp_path / "sft", "--shards", world["root"] / "val-*.tar",
                 "--max-items", 3)
    assert rc == 0 and ev["items"] == 3 and set(ev["wer_by_voice"]) <= {"espeak:v0", "espeak:v1"} and \
        ev["n_ast"] == 1 and ev["n_sqa"] == 1, ev
    # the ablation's paired comparison (benchmarks/speech.py --against): a run against itself differs by exactly 0
    spec = importlib.util.spec_from_file_location("bench_speech", REPO / "benchmarks" / "speech.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench.main(["--ckpt", str(tmp_path / "sft"), "--against", str(tmp_path / "sft"), "--shards",
                           str(world["root"] / "val-*.tar"), "--max-items", "3"]) == 0
    cmp = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert cmp["items"] == 3 and cmp["wer_a"] == pytest.approx(ev["wer"]) and cmp["delta"] == 0 and \
        cmp["ci95"] == [0.0, 0.0] and set(cmp["by_voice"]) == set(ev["wer_by_voice"]), cmp
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(8000, np.float32), 8000)  # another sample rate: resampled to 16 kHz
    rc, ch = _mm("chat", "--ckpt", tmp_path / "sft", "--audio", wav, "--max-new-tokens", 4)
    assert rc == 0 and isinstance(ch["text"], str) and ch["system"] == "Repeat after me in English:"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(wav.read_bytes()[:-4000])
    rc, err = _mm("chat", "--ckpt", tmp_path / "sft", "--audio", bad)
    assert rc == 2 and str(bad) in err["error"] and "truncated" in err["error"]


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    """Best-path decoding: repeats merge, a blank between two equal symbols keeps both, frames past n are ignored."""
    from mm.eval.speech import ctc_greedy

    path = "hh_el_llo_" + "zz"  # "_" = blank; the last two frames are padding (n excludes them)
    ids = [0 if c == "_" else CHARS.index(c) + 1 for c in path]
    logits = torch.nn.functional.one_hot(torch.tensor(ids), len(CHARS) + 1).float()  # (F', C)
    assert ctc_greedy(logits, len(path) - 2) == "hello"
    assert ctc_greedy(logits, len(path)) == "helloz"


def test_acoustic_stage_trains_only_the_encoder_and_feeds_speech_sft(world, tmp_path, monkeypatch):
    """speech_sft acoustic_only: the character CTC alone moves the encoder; the adapter stays at its seeded init, the
    LM is untouched, no LM WER is claimed (only the char head's held-out CER); a later speech_sft starts from exactly
    that encoder (encoder_from)."""
    from mm.model.checkpoint import load_tensors
    from mm.config import load_config

    monkeypatch.chdir(REPO)
    base = [*_common(world), f"lm={world['lm']}", "encoder_from=null", "adapter.dim=16", "adapter.heads=2",
            "adapter.ffn_dim=32", "seq_len=96", "eval_items=2", "ctc_weight=0", "ctc_weight_end=0"]
    rc, err = _mm("run", "experiments/speech/speech_sft_tiny.yaml", "--out", tmp_path / "bad", *base,
                  "acoustic_only=true", "char_ctc_weight=0")
    assert rc == 2 and "char_ctc_weight > 0" in err["error"], err
    ov = [*base, "acoustic_only=true", "char_ctc_weight=1.0", "steps=3"]
    rc, res = _mm("run", "experiments/speech/speech_sft_tiny.yaml", "--out", tmp_path / "ac", *ov)
    assert rc == 0 and np.isfinite(res["final_char_ctc"]) and "wer" not in res and "final_lm_loss" not in res, res
    assert res["char_cer"] >= 0 and set(res["char_cer_by_voice"]) and len(res["char_examples"]) == 2, res
    fresh, _ = build_model(load_config(REPO / "experiments/speech/speech_sft_tiny.yaml", ov))  # same seed: the init
    sd = load_tensors(tmp_path / "ac" / "final" / "model.safetensors")
    sp = fresh.model.speech
    assert all(torch.equal(sd[f"speech.adapter.{k}"], v) for k, v in sp.adapter.state_dict().items())
    assert any(not torch.equal(sd[f"speech.encoder.{k}"], v) for k, v in sp.encoder.state_dict().items())
    assert res["params_trainable"] == sum(p.numel() for p in sp.encoder.parameters()) + \
        sum(p.numel() for p in fresh.char_head.parameters())
    enc = load_speech_encoder(tmp_path / "ac")
    nxt, _ = build_model(load_config(REPO / "experiments/speech/speech_sft_tiny.yaml",
                                     [*base, f"encoder_from={tmp_path / 'ac'}"]))
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(),
                                                 nxt.model.speech.encoder.state_dict().values()))


def test_distillation_from_the_typed_transcript(world, tmp_path, monkeypatch):
    """distill_weight: the KL from the frozen LM reading the typed transcript to the LM reading the speech, over the
    reply tokens: zero when the student sees what the teacher sees, positive otherwise, an error when the replies do
    not pair up; in speech_sft it is logged as "distill", and the loss with it is the token loss plus the weighted KL
    (the adapter's gradient comes through the student only: the LM stays frozen)."""
    from data.dialog import collate_dialogs, dialog
    from llm.tokenizer import ChatFormat
    from mm.config import load_config
    from mm.model.runs import load_lm
    from mm.stages.speech_sft import distill_kl

    lm, tok, _ = load_lm(world["lm"])
    model, fmt = ComposedLM(lm).eval(), ChatFormat(tok)
    sys_ = ASR_PROMPT.format(language="English")
    typed = collate_dialogs([dialog(fmt, t, t, system=sys_) for t in ("a red hen.", "a blue car.")], tok.pad_id, 96)
    other = collate_dialogs([dialog(fmt, u, t, system=sys_) for u, t in (("green tree", "a red hen."),
                                                                          ("yellow sun", "a blue car."))], tok.pad_id, 96)
    with torch.no_grad():
        same = distill_kl(model, model(typed["tokens"], return_hidden=True), typed["labels"], typed["tokens"],
                          typed["labels"], 2.0)
        differ = distill_kl(model, model(other["tokens"], return_hidden=True), other["labels"], typed["tokens"],
                            typed["labels"])
    assert abs(float(same)) < 1e-7 < float(differ)  # a random tiny LM: near-uniform, yet they differ
    short = collate_dialogs([dialog(fmt, "a", "a red", system=sys_)] * 2, tok.pad_id, 96)
    with pytest.raises(ValueError, match="reply tokens per row differ"):
        distill_kl(model, model(short["tokens"], return_hidden=True), short["labels"], typed["tokens"], typed["labels"])

    monkeypatch.chdir(REPO)
    ov = [*_sft_overrides(world, tmp_path, "null"), "eval_items=0", "distill_weight=0.5", "distill_temperature=2.0"]
    rc, res = _mm("run", "experiments/speech/speech_sft_tiny.yaml", "--out", tmp_path / "kd", *ov)
    assert rc == 0 and res["final_distill"] > 0 and np.isfinite(res["final_lm_loss"]), res
    cfg = load_config(REPO / "experiments/speech/speech_sft_tiny.yaml", ov)
    from mm.stages import speech_sft as stage

    m, tok2 = stage.build_model(cfg)
    loader_batch = {"audio": [np.zeros(8000, np.float32)], "text": ["a red hen."], "meta": [{"language": "en"}]}
    feed = stage.SpeechFeed(None, tok2, cfg, m.model.speech, torch.device("cpu"))
    feed_mb = feed.make(0, loader_batch)
    out = stage.speech_loss(m, feed_mb, cfg.char_ctc_weight, False, 0.5, 2.0)
    assert out.extra["distill"] > 0 and torch.allclose(
        out.loss, out.extra["lm_loss"] + 0.5 * out.extra["distill"] + cfg.char_ctc_weight * out.extra["char_ctc"],
        atol=1e-5)
