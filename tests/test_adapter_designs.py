"""Every registered adapter design keeps the composed model's invariants (DESIGN.md 1, 4, 6): without media the
logits are bitwise the bare LM's, the trainable set is exactly the design + encoder side, hot-swapping the LM leaves
the adapter untouched, cached generation equals uncached, and a saved run reloads bitwise. A toy design defined in
this file, and one in a module outside the repository, train through `mm run` with a YAML override alone."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from adapters import registry
from llm.model import Llama, LlamaConfig
from mm.fused import FusedLM, generate_fused
from tests.test_image_stage import _run, make_world

V, IMG, VID, DM, N = 96, 90, 91, 24, 5  # vocab, <|image|>, <|video|>, encoder width, tokens per image
TINY = {"gated_xattn": {"every": 2}, "perceiver_xattn": {"every": 2, "n_latents": 3, "heads": 2, "depth": 1},
        "mlp_concat": {"n_tokens": 3}, "perceiver": {"factor": 2, "width": 16, "heads": 2, "depth": 1,
                                                    "max_frames": 4, "max_tokens": N},
        "mean_pool": {"factor": 2, "max_frames": 4}}

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


def opened(fused: FusedLM) -> FusedLM:
    """Every gate set away from 0 (and random new-token rows), so an adapter that leaked into a text-only forward
    would show."""
    with torch.no_grad():
        for n, p in fused.named_parameters():
            if "gate" in n or n.startswith("new_tokens"):
                p.add_(0.5)
    return fused


def image_model(kind: str, lm: Llama | None = None) -> FusedLM:
    torch.manual_seed(3)
    return opened(FusedLM(lm or lm_of(0), DM, IMG, adapter={"kind": kind, **TINY.get(kind, {})}).eval())


def prompt(fused: FusedLM, n_images: int = 1) -> list[int]:
    return [1, 2] + ([IMG] * fused.image_run + [7, 8]) * n_images + [9, 10]


IMAGE_KINDS = registry.kinds("image")


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_design_without_media_is_the_bare_lm(kind):
    lm = lm_of(0)
    fused = image_model(kind, lm)
    text = torch.randint(0, 80, (2, 12))  # no marker
    assert torch.equal(fused(text), lm(text))
    media = torch.randn(1, 1, N, DM)
    assert not torch.equal(fused(torch.tensor([prompt(fused)]), media), lm(torch.tensor([prompt(fused)])))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_design_trains_exactly_itself_and_survives_a_hot_swap(kind):
    lm = lm_of(0)
    fused = image_model(kind, lm).train()
    fused.freeze_lm()
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    design = {f"image_adapter.{n}" for n, _ in fused.image_adapter.named_parameters()}
    assert design and trainable == design | {"new_tokens.weight"}
    tokens = torch.tensor([prompt(fused)])
    loss = fused(tokens, torch.randn(1, 1, N, DM), labels=torch.roll(tokens, -1, 1))
    loss.backward()
    got = {n for n, p in fused.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and got <= trainable and any(n.startswith("image_adapter.") for n in got)
    before = {k: v.clone() for k, v in fused.adapter_state_dict().items()}
    other = lm_of(7)
    fused.load_lm_weights(other.state_dict())
    assert all(torch.equal(before[k], v) for k, v in fused.adapter_state_dict().items())
    assert torch.equal(fused.tok_embeddings.weight, other.tok_embeddings.weight)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_design_cached_generation_equals_uncached(kind):
    fused = image_model(kind)
    media = torch.randn(2, N, DM)  # two images
    p = prompt(fused, 2)
    fast = generate_fused(fused, p, media, 6)
    slow = generate_fused(fused, p, media, 6, use_cache=False, cache_media=False)
    assert fast == slow and len(fast) == 6
    with pytest.raises(ValueError, match="markers|placeholders"):  # one image for two runs of placeholders / markers
        fused(torch.tensor([p]), media[None, :1]) if fused.joins_by_embeds else generate_fused(fused, p, media[:1], 2)


VIDEO_KINDS = registry.kinds("video")


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_design_invariants(kind):
    lm = lm_of(0)
    torch.manual_seed(3)
    fused = FusedLM(lm, DM, IMG, new_token_ids=(IMG, VID), adapter={"kind": "gated_xattn", "every": 1}).eval()
    image_only = copy.deepcopy(fused)
    fused.add_video(DM, VID, {"kind": kind, **TINY[kind]}, every=2)
    opened(fused)
    assert fused.video_adapter.aggregator.kind == kind
    t = torch.tensor([[1, IMG, 3, 4, 5]])
    img = torch.randn(1, 1, N, DM)
    with torch.no_grad():
        for n, p in image_only.named_parameters():
            p.copy_(dict(fused.named_parameters())[n])
    assert torch.equal(fused(t, img), image_only(t, img))  # no video: exactly the image model
    clip = torch.randn(1, 4, N, DM)  # 4 frames
    p = [1, VID, 3, 4]
    assert generate_fused(fused, p, None, 5, video=clip) == generate_fused(fused, p, None, 5, video=clip,
                                                                          use_cache=False, cache_media=False)
    fused.freeze_lm()
    names = {n for n, q in fused.named_parameters() if q.requires_grad and n.startswith("video_adapter.")}
    assert names == {f"video_adapter.{n}" for n, _ in fused.video_adapter.named_parameters()}


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
    from mm.stages.image_pretrain import load_fused

    spec = "{kind: toy_mean, scale: 0.5}" if kind == "toy_mean" else \
        "{kind: %s, %s}" % (kind, ", ".join(f"{k}: {v}" for k, v in TINY[kind].items()))
    res = _run(world, tmp_path / "run", f"adapter={spec}", "steps=30", "train.ckpt_every=30")
    assert res["final_loss"] < res["first_loss"]
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    assert meta["image_adapter"]["kind"] == kind
    fused, vision, tok = load_fused(tmp_path / "run")
    assert fused.image_adapter.kind == kind and fused.image_adapter.cfg == registry.parse("image", meta[
        "image_adapter"])[1]
    if kind == "toy_mean":
        assert fused.image_adapter.scale == 0.5


def test_stage_yamls_check_their_design_blocks():
    from mm.config import ConfigError, load_config

    img, vid = "experiments/image/image_pretrain_tiny.yaml", "experiments/video/video_pretrain_tiny.yaml"
    with pytest.raises(ConfigError, match=r"image_pretrain_tiny.yaml: key 'adapter': .*'evry'"):
        load_config(img, ["lm=x", "vision=y", "adapter.evry=2"])
    with pytest.raises(ConfigError, match="moved: set adapter.every"):  # the flat key of older YAMLs
        load_config(img, ["lm=x", "vision=y", "every=2"])
    with pytest.raises(ConfigError, match=r"video_pretrain_tiny.yaml: key 'aggregator': .*'widht'"):
        load_config(vid, ["init_from=x", "aggregator.widht=3"])
    cfg = load_config(img, ["lm=x", "vision=y", "adapter={kind: mlp_concat, n_tokens: 4}"])  # a block replaces
    assert cfg.adapter == {"kind": "mlp_concat", "n_tokens": 4}
