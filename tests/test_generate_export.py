"""Generation with a KV cache, Hugging Face export parity, `mm chat` errors, and the text benchmark script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.text_kit import pydoc_documents, write_text_shards
from llm.generate import generate
from llm.model import Llama, LlamaConfig
from llm.tokenizer import ChatFormat, train_tokenizer
from mm import cli
from mm.model.runs import save_lm

REPO = Path(__file__).resolve().parents[1]
VOCAB = 352


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return list(pydoc_documents())


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer([d["text"] for d in docs[:12]], VOCAB)


@pytest.fixture(scope="module")
def model(tok, docs) -> Llama:
    """A tiny GQA Llama, briefly trained on pydoc text so its predictions are peaked and not one constant token."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    m = Llama(cfg)
    m.reset_parameters(seed=0)
    ids = torch.tensor([i for d in docs[:12] for i in tok.encode(d["text"], bos=True, eos=True)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    T, B = 64, 8
    for _ in range(40):
        off = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        win = torch.stack([ids[o:o + T + 1] for o in off.tolist()])
        loss = F.cross_entropy(m(win[:, :-1]).flatten(0, 1), win[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.5, loss.item()  # well below log(352) = 5.86: it learned something
    return m.eval()


@pytest.fixture(scope="module")
def prompt(tok, docs) -> list[int]:
    """BOS + a 40-token held-out prefix: long enough that the multi-token prefill matters."""
    ids = tok.encode(docs[40]["text"], bos=True)[:41]
    assert len(ids) == 41
    return ids


# ---------------------------------------------------------------- KV cache


def test_cached_generation_equals_uncached(model, prompt):
    greedy_c = generate(model, prompt, 24, greedy=True, use_cache=True)
    greedy_u = generate(model, prompt, 24, greedy=True, use_cache=False)
    assert greedy_c == greedy_u
    assert len(greedy_c) == 24 and len(set(greedy_c)) > 1  # not one constant token
    kw = dict(greedy=False, temperature=1.0, top_p=0.9)
    for seed in (1, 2):
        sample_c = generate(model, prompt, 24, seed=seed, use_cache=True, **kw)
        sample_u = generate(model, prompt, 24, seed=seed, use_cache=False, **kw)
        assert sample_c == sample_u
    assert generate(model, prompt, 24, seed=1, **kw) != generate(model, prompt, 24, seed=2, **kw)
    assert model.caches is None  # generate cleans up after itself


def test_stop_ids_and_context_limit(model, prompt):
    full = generate(model, prompt, 12, greedy=True)
    stop = full[5]
    first = full.index(stop)
    assert generate(model, prompt, 12, greedy=True, stop_ids=(stop,)) == full[:first]
    # a prompt at the context limit keeps its last max_seq_len-1 tokens and gets one new token
    long = (prompt * 10)[: model.cfg.max_seq_len + 5]
    for use_cache in (True, False):
        assert len(generate(model, long, 8, greedy=True, use_cache=use_cache)) == 1


@torch.no_grad()
def test_cached_logits_equal_full_forward(model, prompt):
    seq = torch.tensor([prompt + generate(model, prompt, 16, greedy=True)])
    full = model(seq)
    P, L = len(prompt), seq.shape[1]
    model.setup_cache(1, L)
    try:
        steps = [model(seq[:, :P])]  # prefill: every prompt position, not only the last
        pos = P
        while pos < L - 5:
            steps.append(model(seq[:, pos:pos + 1], start_pos=pos))
            pos += 1
        steps.append(model(seq[:, pos:], start_pos=pos))  # a multi-token step on a non-empty cache
    finally:
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Hugging Face export


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def lm_dir(model, tok, tmp_path_factory) -> Path:
    return save_lm(tmp_path_factory.mktemp("lm") / "final", model.state_dict(), model.cfg, tok, {"stage": "test"})


def test_export_hf_parity(model, tok, docs, prompt, lm_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert cli.main(["export", "hf", "--ckpt", str(lm_dir), "--out", str(out)]) == 0
    summary = _json_line(capsys)
    assert summary["ok"] and summary["params"] == sum(p.numel() for p in model.parameters())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(summary["files"])

    # tokenizer: same ids (BOS prepended like Llama 3's), same specials, same chat template
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [docs[40]["text"][:300], "  x = 3.14159 ** 2\n\n\tdef f():  # café ☕ 日本\r\n", "", "a"]
    for t in texts:
        assert hf_tok(t)["input_ids"] == tok.encode(t, bos=True)
        assert hf_tok(t, add_special_tokens=False)["input_ids"] == tok.encode(t)
        assert hf_tok.decode(tok.encode(t)) == t
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is a tuple? "}]
    templ = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    templ = templ["input_ids"] if not isinstance(templ, list) else templ
    assert list(templ) == ChatFormat(tok).encode_dialog(msgs, add_generation_prompt=True)[0]

    # logits, both attention implementations, fp32
    ids = torch.tensor([tok.encode(docs[41]["text"], bos=True)[:96]])
    with torch.no_grad():
        ours = model(ids)
    hf_models = {}
    for attn in ("eager", "sdpa"):
        hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation=attn, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(ids).logits
        assert theirs.dtype == torch.float32
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0, msg=lambda m: f"{attn}: {m}")
        hf_models[attn] = hf

    # greedy continuation: transformers' generate == ours == `mm chat --raw`
    text = docs[40]["text"][:160]
    prompt_ids = tok.encode(text, bos=True)
    stops = (tok.eot_id, tok.eom_id, tok.eos_id)
    mine = generate(model, prompt_ids, 12, greedy=True, stop_ids=stops)
    assert len(set(mine)) > 1, "degenerate model: greedy emits one constant token"
    assert cli.main(["chat", "--ckpt", str(lm_dir), "--prompt", text, "--greedy", "--max-new-tokens", "12",
                     "--raw"]) == 0
    chat = _json_line(capsys)
    assert chat["ok"] and chat["text"] == tok.decode(mine)
    x = torch.tensor([prompt_ids])
    for attn, hf in hf_models.items():
        with torch.no_grad():
            seq = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
        new = seq[0, len(prompt_ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert new == mine, attn
        assert tok.decode(new) == chat["text"]


def test_chat_vocab_mismatch_is_one_error_line(model, tok, tmp_path, capsys):
    cfg = LlamaConfig(**{**model.cfg.to_dict(), "vocab_size": tok.vocab_size + 8})
    bad = save_lm(tmp_path / "bad", Llama(cfg).state_dict(), cfg, tok, {"stage": "test"})
    assert cli.main(["chat", "--ckpt", str(bad), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), cap.err
    assert str(tok.vocab_size) in err[0] and str(cfg.vocab_size) in err[0] and "tokenizer" in err[0]
    result = json.loads(cap.out.strip().splitlines()[-1])
    assert result["ok"] is False and result["error"] == err[0][len("error: "):]


# ---------------------------------------------------------------- benchmarks/text.py


def test_text_benchmark_beats_unigram(docs, tmp_path, capsys):
    shards = tmp_path / "shards"
    write_text_shards([d for i, d in enumerate(docs) if i % 5], shards, "train")
    write_text_shards([d for i, d in enumerate(docs) if i % 5 == 0], shards, "val")
    run = tmp_path / "run"
    rc = cli.main(["run", str(REPO / "experiments/lm/pretrain_tiny.yaml"), "--out", str(run),
                   "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                   "tokenizer.vocab_size=320", "phases=[{steps: 40, seq_len: 64, batch_size: 16}]", "anneal.steps=0",
                   f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", "data.mix={}",
                   "train.eval_every=0", "train.progress=false", "train.lr=1e-2", "train.warmup_steps=5",
                   "train.threads=1", "train.ckpt_every=1000"])
    assert rc == 0, capsys.readouterr()
    capsys.readouterr()
    assert sorted((run / "tokens").glob("train-*.npz"))

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/text.py"), "--ckpt", str(run), "--copy"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    res = json.loads(lines[0])
    assert {"val_bpb", "unigram_bpb", "ratio", "docs", "bytes"} <= set(res)
    val = [d["text"] for i, d in enumerate(docs) if i % 5 == 0]
    assert res["docs"] == len(val) and res["bytes"] == sum(len(t.encode()) for t in val)
    assert res["seq_len"] == 64 and res["train_tokens_from"] == "cache"
    assert 0 < res["val_bpb"] < res["unigram_bpb"], res
    lo, hi = res["vs_unigram_ci95"]  # bits per byte over resampled documents, paired
    assert lo <= res["val_bpb"] - res["unigram_bpb"] <= hi and hi < 0, res
    assert res["ratio"] == pytest.approx(res["val_bpb"] / res["unigram_bpb"])
    c = res["copy"]
    assert c["spans"] > 0 and c["drop"] == pytest.approx(c["first_loss"] - c["second_loss"])
    assert c["drop_ci95"][0] <= c["drop"] <= c["drop_ci95"][1]


class _Copier(torch.nn.Module):
    """Logits that name the token `span - 1` places back (a perfect copier of a span read twice), or, with
    span None, the same logits everywhere (an LM that ignores its context)."""

    def __init__(self, vocab: int, span: int | None):
        super().__init__()
        self.vocab, self.span = vocab, span

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        if self.span:
            back = x[:, :x.shape[1] - self.span + 1]  # position p >= span - 1 names x[p + 1 - span]
            out[:, self.span - 1:].scatter_(2, back[..., None], 30.0)
        return out


def test_copy_score_separates_a_copier_from_a_context_blind_lm():
    from mm.eval.text import copy_score

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50, (200,), generator=g).tolist() for _ in range(3)]
    blind = copy_score(_Copier(50, None), docs, span=8)
    assert blind["spans"] == 3 * 7 and blind["drop"] == 0.0 and blind["drop_ci95"] == [0.0, 0.0]
    copier = copy_score(_Copier(50, 8), docs, span=8)
    assert copier["second_top1"] == 1.0 and copier["second_loss"] < 1e-6
    assert copier["first_loss"] == pytest.approx(blind["first_loss"], rel=0.2) and copier["drop_ci95"][0] > 3.0
    with pytest.raises(ValueError, match="no held-out document"):
        copy_score(_Copier(50, 8), [[1, 2, 3]], span=8)
