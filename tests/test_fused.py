"""The composed model (DESIGN.md invariants 1-4, 6): bitwise text-only equality with the bare LM, zero-init gates,
row masks, most-recent-media attention, multi-image padding, trainable sets, key stability, hot-swap, cached
generation with media keys/values computed once."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.cross_attention import GatedCrossAttentionBlock, fusion_schedule
from adapters.masks import media_attention_mask
from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig
from mm.model.checkpoint import CheckpointError, save_weights
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.streams import ImageStream

REPO = Path(__file__).resolve().parents[1]
V, IMG, DM, N = 96, 90, 24, 5  # vocab, <|image|> id, encoder width, tokens per image
VCFG = VisionConfig(image_size=16, patch_size=8, width=12, layers=1, heads=2, mlp_dim=24, taps=[0], n_gated=0)
BLOCK_PARAMS = ["attention_norm.weight", "wq.weight", "wkv.weight", "wo.weight", "q_norm.weight", "k_norm.weight",
                "gate_attn", "ffn_norm.weight", "feed_forward.w13.weight", "feed_forward.w2.weight", "gate_ffn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lm(seed: int = 0, n_layers: int = 4) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=64)
    lm = Llama(cfg)
    lm.reset_parameters(seed=seed)
    return lm.eval()


def make_fused(lm: Llama, every: int = 2, **kw) -> ComposedLM:
    """The LM with an image stream: a ViT of width DM (features are given directly here) + gated_xattn."""
    encoder = VisionEncoder(VCFG)
    torch.manual_seed(123)
    stream = ImageStream.build(lm, IMG, encoder, {"kind": "gated_xattn", "every": every, **kw})
    return ComposedLM(lm, image=stream).eval()


def open_gates(fused: ComposedLM, value: float = 0.7) -> None:
    with torch.no_grad():
        for blk in fused.image.blocks.values():
            blk.gate_attn.fill_(value)
            blk.gate_ffn.fill_(-value)


def media(b: int, m: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, m, N, DM, generator=torch.Generator().manual_seed(seed))


def text(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 80, (b, t), generator=torch.Generator().manual_seed(seed))


def with_markers(tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
    tokens = tokens.clone()
    tokens[:, positions] = IMG
    return tokens


def test_media_mask_rules():
    t = torch.tensor([[5, IMG, 6, 7, IMG, IMG, 8, IMG, 9]])
    last = media_attention_mask(t, IMG, 4).int()[0]
    assert last.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0],  # nothing before the first
                             [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0],  # adjacent markers: both stay visible
                             [0, 0, 0, 1], [0, 0, 0, 1]]
    allp = media_attention_mask(t, IMG, 4, attend="all_previous").int()[0]
    assert allp.tolist()[6] == [1, 1, 1, 0] and allp.tolist()[8] == [1, 1, 1, 1] and allp[0].sum() == 0
    assert media_attention_mask(t, IMG, 2)[0, 7:].sum() == 0  # markers beyond n_media see nothing
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])  # packed: item 0 belongs to document 0 only
    assert media_attention_mask(t, IMG, 4, attend="all_previous", doc_ids=docs)[0, 6].int().tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError):
        media_attention_mask(t, IMG, 4, attend="nearest")


def test_fusion_schedules():
    assert fusion_schedule(32, 4, "from_top") == list(range(3, 32, 4)) == fusion_schedule(32, 4, "from_bottom")
    assert len(fusion_schedule(80, 4, "from_top")) == 20
    assert fusion_schedule(3, 2, "from_top") == [0, 2] and fusion_schedule(3, 2, "from_bottom") == [1]
    assert fusion_schedule(6, 4, "from_top") == [2, 5] and fusion_schedule(6, 4, "from_bottom") == [3]
    lm = make_lm(n_layers=3)
    for schedule, ids in (("from_top", [0, 2]), ("from_bottom", [1])):
        fused = make_fused(lm, every=2, schedule=schedule)
        assert list(fused.image.blocks) == [str(i) for i in ids]
        open_gates(fused)
        tokens = with_markers(text(1, 10), [2])
        out = fused(tokens, image=media(1, 1), return_hidden=True)
        ref = lm(tokens, return_hidden=True)
        assert torch.equal(out[:, :2], ref[:, :2]) and not torch.allclose(out[:, 2:], ref[:, 2:])
    with pytest.raises(ValueError):
        fusion_schedule(4, 4, [7])


def test_state_dict_keys_and_trainable_sets():
    lm = make_lm()
    fused = make_fused(lm)
    counts = fused.train_only("image")
    lm_keys = list(lm.state_dict())
    keys = list(fused.state_dict())
    assert keys[:len(lm_keys)] == lm_keys and "layers.0.attention.wqkv.weight" in keys
    assert all(k.startswith(("image.encoder.", "image.adapter.", "image.token.")) for k in keys[len(lm_keys):])
    ids = fusion_schedule(4, 2)
    expected = {"image.token.weight", "image.adapter.projection.weight", "image.adapter.projection.bias"}
    expected |= {f"image.adapter.blocks.{i}.{p}" for i in ids for p in BLOCK_PARAMS}
    expected |= {f"image.encoder.{n}" for n, _ in fused.image.encoder.named_parameters()}
    params = dict(fused.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == expected
    assert counts == {"trainable": sum(params[n].numel() for n in expected),
                      "frozen": sum(p.numel() for p in lm.parameters())}
    assert {id(p) for n, p in params.items() if n not in expected} == {id(p) for p in lm.parameters()}
    assert set(fused.stream_state_dict()) == expected
    assert fused.image.blocks["1"].gate_attn.shape == (1,)


def train_adapters(fused: ComposedLM, steps: int = 4) -> None:
    """A few AdamW steps on the image stream's parameters only, with media, LM frozen."""
    fused.train_only("image")
    fused.train()
    opt = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=3e-2)
    names = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not names & {id(p) for p in fused.lm.parameters()}
    tokens = with_markers(text(2, 16, seed=5), [3, 9])
    for s in range(steps):
        loss = fused(tokens[:, :-1], image=media(2, 2, seed=10 + s), labels=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in fused.lm.parameters())
        opt.step()
    fused.eval()


def test_no_media_bitwise_equal_at_init_and_after_training():
    lm = make_lm()
    bare = copy.deepcopy(lm)
    fused = make_fused(lm)
    tokens, docs = text(2, 20), torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    assert torch.equal(fused(tokens), bare(tokens))
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    ad_before = {k: v.clone() for k, v in fused.stream_state_dict().items()}
    train_adapters(fused)
    assert all(torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())
    changed = [k for k, v in fused.stream_state_dict().items() if not torch.equal(v, ad_before[k])]
    assert "image.token.weight" in changed and "image.adapter.blocks.1.gate_attn" in changed
    assert float(fused.image.blocks["1"].gate_attn.detach().abs()) > 0
    assert torch.equal(fused(tokens), bare(tokens))
    assert torch.equal(fused(tokens, doc_ids=docs), bare(tokens, doc_ids=docs))
    assert torch.equal(fused(tokens[:, :-1], labels=tokens[:, 1:]), bare(tokens[:, :-1], labels=tokens[:, 1:]))
    # the text-only path does not touch stream modules: poisoned streams change nothing, and no hook fires
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in fused.image.modules()]
    with torch.no_grad():
        for p in fused.image.parameters():
            p.fill_(float("nan"))
    assert torch.equal(fused(tokens), bare(tokens)) and not calls
    for h in hooks:
        h.remove()


def test_zero_gates_with_media_equal_bare_lm():
    lm = make_lm()
    fused = make_fused(lm)
    tokens = with_markers(text(2, 18), [4, 11])
    docs = torch.tensor([[0] * 10 + [1] * 8, [0] * 18])
    assert torch.equal(fused(tokens, image=media(2, 2)), lm(tokens))
    assert torch.equal(fused(tokens, image=media(2, 2), doc_ids=docs), lm(tokens, doc_ids=docs))
    loss = fused(tokens[:, :-1], image=media(2, 2), labels=tokens[:, 1:])
    assert torch.equal(loss, lm(tokens[:, :-1], labels=tokens[:, 1:]))


def naive_sdpa(q, k, v, attn_mask=None, enable_gqa=False):
    """Textbook attention: a fully masked row is NaN here (some fused kernels return 0 instead)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~attn_mask, float("-inf")), dim=-1) @ v


def test_rows_without_media_get_exactly_zero(monkeypatch):
    lm = make_lm()
    fused = make_fused(lm)
    open_gates(fused)
    tokens = with_markers(text(1, 16), [6])
    with_img = fused(tokens, image=media(1, 1), return_hidden=True)
    without = fused(tokens, return_hidden=True)
    assert torch.equal(with_img[:, :6], without[:, :6])
    assert not torch.allclose(with_img[:, 6:], without[:, 6:])
    # at block level: masked rows are returned bit for bit (attention and FFN both zero), no NaN anywhere
    blk = fused.image.blocks["1"]
    x = torch.randn(1, 16, 32)
    kv = blk.media_kv(torch.randn(1, 1, N, 32))
    mask = media_attention_mask(tokens, IMG, 1).repeat_interleave(N, dim=-1)  # (1, T, M*N)
    y = blk(x, kv, mask)
    assert not y.isnan().any() and torch.equal(y[:, :6], x[:, :6]) and not torch.equal(y[:, 6:], x[:, 6:])
    assert torch.equal(blk(x, kv, torch.zeros_like(mask)), x)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", naive_sdpa)
    y = blk(x, kv, mask)  # no reliance on the kernel's handling of fully masked rows
    assert not y.isnan().any() and torch.equal(y[:, :6], x[:, :6])


def test_attend_only_to_most_recent_image():
    lm = make_lm()
    fused = make_fused(lm)
    open_gates(fused)
    tokens = with_markers(text(1, 16), [3, 9])
    blk = fused.image.blocks["1"]
    x = torch.randn(1, 16, 32)
    m1, m2 = media(1, 2, seed=1), media(1, 2, seed=1)
    m2[:, 0] += 3.0  # change the earlier image only
    for attend, same_after in (("last", True), ("all_previous", False)):
        xm = media_attention_mask(tokens, IMG, 2, attend).repeat_interleave(N, dim=-1)
        y1 = blk(x, fused.image.kv(m1).kv[1], xm)
        y2 = blk(x, fused.image.kv(m2).kv[1], xm)
        assert not torch.equal(y1[:, 3:9], y2[:, 3:9])  # tokens between the markers see the changed image
        assert torch.equal(y1[:, 9:], y2[:, 9:]) == same_after
        assert torch.equal(y1[:, :3], x[:, :3])


def test_multiple_images_and_padding():
    lm = make_lm()
    fused = make_fused(lm)
    open_gates(fused)
    tokens = torch.stack([with_markers(text(1, 16, 3), [2, 8])[0], with_markers(text(1, 16, 4), [5])[0]])
    feats = media(2, 2)
    valid = torch.tensor([[True, True], [True, False]])
    out = fused(tokens, image=feats, image_mask=valid)
    alone = fused(tokens[1:], image=feats[1:, :1])  # the second sample with just its one image
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)
    poked = feats.clone()
    poked[1, 1] = 100.0  # padding content is never seen
    assert torch.equal(fused(tokens, image=poked, image_mask=valid), out)
    tok_valid = valid[..., None].repeat(1, 1, N)
    tok_valid[0, 1, -2:] = False  # padded tokens inside an item (e.g. padding tiles)
    assert not torch.equal(fused(tokens, image=feats, image_mask=tok_valid)[0], out[0])
    with pytest.raises(ValueError, match="markers"):
        fused(with_markers(tokens, [12]), image=feats, image_mask=valid)  # sample 1: two markers, one image


def test_hot_swap_replaces_only_lm(tmp_path):
    lm = make_lm(seed=0)
    fused = make_fused(lm)
    train_adapters(fused, steps=2)
    adapters = {k: v.clone() for k, v in fused.stream_state_dict().items()}
    instruct = make_lm(seed=7)
    fused.load_lm_weights(instruct.state_dict())
    assert all(torch.equal(v, adapters[k]) for k, v in fused.stream_state_dict().items())
    sd = fused.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in instruct.state_dict().items())
    tokens = text(2, 12)
    assert torch.equal(fused(tokens), instruct(tokens))
    assert not any(p.requires_grad for p in fused.lm.parameters())
    assert all(p.requires_grad for p in fused.image.parameters())
    save_weights(tmp_path / "lm", {"model": make_lm(seed=0).state_dict()}, {})
    fused.load_lm_weights(tmp_path / "lm")  # a model folder works too
    assert torch.equal(fused(tokens), make_lm(seed=0)(tokens))
    bad = dict(instruct.state_dict())
    bad.pop("norm.weight")
    with pytest.raises(CheckpointError, match="missing key 'norm.weight'"):
        fused.load_lm_weights(bad)
    with pytest.raises(CheckpointError, match="unexpected key"):
        fused.load_lm_weights({**instruct.state_dict(), **adapters})


def test_cached_generation_matches_uncached_and_media_kv_once(monkeypatch):
    lm = make_lm()
    fused = make_fused(lm)
    open_gates(fused, 1.5)
    prompt = with_markers(text(1, 12), [1, 6])[0].tolist()
    feats = media(1, 2)[0]
    calls: dict[int, int] = {}
    real = GatedCrossAttentionBlock.media_kv

    def counting(self, x):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real(self, x)

    monkeypatch.setattr(GatedCrossAttentionBlock, "media_kv", counting)
    cached = generate(fused, prompt, 10, image=feats)
    assert sorted(calls.values()) == [1, 1] and len(calls) == len(fused.image.blocks)
    calls.clear()
    assert generate(fused, prompt, 10, image=feats, cache_media=False) == cached
    assert set(calls.values()) == {10}  # prefill + 9 decode steps, each recomputing
    assert generate(fused, prompt, 10, image=feats, use_cache=False) == cached
    sampled = dict(greedy=False, temperature=1.0, seed=3)
    assert generate(fused, prompt, 10, image=feats, **sampled) == generate(fused, prompt, 10, image=feats,
                                                                           use_cache=False, **sampled)
    # step logits from the cache equal a full forward pass
    seq = prompt + cached[:4]
    full = fused(torch.tensor([seq]), image=feats[None])[0]
    kv = fused.image.kv(feats[None])
    lm.setup_cache(1, len(seq))
    try:
        t = torch.tensor([seq])
        xm = media_attention_mask(t, IMG, 2)
        steps = [fused(t[:, :len(prompt)], image=kv, image_xattn_mask=xm[:, :len(prompt)])[0, -1]]
        for p in range(len(prompt), len(seq)):
            steps.append(fused(t[:, p:p + 1], image=kv, image_xattn_mask=xm[:, p:p + 1], start_pos=p)[0, -1])
    finally:
        lm.clear_cache()
    torch.testing.assert_close(torch.stack(steps), full[len(prompt) - 1:], rtol=1e-5, atol=1e-5)
    other = media(1, 2, seed=9)[0]
    assert not torch.allclose(fused(torch.tensor([seq]), image=other[None])[0], full)  # media matter
    plain = text(1, 6)[0].tolist()
    assert generate(fused, plain, 5) == generate(fused, plain, 5, use_cache=False)


def test_speed_mm_benchmark_runs():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_mm.py"), "--dim", "32", "--n-layers", "2",
                        "--image-tokens", "4", "16", "--text-len", "8", "--reps", "1", "--gen-tokens", "3"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [c["image_tokens"] for c in out["configs"]] == [4, 16]
    c = out["configs"][1]
    assert c["llava_forward_flops"] > c["xattn_forward_flops"] > 0 and c["xattn_cache_speedup"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_invariants(dtype):
    """On the GPU kernels: text-only and zero-gate bitwise equality, exact zero before the first image, no NaN from
    fully masked rows, and cached generation equal to uncached."""
    lm = make_lm().to("cuda", dtype)
    fused = make_fused(lm)
    tokens = with_markers(text(2, 18), [4, 11]).cuda()
    feats = media(2, 2).cuda()
    assert torch.equal(fused(tokens, image=feats), lm(tokens))
    open_gates(fused)
    with_img = fused(tokens, image=feats, return_hidden=True)
    assert not with_img.isnan().any() and torch.equal(with_img[:, :4], lm(tokens, return_hidden=True)[:, :4])
    plain = text(2, 18).cuda()
    with torch.no_grad():
        for p in fused.image.parameters():
            p.fill_(float("nan"))
    assert torch.equal(fused(plain), lm(plain))
    if dtype != torch.float32:  # bf16 rounding differs between cached and full shapes: compare greedy in fp32
        return
    fused = make_fused(make_lm().to("cuda"))
    open_gates(fused, 1.5)
    prompt = with_markers(text(1, 12), [1, 6])[0].tolist()
    one = media(1, 2)[0].cuda()
    assert generate(fused, prompt, 8, image=one) == generate(fused, prompt, 8, image=one, use_cache=False)
