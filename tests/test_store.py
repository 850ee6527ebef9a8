"""One save format and one load path (mm.model.store): a composed model with every stream round-trips bitwise; a run
folder written in the first format (meta kind image / speech / herd, old tensor keys) loads to the same model; runs
that cannot load are refused with one line naming the file; compose loads streams onto one LM."""
import json
import shutil

import pytest
import torch

from adapters import registry
from adapters.speech import SpeechTokens
from encoders.speech import ConformerConfig, ConformerEncoder
from mm.demo import save_tiny_lm, save_tiny_vision
from mm.model.checkpoint import CheckpointError, load_meta, load_tensors, save_weights
from mm.model.composed import ComposedLM
from mm.model.runs import load_lm
from mm.model.store import compose, load_model, load_vision, save_model
from mm.model.streams import Audio, ImageStream, SpeechStream, VideoStream



def build(tmp_path, seed: int = 3):
    """A ComposedLM with image (gated_xattn), video (perceiver) and speech (conv_rotary) streams over a saved tiny LM;
    returns (model, tok, the LM run)."""
    lm_run = save_tiny_lm(tmp_path / "lm") if not (tmp_path / "lm").exists() else tmp_path / "lm"
    lm, tok, _ = load_lm(lm_run)
    vision = load_vision(save_tiny_vision(tmp_path / "clip"))
    torch.manual_seed(seed)
    image = ImageStream.build(lm, tok.special_id("<|image|>"), vision, {"kind": "gated_xattn", "every": 2})
    model = ComposedLM(lm, image=image)
    n_tok = vision.cfg.tokens_per_tile
    model.attach(VideoStream.build(lm, tok.special_id("<|video|>"), image, {
        "kind": "perceiver", "width": 16, "n_latents": 1, "depth": 1, "heads": 2, "max_frames": 8,
        "max_tokens": n_tok, "factor": 4}, every=1, num_frames=4))
    enc = ConformerEncoder(ConformerConfig(dim=16, layers=1, heads=2, ffn_dim=32))
    adapter = registry.build("speech", {"kind": "conv_rotary", "in_dim": 16, "dim": 16, "heads": 2, "ffn_dim": 32,
                                        "out_dim": lm.cfg.dim, "learn_markers": True})
    model.attach(SpeechStream(enc, adapter, SpeechTokens.of(tok)))
    with torch.no_grad():  # gates open, so every stream changes the logits
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1].startswith("gate_"):
                p.fill_(0.5)
            elif n.startswith(("image.adapter", "video.", "speech.")):
                p.add_(0.01 * torch.randn_like(p))
    return model.eval(), tok, lm_run


def inputs(model, tok):
    """One prompt with an image, a clip and an utterance, and its media (features, frame features, Audio)."""
    n_speech = model.speech.n_tokens(3200)
    ids = [tok.bos_id, *model.image.placeholder_ids(), *model.video.placeholder_ids(),
           *model.speech.placeholder_ids(n_speech), *tok.encode("what is this")]
    g = torch.Generator().manual_seed(0)
    D = model.image.encoder.cfg.out_dim
    N = model.image.encoder.cfg.tokens_per_tile
    feats = torch.randn(1, 1, N, D, generator=g)
    video = torch.randn(1, 1, 4, N, D, generator=g)
    wave_feats = torch.randn(1, 20, 80, generator=g)
    audio = Audio(wave_feats, torch.tensor([20]))
    assert model.speech.n_tokens(3200) == int(model.speech.adapter.n_out(model.speech.encoder.cfg.out_frames(20)))
    return torch.tensor([ids]), dict(image=feats, video=video, speech=audio)


def logits(model, tokens, media):
    with torch.no_grad():
        return model(tokens, **media)


def test_round_trip_is_bitwise_and_records_every_stream(tmp_path):
    model, tok, lm_run = build(tmp_path)
    tokens, media = inputs(model, tok)
    want = logits(model, tokens, media)
    save_model(tmp_path / "run" / "final", model, tok, {"stage": "test", "lm": str(lm_run / "final")})
    meta = load_meta(tmp_path / "run" / "final")
    assert meta["kind"] == "composed" and meta["format"] == 2
    assert set(meta["streams"]) == {"image", "video", "speech"}
    assert meta["streams"]["image"]["adapter"]["kind"] == "gated_xattn"
    assert meta["streams"]["video"]["adapter"]["kind"] == "perceiver" and meta["streams"]["video"]["num_frames"] == 4
    assert meta["streams"]["speech"]["encoder"] == {"kind": "conformer", "config": model.speech.encoder.cfg.to_dict()}
    saved = load_tensors(tmp_path / "run" / "final" / "model.safetensors")
    assert not any(k in saved for k in model.lm.state_dict())  # never the LM
    assert {k.split(".")[0] for k in saved} == {"image", "video", "speech"}
    again, _, _ = load_model(tmp_path / "run")
    assert torch.equal(logits(again, tokens, media), want)


OLD_PREFIXES = {"image.encoder.": "vision.", "image.token.": "fused.new_tokens.", "image.adapter.": "fused.image_adapter.",
                "video.aggregator.": "fused.video_adapter.aggregator.", "video.xattn.": "fused.video_adapter.xattn.",
                "video.token.": "fused.video_adapter.token."}


def write_old(folder, model, tok, lm_run, kind: str) -> None:
    """A model folder as the first format wrote it: an image/video run ("vision.*", "fused.*", meta kind image), a
    speech run ("encoder.*", "adapter.*", kind speech) or a herd (both, "speech_encoder.*" / "speech_adapter.*")."""
    state, meta = {}, {"stage": "old", "lm": str(lm_run / "final")}
    rec = {n: s.record() for n, s in model.streams().items()}
    for k, v in model.stream_state_dict().items():
        if k.startswith("speech."):
            if kind == "image":
                continue
            new = k.replace("speech.encoder.", "encoder." if kind == "speech" else "speech_encoder.")
            new = new.replace("speech.adapter.", "adapter." if kind == "speech" else "speech_adapter.")
            state[new] = v
        elif kind != "speech":
            old = next(p for p in OLD_PREFIXES if k.startswith(p))
            state[OLD_PREFIXES[old] + k[len(old):]] = v
    if kind != "speech":
        meta.update(vision_config=rec["image"]["encoder"]["config"], image_adapter=rec["image"]["adapter"],
                    media_dim=model.image.encoder.cfg.out_dim,
                    video={"aggregator": rec["video"]["adapter"]["config"], "every": 1, "num_frames": 4})
    if kind != "image":
        meta.update(encoder_config=rec["speech"]["encoder"]["config"], speech_adapter=rec["speech"]["adapter"])
    save_weights(folder, {"model": state}, {**meta, "kind": kind})
    tok.save(folder / "tokenizer.json")


@pytest.mark.parametrize("kind", ["image", "speech", "herd"])
def test_a_run_of_the_first_format_loads_to_the_same_model(tmp_path, kind):
    model, tok, lm_run = build(tmp_path)
    tokens, media = inputs(model, tok)
    if kind == "image":
        tokens = tokens[:, :-(model.speech.n_tokens(3200) + 2 + 3)]  # no speech span (and no text)
        media.pop("speech")
    if kind == "speech":
        keep = [t for t in tokens[0].tolist() if t not in (model.image.token_id, model.video.token_id)]
        tokens = torch.tensor([keep])
        media = {"speech": media["speech"]}
    want = logits(model, tokens, media)
    write_old(tmp_path / "old" / "final", model, tok, lm_run, kind)
    loaded, _, meta = load_model(tmp_path / "old")
    want_streams = {"image": {"image", "video"}, "speech": {"speech"}, "herd": {"image", "video", "speech"}}[kind]
    assert set(loaded.streams()) == want_streams and meta["format"] == 1
    assert torch.equal(logits(loaded, tokens, media), want)


def test_an_unloadable_run_is_one_line_naming_the_file(tmp_path):
    model, tok, lm_run = build(tmp_path)
    save_weights(tmp_path / "lmish" / "final", {"model": {}}, {"kind": "reward_model"})
    with pytest.raises(CheckpointError, match=r"lmish/final/meta.json: not a composed model run \(kind='reward_model'\)"):
        load_model(tmp_path / "lmish")
    write_old(tmp_path / "old" / "final", model, tok, lm_run, "image")
    meta = json.loads((tmp_path / "old" / "final" / "meta.json").read_text())
    del meta["vision_config"]
    (tmp_path / "old" / "final" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="old/final/meta.json: an image run without 'vision_config'.*re-run"):
        load_model(tmp_path / "old")


def test_the_lm_is_checked_against_the_hash_the_run_recorded(tmp_path):
    model, tok, lm_run = build(tmp_path)
    save_model(tmp_path / "run" / "final", model, tok, {"lm": str(lm_run / "final")})
    shutil.rmtree(lm_run)
    save_tiny_lm(lm_run, seed=5)  # another LM at the same path
    with pytest.raises(CheckpointError, match=r"lm/final/model.safetensors: its weights .* are not the LM .*run/final "
                                              r"was trained on"):
        load_model(tmp_path / "run")


def test_compose_loads_streams_onto_one_lm_and_refuses_another(tmp_path):
    model, tok, lm_run = build(tmp_path)
    tokens, media = inputs(model, tok)
    want = logits(model, tokens, media)
    speech = ComposedLM(model.lm, speech=model.speech)
    vision_only = ComposedLM(model.lm, image=model.image)
    vision_only.attach(model.video)
    save_model(tmp_path / "v" / "final", vision_only, tok, {"lm": str(lm_run / "final")})
    save_model(tmp_path / "s" / "final", speech, tok, {"lm": str(lm_run / "final")})
    res = compose([tmp_path / "v", tmp_path / "s"], tmp_path / "herd")
    assert res["streams"] == ["image", "speech", "video"]
    herd, _, meta = load_model(tmp_path / "herd")
    assert meta["stage"] == "compose" and torch.equal(logits(herd, tokens, media), want)
    with pytest.raises(ValueError, match="two runs bring an image stream"):
        compose([tmp_path / "v", tmp_path / "v"], tmp_path / "twice")
    other, otok, _ = build(tmp_path / "o", seed=4)  # the same streams' shapes on a different LM
    save_tiny_lm(tmp_path / "o2", seed=9)
    lm2, _, _ = load_lm(tmp_path / "o2")
    save_model(tmp_path / "s2" / "final", ComposedLM(lm2, speech=other.speech), tok,
               {"lm": str(tmp_path / "o2" / "final")})
    with pytest.raises(ValueError, match="cannot compose: the LMs differ"):
        compose([tmp_path / "v", tmp_path / "s2"], tmp_path / "bad")
