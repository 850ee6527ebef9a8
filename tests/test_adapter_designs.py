"""Every registered adapter design (image, video, speech) keeps the composed model's invariants (DESIGN.md 1, 4, 6):
without media the logits are bitwise the bare LM's, the trainable set is exactly its stream (train_only),
hot-swapping the LM leaves the stream untouched, cached generation equals uncached, and a saved run reloads. A toy
design defined in this file trains through `mm run` with a YAML override alone; a design in a module outside the
repository is found by `kind: module:ClassName`."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from adapters import registry
from adapters.speech import SpeechTokens
from encoders.speech import ConformerEncoder, LogMel, pad_features, speech_shape
from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig
from mm.config import ConfigError, load_config
from mm.model.composed import ComposedLM
from mm.model.generate import generate, generate_rows
from mm.model.store import load_model
from mm.model.streams import Audio, ImageStream, SpeechStream, VideoStream
from tests.test_image_stage import _run, make_world

V, IMG, VID, DM, N = 96, 90, 91, 24, 5  # vocab, <|image|>, <|video|>, encoder width, tokens per image
SPEECH = SpeechTokens(92, 93, 94)  # <|speech_start|>, <|speech|>, <|speech_end|>
VCFG = VisionConfig(image_size=16, patch_size=8, width=12, layers=1, heads=2, mlp_dim=24, taps=[0], n_gated=0)
TINY = {"gated_xattn": {"every": 2}, "perceiver_xattn": {"every": 2, "n_latents": 3, "heads": 2, "depth": 1},
        "mlp_concat": {"n_tokens": 3}, "perceiver": {"factor": 2, "width": 16, "heads": 2, "depth": 1,
                                                    "max_frames": 4, "max_tokens": N},
        "mean_pool": {"factor": 2, "max_frames": 4},
        "conv_rotary": {"dim": 16, "heads": 2, "ffn_dim": 32, "stride": 2, "out_rms": 0.05, "learn_markers": True},
        "frame_stack_mlp": {"stack": 2, "hidden": 24, "out_rms": 0.05, "learn_markers": True}}
PARTS = {"image": ("encoder", "token", "adapter"), "video": ("aggregator", "xattn", "token"),
         "speech": ("encoder", "adapter")}  # what each stream registers (all of it trains)
DESIGN = {"image": "adapter", "video": "aggregator", "speech": "adapter"}  # the part the design's spec builds

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToyConfig:
    """One knob, so the YAML override path and the schema check are exercised."""

    scale: float = 1.0


@registry.register("image", "toy_mean")
class ToyMeanImage(nn.Module):
    """A design defined in a test: each image's mean token, projected, written over one `<|image|>` placeholder."""

    Config = ToyConfig
    join = "embeds"

    def __init__(self, cfg: ToyConfig, lm_cfg: LlamaConfig, media_dim: int):
        super().__init__()
        self.scale = cfg.scale
        self.proj = nn.Linear(media_dim, lm_cfg.dim)

    def tokens_per_item(self) -> int:
        return 1

    def embed(self, media: torch.Tensor) -> torch.Tensor:
        return self.proj(media.mean(2, keepdim=True)) * self.scale  # (B, M, 1, D)


def lm_of(seed: int) -> Llama:
    torch.manual_seed(seed)
    lm = Llama(LlamaConfig(vocab_size=V, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64))
    lm.reset_parameters(seed=seed)
    return lm.eval()


def opened(model: ComposedLM) -> ComposedLM:
    """Every gate and speech marker set away from 0 (and random new-token rows), so a stream that leaked into a
    text-only forward would show."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate" in n or "markers" in n or n.endswith("token.weight"):
                p.add_(0.5)
    return model


def image_stream(lm: Llama, spec: dict) -> ImageStream:
    encoder = VisionEncoder(VCFG)  # features are given directly: it fixes their width DM
    torch.manual_seed(3)
    return ImageStream.build(lm, IMG, encoder, spec)


def composed(modality: str, kind: str, lm: Llama) -> ComposedLM:
    """The LM with a stream of the design (video: over a gated_xattn image stream), gates opened."""
    spec = {"kind": kind, **TINY.get(kind, {})}
    if modality == "image":
        return opened(ComposedLM(lm, image=image_stream(lm, spec))).eval()
    if modality == "video":
        model = ComposedLM(lm, image=image_stream(lm, {"kind": "gated_xattn", "every": 1}))
        model.attach(VideoStream.build(lm, VID, model.image, spec, every=2))
        return opened(model).eval()
    torch.manual_seed(3)
    encoder = ConformerEncoder(speech_shape("tiny", dim=32, layers=2, heads=2, ffn_dim=64, kernel=7))
    adapter = registry.build("speech", {**spec, "in_dim": 32, "out_dim": lm.cfg.dim})
    return opened(ComposedLM(lm, speech=SpeechStream(encoder, adapter, SPEECH))).eval()


def example(model: ComposedLM, modality: str, n_items: int = 1) -> tuple[list[int], dict]:
    """A prompt with n_items media and those media as `generate` takes them (unbatched features / one Audio)."""
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return ([1, 2] + (model.image.placeholder_ids() + [7, 8]) * n_items + [9, 10],
                {"image": torch.randn(n_items, N, DM, generator=g)})
    if modality == "video":
        return [1, 2] + (model.video.placeholder_ids() + [7, 8]) * n_items + [9, 10], {
            "video": torch.randn(n_items, 4, N, DM, generator=g)}  # 4 frames per clip
    waves = [torch.randn(4000, generator=g) * 0.1 for _ in range(n_items)]
    runs = sum((model.speech.placeholder_ids(model.speech.n_tokens(len(w))) + [7, 8] for w in waves), [])
    return [1, 2] + runs + [9, 10], {"speech": Audio(*pad_features([LogMel()(w) for w in waves]))}


def batched(media: dict) -> dict:
    """generate's unbatched image / video features as a batch of one for forward."""
    return {k: v if isinstance(v, Audio) else v[None] for k, v in media.items()}


DESIGNS = [(m, k) for m in registry.MODALITIES for k in registry.kinds(m)]


@pytest.mark.parametrize("modality,kind", DESIGNS)
def test_design_keeps_the_invariants(modality, kind):
    lm = lm_of(0)
    model = composed(modality, kind, lm)
    stream = getattr(model, modality)
    assert getattr(stream, DESIGN[modality]).kind == kind
    # invariant 1: no media is the bare LM, bitwise; the media do change the logits
    text = torch.randint(0, 80, (2, 12))  # no marker
    assert torch.equal(model(text), lm(text))
    prompt, media = example(model, modality)
    tokens = torch.tensor([prompt])
    assert not torch.equal(model(tokens, **batched(media)), lm(tokens))
    if modality == "video":  # without a video: exactly the image-only model
        image_only = ComposedLM(lm, image=copy.deepcopy(model.image))
        t, img = torch.tensor([[1, IMG, 3, 4, 5]]), torch.randn(1, 1, N, DM)
        assert torch.equal(model(t, image=img), image_only(t, image=img))
    # invariant 4: the trainable set is exactly the stream's parts, and a step's gradient stays inside it
    model.train()
    counts = model.train_only(modality)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = {f"{modality}.{part}.{n}" for part in PARTS[modality]
           for n, _ in getattr(stream, part).named_parameters()}
    assert own and trainable == own
    assert counts == {"trainable": sum(p.numel() for p in stream.parameters()),
                      "frozen": sum(p.numel() for n, p in model.named_parameters() if n not in own)}
    loss = model(tokens, **batched(media), labels=torch.roll(tokens, -1, 1))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    design = {n for n in own if n.startswith(f"{modality}.{DESIGN[modality]}.")}  # none for mean_pool
    assert got and got <= trainable and (got & design or not design)
    # invariant 6: an LM hot-swap leaves every stream tensor untouched
    model.eval()
    before = {k: v.clone() for k, v in model.stream_state_dict().items()}
    other = lm_of(7)
    model.load_lm_weights(other.state_dict())
    after = model.stream_state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in after.items())
    assert torch.equal(model.tok_embeddings.weight, other.tok_embeddings.weight)
    assert torch.equal(model(text), other(text))
    # cached generation (text KV cache, media computed once) equals uncached, over two media items
    prompt, media = example(model, modality, 2)
    outs = {(c, m): generate(model, prompt, 6, **media, use_cache=c, cache_media=m)
            for c in (True, False) for m in (True, False)}
    assert len(outs[True, True]) == 6 and all(o == outs[True, True] for o in outs.values())
    if modality == "image":  # rows of one prompt, each with its own images, decode as one batch, each as alone
        imgs = torch.randn(3, 2, N, DM, generator=torch.Generator().manual_seed(2))  # (rows, items, N, DM)
        rows = generate_rows(model, prompt, 6, image=imgs)
        assert rows == [generate(model, prompt, 6, image=imgs[r]) for r in range(3)]
        assert kind != "gated_xattn" or len({tuple(r) for r in rows}) > 1  # the rows' own images, not the first's
        stop = (rows[0][1],)  # rows stop one by one (and the stop id is not returned)
        assert generate_rows(model, prompt, 6, image=imgs, stop_ids=stop) == \
            [generate(model, prompt, 6, image=imgs[r], stop_ids=stop) for r in range(3)]
    if modality == "image":  # one image for two runs of placeholders / markers
        with pytest.raises(ValueError, match="markers|placeholders"):
            if model.image.join == "embeds":
                model(torch.tensor([prompt]), image=media["image"][None, :1])
            else:
                generate(model, prompt, 2, image=media["image"][:1])


def test_specs_are_checked_and_external_classes_load(tmp_path, monkeypatch):
    with pytest.raises(registry.DesignError, match="evry"):
        registry.parse("image", {"kind": "gated_xattn", "evry": 2})
    with pytest.raises(registry.DesignError, match="attend"):
        registry.parse("image", {"attend": "nearest"})
    with pytest.raises(registry.DesignError, match="registered: gated_xattn, perceiver_xattn, mlp_concat"):
        registry.parse("image", {"kind": "flamingo"})
    (tmp_path / "my_designs.py").write_text(
        "from dataclasses import dataclass\nimport torch.nn as nn\n\n@dataclass\nclass C:\n    width: int = 4\n\n"
        "class Pool(nn.Module):\n    Config = C\n\n    def __init__(self, cfg, media_dim):\n        super().__init__()\n"
        "        self.cfg, self.width = cfg, media_dim\n\n    def forward(self, frames):\n"
        "        return frames.mean(1, keepdim=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    agg = registry.build("video", {"kind": "my_designs:Pool", "width": 8}, media_dim=DM)
    assert type(agg).__name__ == "Pool" and agg.cfg.width == 8 and registry.spec_of(agg) == {
        "kind": "my_designs:Pool", "config": {"width": 8}}
    with pytest.raises(registry.DesignError, match="cannot import"):
        registry.design_class("video", "no_such_module:Pool")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("designs"))


@pytest.mark.parametrize("kind", ["toy_mean", "perceiver_xattn", "mlp_concat"])
def test_a_design_trains_through_the_cli_and_reloads(world, tmp_path, kind):
    spec = "{kind: toy_mean, scale: 0.5}" if kind == "toy_mean" else \
        "{kind: %s, %s}" % (kind, ", ".join(f"{k}: {v}" for k, v in TINY[kind].items()))
    res = _run(world, tmp_path / "run", f"adapter={spec}", "steps=30", "train.ckpt_every=30")
    assert res["final_loss"] < res["first_loss"]
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    saved = meta["streams"]["image"]["adapter"]
    assert saved["kind"] == kind
    model, _, _ = load_model(tmp_path / "run")
    assert model.image.adapter.kind == kind and model.image.adapter.cfg == registry.parse("image", saved)[1]
    if kind == "toy_mean":
        assert model.image.adapter.scale == 0.5


def test_stage_yamls_check_their_design_blocks():
    img, vid = "experiments/image/image_pretrain_tiny.yaml", "experiments/video/video_pretrain_tiny.yaml"
    with pytest.raises(ConfigError, match=r"image_pretrain_tiny.yaml: key 'adapter': .*'evry'"):
        load_config(img, ["lm=x", "vision=y", "adapter.evry=2"])
    with pytest.raises(ConfigError, match="moved: set adapter.every"):  # the flat key of older YAMLs
        load_config(img, ["lm=x", "vision=y", "every=2"])
    with pytest.raises(ConfigError, match=r"video_pretrain_tiny.yaml: key 'aggregator': .*'widht'"):
        load_config(vid, ["init_from=x", "aggregator.widht=3"])
    cfg = load_config(img, ["lm=x", "vision=y", "adapter={kind: mlp_concat, n_tokens: 4}"])  # a block replaces
    assert cfg.adapter == {"kind": "mlp_concat", "n_tokens": 4}
