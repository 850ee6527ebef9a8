"""The video adapter (PAPER.md §5; DESIGN.md invariants 1-3): the perceiver aggregator merges `factor` consecutive
frames with learned frame positions, video blocks sit before every 4th image block and run before it, zero gates
change nothing, no-media logits stay bitwise the bare LM's, image-only logits are bitwise unchanged by adding a video
adapter, most-recent-`<|video|>` masking, and cached generation computes the video keys/values once."""
from __future__ import annotations

import pytest
import torch

from adapters.temporal import AggregatorConfig, PerceiverResampler
from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.streams import ImageStream, VideoStream

V, IMG, VID, DM, N = 96, 90, 91, 24, 5  # vocab, <|image|>, <|video|>, encoder width, tokens per frame/image
AGG = AggregatorConfig(factor=4, width=16, n_latents=2, depth=1, heads=2, max_frames=8, max_tokens=N)
VCFG = VisionConfig(image_size=16, patch_size=8, width=12, layers=1, heads=2, mlp_dim=24, taps=[0], n_gated=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_fused(n_layers: int = 4, every: int = 2, video: bool = True, seed: int = 0,
               init_std: float | None = None, gate_init: float = 0.0) -> ComposedLM:
    """The LM with an image stream (a ViT of width DM; features are given directly here) and a video stream."""
    torch.manual_seed(seed)
    lm = Llama(LlamaConfig(vocab_size=V, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    encoder = VisionEncoder(VCFG)
    torch.manual_seed(123)
    fused = ComposedLM(lm, image=ImageStream.build(lm, IMG, encoder, {"kind": "gated_xattn", "every": every}))
    if video:
        torch.manual_seed(7)
        fused.attach(VideoStream.build(lm, VID, fused.image, AGG, every=4, init_std=init_std, gate_init=gate_init))
    return fused.eval()


def open_gates(stream, value: float = 0.9) -> None:
    with torch.no_grad():
        for blk in stream.blocks.values():
            blk.gate_attn.fill_(value)
            blk.gate_ffn.fill_(-value)


def feats(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 80, (b, t), generator=torch.Generator().manual_seed(seed))


def test_aggregator_merges_consecutive_frames_with_positions(one_thread):
    torch.manual_seed(0)
    agg = PerceiverResampler(AggregatorConfig(factor=32, width=16, n_latents=2, depth=2, heads=2,
                                                  max_frames=64, max_tokens=N), DM).eval()
    x = feats(2, 64, N, DM)
    with torch.no_grad():
        out = agg(x)
        assert out.shape == (2, 2, N * 2, 16)  # 64 frames, factor 32 -> 2 effective frames of N tokens x 2 latents
        y = x.clone()
        y[:, 40, 1] += 1.0  # token 1 of a frame in the second window: only that effective frame's token-1 latents
        out2 = agg(y)
        changed = (out2 - out).abs().amax(dim=(0, 3))  # (E, N*L)
        assert changed[0].max() == 0 and changed[1, 2:4].min() > 0 and changed[1, [0, 1, 4, 5]].max() == 0
        z = x.clone()
        z[:, [3, 7]] = x[:, [7, 3]]  # swapping two frames inside one window: only the frame positions see it
        assert not torch.allclose(agg(z)[:, 0], out[:, 0])
        agg.frame_embed.zero_()
        assert torch.allclose(agg(z)[:, 0], agg(x)[:, 0], atol=1e-5)  # without positions the window is a set
    with pytest.raises(ValueError, match="multiple of the aggregation factor 32"):
        agg(x[:, :48])
    with pytest.raises(ValueError, match="max_tokens"):
        agg(feats(1, 32, N + 1, DM))


def test_spatial_layers_mix_an_effective_frames_tokens_only(one_thread):
    torch.manual_seed(0)
    agg = PerceiverResampler(AggregatorConfig(factor=4, width=16, n_latents=1, depth=1, heads=2, max_frames=8,
                                                  max_tokens=N, spatial_depth=1), DM).eval()
    x = feats(2, 8, N, DM)
    with torch.no_grad():
        out = agg(x)
        assert out.shape == (2, 2, N, 16)
        y = x.clone()
        y[0, 5, 1] += 1.0  # one token of one frame of the second window of video 0
        changed = (agg(y) - out).abs().amax(dim=3)  # (B, E, N)
    assert changed[0, 1].min() > 0  # every token of that effective frame sees it (spatial self-attention)
    assert changed[0, 0].max() == 0 and changed[1].max() == 0  # not the other window, not the other video
    assert len(agg.spatial) == 1 and len(PerceiverResampler(AGG, DM).spatial) == 0  # default: no spatial layers


def test_summary_tokens_follow_each_effective_frame_and_pool(one_thread):
    torch.manual_seed(0)
    cfg = AggregatorConfig(factor=4, width=16, n_latents=1, depth=1, heads=2, max_frames=8, max_tokens=N,
                           spatial_depth=1, summary_tokens=2)
    agg = PerceiverResampler(cfg, DM).eval()
    x = feats(2, 8, N, DM)
    with torch.no_grad():
        out = agg(x)
        assert out.shape == (2, 2, N + 2, 16)  # each effective frame: N place tokens, then 2 summary tokens
        y = x.clone()
        y[0, 5, 1] += 1.0  # one token of one frame of the second window of video 0
        changed = (agg(y) - out).abs().amax(dim=3)  # (B, E, N + 2)
        assert changed[0, 1, N:].min() > 0 and changed[0, 0].max() == 0 and changed[1].max() == 0
        flat = out.reshape(2, 1, -1, 16)  # as VideoStream.aggregate returns it: (B, M, E*(N+2), W)
        torch.testing.assert_close(agg.pooled(flat, 8), out[:, :, N:].mean(dim=(1, 2))[:, None])
        plain = PerceiverResampler(AGG, DM)
        torch.testing.assert_close(plain.pooled(flat, 8), flat.mean(dim=2))  # no summary tokens: all tokens
    with pytest.raises(ValueError, match="summary_tokens 2 need spatial_depth"):
        PerceiverResampler(AggregatorConfig(factor=4, width=16, max_frames=8, max_tokens=N, summary_tokens=2), DM)


def test_sincos_positions_are_geometric_and_keep_cls_and_shapes():
    torch.manual_seed(0)
    cfg = AggregatorConfig(factor=4, width=16, depth=1, heads=2, max_frames=8, max_tokens=2 * 10, positions="sincos")
    agg = PerceiverResampler(cfg, DM)  # 2 tiles of [CLS, 3 x 3 patches]
    te, fe = agg.token_embed.detach(), agg.frame_embed.detach()
    cos = torch.nn.functional.cosine_similarity
    # patch (0,0) is closer to its right neighbour than to the far end of its row; both tiles share the grid
    assert cos(te[1], te[2], dim=0) > cos(te[1], te[3], dim=0) > cos(te[1], te[9], dim=0)
    torch.testing.assert_close(te[1:10], te[11:20])
    assert not torch.allclose(te[0], te[10])  # the CLS rows keep their own N(0, 1) init
    assert cos(fe[0], fe[1], dim=0) > cos(fe[0], fe[3], dim=0) > cos(fe[0], fe[7], dim=0)  # later = farther
    assert abs(float(fe.pow(2).mean().sqrt()) - 1) < 0.05  # the same scale as the N(0, 1) tables
    torch.manual_seed(0)
    plain = PerceiverResampler(AggregatorConfig(**{**cfg.to_dict(), "positions": "normal"}), DM)
    assert cos(plain.frame_embed[0], plain.frame_embed[1], dim=0) < 0.5  # random tables carry no order
    assert agg(feats(2, 8, 20, DM)).shape == (2, 2, 20, 16)
    with pytest.raises(ValueError, match="not tiles of"):
        PerceiverResampler(AggregatorConfig(**{**cfg.to_dict(), "max_tokens": 7}), DM)
    with pytest.raises(ValueError, match="positions must be"):
        PerceiverResampler(AggregatorConfig(**{**cfg.to_dict(), "positions": "rope"}), DM)


def test_output_positions_start_at_zero_and_let_a_set_read_see_time_order():
    cfg = AggregatorConfig(factor=4, width=16, depth=1, heads=2, max_frames=8, max_tokens=N, spatial_depth=1)
    torch.manual_seed(0)
    plain = PerceiverResampler(cfg, DM).eval()
    torch.manual_seed(0)
    agg = PerceiverResampler(AggregatorConfig(**{**cfg.to_dict(), "out_positions": True}), DM).eval()
    x = feats(1, 8, N, DM)
    swapped = torch.cat([x[:, 4:], x[:, :4]], dim=1)  # the two windows' frames in the other order
    q = torch.randn(16)

    def read(out):  # one softmax attention read over all tokens: a weighted set, blind to token order
        flat = out.reshape(-1, 16)
        return (flat @ q).softmax(0) @ flat

    with torch.no_grad():
        agg.load_state_dict(plain.state_dict(), strict=False)
        assert torch.equal(agg(x), plain(x))  # zero tables: bitwise the aggregator without them
        for m in (plain, agg):  # frame positions are input-side: swapping windows changes each window's tokens
            m.frame_embed.zero_()
        torch.testing.assert_close(read(plain(x)), read(plain(swapped)))  # the set read cannot tell the order
        agg.out_frame_embed.normal_()
        agg.out_token_embed.normal_()
        out = agg(x)
        torch.testing.assert_close(out - plain(x), (agg.out_frame_embed[:2] + agg.out_token_embed[:N])[None])
        assert (read(out) - read(agg(swapped))).abs().max() > 1e-3  # with output positions it can


def test_video_blocks_placed_before_every_4th_image_block():
    big = make_fused(n_layers=32, every=4)
    assert big.image.adapter.layer_ids == list(range(3, 32, 4))  # 8 image blocks
    assert big.video.xattn.layer_ids == [15, 31]  # 8 -> 2 video blocks (PAPER.md §5 derived)
    tiny = make_fused()
    assert tiny.image.adapter.layer_ids == [1, 3] and tiny.video.xattn.layer_ids == [3]
    order = []
    for name, blk in [("video", tiny.video.blocks["3"]), ("image", tiny.image.blocks["3"]),
                      ("layer3", tiny.layers[3])]:
        blk.register_forward_hook(lambda *a, n=name: order.append(n))
    toks = text(1, 10)
    toks[0, 1], toks[0, 5] = IMG, VID
    with torch.no_grad():
        tiny(toks, image=feats(1, 1, N, DM), video=feats(1, 1, 8, N, DM))
    assert order == ["video", "image", "layer3"]
    keys = set(tiny.stream_state_dict())
    assert {"video.token.weight", "video.aggregator.frame_embed", "video.xattn.blocks.3.gate_attn"} <= keys
    assert not any(k.startswith("video.") for k in tiny.lm.state_dict())


def test_no_media_bitwise_lm_and_image_only_unchanged_by_video_adapter():
    plain, fused = make_fused(video=False), make_fused()
    fused.load_state_dict(plain.state_dict(), strict=False)  # same LM and image adapter
    open_gates(plain.image)
    open_gates(fused.image)
    open_gates(fused.video)
    toks = text(2, 12)
    with torch.no_grad():
        assert torch.equal(fused(toks), fused.lm(toks))  # no media: the bare LM, bitwise
        img_toks = toks.clone()
        img_toks[:, 2] = IMG
        image = feats(2, 1, N, DM)
        assert torch.equal(fused(img_toks, image=image), plain(img_toks, image=image))  # image-only: unchanged
        # gates at init (0), whatever the video blocks' init scale: a video changes nothing, bitwise
        fresh = make_fused(init_std=0.5)
        blk = fresh.video.blocks["3"]
        assert blk.gate_attn.item() == blk.gate_ffn.item() == 0.0 and 0.4 < blk.wq.weight.std().item() < 0.6
        fresh.load_state_dict(plain.state_dict(), strict=False)
        both = img_toks.clone()
        both[:, 6] = VID
        with torch.no_grad():
            fresh.video.token.weight.copy_(fresh.tok_embeddings.weight[VID][None])
        assert torch.equal(fresh(both, image=image, video=feats(2, 1, 8, N, DM)), plain(both, image=image))
        # opened video gates: the video now matters
        assert not torch.allclose(fused(both, image=image, video=feats(2, 1, 8, N, DM)), fused(both, image=image))
        # gate_init (video_pretrain's xattn_gate_init): the attention gates start open, the FFN gates at 0; text
        # without a video is still the bare LM's, bitwise, and a video matters from step 0
        opened = make_fused(init_std=0.5, gate_init=1.0)
        assert [(b.gate_attn.item(), b.gate_ffn.item()) for b in opened.video.blocks.values()] == [(1.0, 0.0)]
        opened.load_state_dict(plain.state_dict(), strict=False)
        opened.video.token.weight.copy_(opened.tok_embeddings.weight[VID][None])
        assert torch.equal(opened(toks), opened.lm(toks))
        assert torch.equal(opened(img_toks, image=image), plain(img_toks, image=image))
        assert not torch.allclose(opened(both, image=image, video=feats(2, 1, 8, N, DM)), plain(both, image=image))


def test_text_sees_only_the_most_recent_video():
    fused = make_fused()
    open_gates(fused.video)
    toks = text(1, 14)
    toks[0, 3], toks[0, 8] = VID, VID
    v = feats(1, 2, 8, N, DM)
    w = v.clone()
    w[:, 0] += 1.0  # change the first video only
    outs = []  # the video block's output (its input is the same for v and w: video enters the LM there first)
    fused.video.blocks["3"].register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        a = fused(toks, video=v)
        fused(toks, video=w)
        assert torch.equal(a[:, :3], fused.lm(toks)[:, :3])  # before the first marker: exactly the LM
        assert not torch.allclose(outs[0][:, 3:8], outs[1][:, 3:8])  # between the markers: sees video 0
        assert torch.equal(outs[0][:, 8:], outs[1][:, 8:])  # after marker 2: only video 1
        with pytest.raises(ValueError, match="2 media markers .* only 1 valid"):
            fused(toks, video=v[:, :1])
        with pytest.raises(ValueError, match="has no video stream"):
            make_fused(video=False)(toks, video=v)


def test_cached_generation_with_video_computes_aggregator_once():
    fused = make_fused()
    open_gates(fused.video, 1.5)
    open_gates(fused.image, 1.5)
    prompt = text(1, 10)[0].tolist()
    prompt[1], prompt[4] = VID, IMG
    video, image = feats(1, 8, N, DM), feats(1, N, DM, seed=3)
    calls = []
    fused.video.aggregator.register_forward_hook(lambda *a: calls.append(1))
    cached = generate(fused, prompt, 8, image=image, video=video)
    assert len(calls) == 1
    calls.clear()
    assert generate(fused, prompt, 8, image=image, video=video, cache_media=False) == cached
    assert len(calls) > 2  # recomputed per step
    assert generate(fused, prompt, 8, image=image, video=video, use_cache=False) == cached
    kv = fused.video_kv(video[None])
    assert generate(fused, prompt, 8, image=image, video=kv) == cached  # a precomputed clip, reused
    seq = prompt + cached
    with torch.no_grad():
        full = fused(torch.tensor([seq]), image=image[None], video=video[None])[0]
        other = fused(torch.tensor([seq]), image=image[None], video=feats(1, 1, 8, N, DM, seed=9))[0]
    assert int(full[len(seq) - 2].argmax()) == cached[-1]  # greedy steps agree with one full forward pass
    assert not torch.allclose(other, full)  # the video matters
