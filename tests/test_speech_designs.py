"""Speech adapter designs as plug-ins (issue 21; adapters.registry): every registered speech design keeps the
composed model's invariants (no-audio logits are the bare LM's, the trainable set is encoder + adapter, an LM hot-swap
leaves the adapter alone, cached generation equals uncached, a saved run reloads bitwise), a bad adapter block is one
line naming the YAML file and the key, a run written before designs were plug-ins still loads, and frame_stack_mlp
trains through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_speech import _common, _enc, _mm, world  # noqa: F401  (world: the tiny shards + LM fixture)

from adapters import registry
from adapters.speech import SpeechTokens
from data.speech_tasks import ASR_PROMPT
from encoders.speech import LogMel, pad_features
from mm.config import ConfigError, load_config
from mm.model.checkpoint import save_weights
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.runs import load_lm
from mm.model.store import load_model, save_model
from mm.model.streams import Audio, SpeechStream
from mm.stages.speech_sft import build_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# small shapes of the built-in designs (other registered kinds are built from their Config defaults)
SMALL = {"conv_rotary": {"dim": 16, "heads": 2, "ffn_dim": 32, "stride": 2, "out_rms": 0.05, "learn_markers": True},
         "frame_stack_mlp": {"stack": 2, "hidden": 24, "out_rms": 0.05, "learn_markers": True}}
KINDS = registry.kinds("speech")


def _model(world, kind: str, seed: int = 0) -> ComposedLM:
    lm, tok, _ = load_lm(world["lm"])
    torch.manual_seed(seed)
    adapter = registry.build("speech", {"kind": kind, **SMALL.get(kind, {}), "in_dim": 32, "out_dim": lm.cfg.dim})
    if adapter.markers is not None:  # not the zeros they start as, so the splice shows them
        with torch.no_grad():
            adapter.markers.normal_(0, 0.05)
    return ComposedLM(lm, speech=SpeechStream(_enc(seed), adapter, SpeechTokens.of(tok))).eval()


def _batch(model: ComposedLM, seed: int = 0):
    """Two utterances of different lengths (batch padding), tokens with one speech run each, their Audio,
    next-token labels."""
    g = torch.Generator().manual_seed(seed)
    waves = [torch.randn(3200, generator=g) * 0.1, torch.randn(4800, generator=g) * 0.1]
    audio = Audio(*pad_features([LogMel()(w) for w in waves]))
    n = [model.speech.n_tokens(len(w)) for w in waves]
    text = torch.randint(0, 250, (2, 6 + max(n)), generator=g)  # ordinary tokens (the specials come after them)
    rows = [torch.cat([text[i, :3], torch.tensor(model.speech.placeholder_ids(n[i])), text[i, 3:6 + max(n) - n[i]]])
            for i in range(2)]  # equal lengths: the shorter run's row gets more text
    tokens = torch.stack(rows)
    return tokens, audio, tokens.roll(-1, 1)


def _save_v1(directory: Path, model: ComposedLM, tok, meta: dict) -> Path:
    """A speech run as written before the composed format: meta kind "speech" with encoder_config and the design's
    speech_adapter record, tensors "encoder.*" / "adapter.*"."""
    sp = model.speech
    state = {f"encoder.{k}": v for k, v in sp.encoder.state_dict().items()}
    state.update({f"adapter.{k}": v for k, v in sp.adapter.state_dict().items()})
    meta = {**meta, "kind": "speech", "encoder_config": sp.encoder.cfg.to_dict(),
            "speech_adapter": registry.spec_of(sp.adapter)}
    out = save_weights(directory, {"model": state}, meta)
    tok.save(out / "tokenizer.json")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_no_audio_logits_are_the_bare_lm_and_audio_changes_them(world, kind):
    model = _model(world, kind)
    lm, _, _ = load_lm(world["lm"])
    tokens, audio, _ = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), lm(tokens))
        assert not torch.equal(model(tokens, speech=audio), lm(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_set_is_encoder_and_adapter_and_a_step_moves_only_them(world, kind):
    model = _model(world, kind).train()
    counts = model.train_only("speech")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"speech.encoder.{n}" for n, _ in model.speech.encoder.named_parameters()} | \
        {f"speech.adapter.{n}" for n, _ in model.speech.adapter.named_parameters()}
    assert counts["frozen"] == sum(p.numel() for p in model.lm.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, audio, labels = _batch(model)
    model(tokens, speech=audio, labels=labels).backward()
    opt.step()
    after = model.state_dict()
    lm_keys = set(model.lm.state_dict())
    assert lm_keys and all(torch.equal(after[k], before[k]) for k in lm_keys)
    assert all(not torch.equal(after[f"speech.adapter.{k}"], before[f"speech.adapter.{k}"])
               for k, _ in model.speech.adapter.named_parameters())  # every adapter tensor got a gradient
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("speech.encoder."))


@pytest.mark.parametrize("kind", KINDS)
def test_lm_hot_swap_leaves_the_adapter_untouched(world, kind):
    model = _model(world, kind)
    adapter = {k: v.clone() for k, v in model.speech.adapter.state_dict().items()}
    torch.manual_seed(7)
    other = type(model.lm)(model.lm.cfg).eval()
    model.load_lm_weights(other.state_dict())
    assert all(torch.equal(model.speech.adapter.state_dict()[k], v) for k, v in adapter.items())
    tokens, *_ = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached_greedy(world, kind):
    model = _model(world, kind)
    g = torch.Generator().manual_seed(3)
    audio = Audio(*pad_features([LogMel()(torch.randn(4000, generator=g) * 0.1)]))
    prompt = [5, 9] + model.speech.placeholder_ids(model.speech.n_tokens(4000)) + [17, 23]
    out = generate(model, prompt, 6, speech=audio)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # a full forward over the whole sequence per token, no cache
            seq.append(int(model(torch.tensor([seq]), speech=audio)[0, -1].argmax()))
    assert out == seq[len(prompt):] and len(out) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bitwise(world, kind, tmp_path):
    model = _model(world, kind)
    _, tok, _ = load_lm(world["lm"])
    save_model(tmp_path / "run" / "final", model, tok, {"lm": str(world["lm"])})
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    rec = meta["streams"]["speech"]
    assert meta["kind"] == "composed" and rec["adapter"]["kind"] == kind and rec["encoder"]["kind"] == "conformer"
    assert "adapter_config" not in meta and "speech_adapter" not in meta
    loaded, _, _ = load_model(tmp_path / "run")
    assert loaded.speech.adapter.kind == kind and type(loaded.speech.adapter) is type(model.speech.adapter)
    tokens, audio, _ = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, speech=audio), model(tokens, speech=audio))


def test_frame_stack_outputs_ignore_batch_padding():
    """ceil(n / stack) outputs per item, equal (to float rounding) whether the item is alone or padded in a batch;
    padded outputs are exactly 0; the MLP is on the stacked frames (the outputs depend on the input)."""
    torch.manual_seed(0)
    fs = registry.build("speech", {"kind": "frame_stack_mlp", "in_dim": 8, "out_dim": 12, "stack": 3, "hidden": 16,
                                   "out_rms": 0.5})
    short, long = torch.randn(1, 7, 8), torch.randn(1, 11, 8)  # 7 frames: a partial last stack of 3
    with torch.no_grad():
        alone, na = fs(short, torch.tensor([7]))
        batch = torch.cat([torch.cat([short, torch.full((1, 4, 8), 5.0)], 1), long])  # garbage in the padding
        both, nb = fs(batch, torch.tensor([7, 11]))
    assert na.tolist() == [3] and nb.tolist() == [3, 4] and fs.n_out(7) == 3 and both.shape == (2, 4, 12)
    assert torch.allclose(both[0, :3], alone[0], atol=1e-6) and both[0, 3:].abs().max() == 0
    assert not torch.allclose(both[1, :3], alone[0], atol=1e-2)
    assert fs.markers is None and registry.spec_of(fs)["config"]["stack"] == 3


def test_run_written_before_designs_were_plugins_still_loads(world, tmp_path):
    """A meta with "adapter_config" only (the conv_rotary adapter's config) builds conv_rotary and loads bitwise."""
    model = _model(world, "conv_rotary")
    _, tok, _ = load_lm(world["lm"])
    final = _save_v1(tmp_path / "old" / "final", model, tok, {"lm": str(world["lm"])})
    meta = json.loads((final / "meta.json").read_text())
    meta["adapter_config"] = meta.pop("speech_adapter")["config"]
    (final / "meta.json").write_text(json.dumps(meta))
    loaded, _, _ = load_model(tmp_path / "old")
    assert loaded.speech.adapter.kind == "conv_rotary" and loaded.speech.adapter.cfg == model.speech.adapter.cfg
    tokens, audio, _ = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, speech=audio), model(tokens, speech=audio))


def test_bad_adapter_block_is_one_line_naming_the_file_and_key(tmp_path):
    text = (REPO / "experiments/speech/speech_sft_tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  learn_markers: true", "  learn_markers: true\n  bogus_knob: 3"))
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["lm=x"])
    assert str(bad) in str(e.value) and "bogus_knob" in str(e.value) and "\n" not in str(e.value)
    for ov, key in (("adapter.stride=abc", "stride"), ("adapter.kind=nope", "nope"), ("adapter.in_dim=8", "in_dim"),
                    ("adapter={kind: frame_stack_mlp, act: relu}", "act")):
        with pytest.raises(ConfigError) as e:
            load_config(REPO / "experiments/speech/speech_sft_tiny.yaml", ["lm=x", ov])
        assert "speech_sft_tiny.yaml" in str(e.value) and key in str(e.value) and "\n" not in str(e.value), ov
    # switching designs replaces the block; the stage knob match_embed_scale keeps its default
    cfg = load_config(REPO / "experiments/speech/speech_sft_tiny.yaml",
                      ["lm=x", "adapter={kind: frame_stack_mlp, stack: 4}"])
    assert cfg.adapter == {"kind": "frame_stack_mlp", "stack": 4}


def test_frame_stack_mlp_trains_through_the_cli(world, tmp_path, monkeypatch):
    """speech_sft with adapter kind frame_stack_mlp (an override replacing the YAML's block): the teacher-forced ASR
    loss on the training utterances falls from the seeded init, the run reloads as that design (out_rms filled by
    match_embed_scale), exactly encoder + adapter trained, the LM is untouched."""
    from llm.tokenizer import ChatFormat
    from mm.model.checkpoint import load_tensors
    from mm.eval.speech import answer_loss, load_audio_items

    monkeypatch.chdir(REPO)
    ov = [*_common(world), f"lm={world['lm']}", "encoder_from=null", "seq_len=96", "eval_items=0", "steps=16",
          "train.lr=1e-2", "char_ctc_weight=0", "tasks={asr: 1.0}",
          "adapter={kind: frame_stack_mlp, stack: 4, hidden: 32, learn_markers: true}"]
    rc, res = _mm("run", "experiments/speech/speech_sft_tiny.yaml", "--out", tmp_path / "fs", *ov)
    assert rc == 0, res
    init, tok = build_model(load_config("experiments/speech/speech_sft_tiny.yaml", ov))  # same seed: the init
    init = init.model
    model, _, _ = load_model(tmp_path / "fs")
    items, _ = load_audio_items(str(world["root"] / "train-*.tar"))
    fmt, system = ChatFormat(tok), ASR_PROMPT.format(language="English")

    def asr_loss(m) -> float:
        nll = [answer_loss(m.eval(), fmt, system, it["audio"], it["text"]) for it in items]
        return sum(x for x, _ in nll) / sum(k for _, k in nll)

    # the frozen LM is a random tiny one (near-uniform logits, loss ~ln 300): 16 steps move it by ~0.01 nats
    assert asr_loss(model) < asr_loss(init) - 0.003, (asr_loss(model), asr_loss(init))
    a = model.speech.adapter
    assert a.kind == "frame_stack_mlp" and a.cfg.stack == 4 and a.cfg.hidden == 32 and a.cfg.out_rms > 0
    assert res["params_trainable"] == sum(p.numel() for p in model.speech.encoder.parameters()) + \
        sum(p.numel() for p in a.parameters())
    lm, _, _ = load_lm(world["lm"])
    ck = sorted((tmp_path / "fs" / "checkpoints").glob("step_*"))[-1]
    c = load_tensors(ck / "model.safetensors")
    assert all(torch.equal(c[f"model.{k}"], v) for k, v in lm.state_dict().items())
