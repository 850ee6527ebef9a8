"""The image encoder (PAPER.md §3): taps + tiles shapes, gates at 0 are exactly the identity, tiling grid choice,
the paper shape's size, CLIP training/zero-shot on toy data, the clip_pretrain stage end to end with exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.image_kit import encode_image, write_shards
from encoders.clip import (ClipLoss, ClipModel, TextConfig, retrieval_recall_at_k, tokenize_captions,
                           zero_shot_accuracy)
from encoders.vision import (GatedBlock, VisionConfig, VisionEncoder, best_grid, count_params, normalize_pixels,
                             resample_positions, supported_grids, tile_batch, tile_image, vision_config)
from llm.tokenizer import train_tokenizer
from mm.model.checkpoint import load_tensors

SMALL = dict(image_size=16, patch_size=8, width=32, layers=4, heads=2, mlp_dim=64, taps=[1, 3], n_gated=2)
T = 5  # tokens per 16-px tile with patch 8: 4 patches + CLS


pytestmark = pytest.mark.usefixtures("one_thread")


def _enc(seed: int = 0, **kw) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(VisionConfig(**{**SMALL, **kw})).eval()


def _aid(grid, max_tiles: int = 4) -> int:
    return supported_grids(max_tiles).index(grid)


# ---- shapes, taps, tiles ------------------------------------------------------------------------------------------

def test_shapes_with_taps_and_tiles():
    enc = _enc(max_tiles=4)
    px = torch.randn(2, 4, 3, 16, 16)
    aspect = torch.tensor([_aid((2, 2)), _aid((1, 2))])
    out = enc(px, aspect)
    assert out.shape == (2, 4 * T, 32 * 3) and enc.cfg.out_dim == 96
    assert torch.all(out[1, 2 * T:] == 0)  # padding tiles of the 1x2 image are zeroed
    # the tap channels are the outputs of blocks 1 and 3, in `taps` order
    x, taps = enc.local_features(px[:1], aspect[:1])
    assert torch.equal(out[:1, :, 32:64], taps[0]) and torch.equal(out[:1, :, 64:], taps[1])
    # padding tiles are masked as keys: what they hold does not reach the real tokens
    px2 = px.clone()
    px2[1, 2:] = torch.randn(2, 3, 16, 16) * 5
    torch.testing.assert_close(enc(px2, aspect)[1, :2 * T], out[1, :2 * T], rtol=0, atol=1e-6)
    # the default one-tile path: (B, 1, 3, t, t), no aspect ids
    assert _enc()(torch.randn(3, 1, 3, 16, 16)).shape == (3, T, 96)


def test_gated_layers_are_identity_at_init():
    torch.manual_seed(0)
    blk = GatedBlock(32, 2, 64)
    x = torch.randn(2, 7, 32)
    assert torch.equal(blk(x), x)
    enc, bare = _enc(n_gated=2), _enc(n_gated=0)
    bare.load_state_dict(enc.state_dict(), strict=False)
    px = torch.randn(2, 1, 3, 16, 16)
    assert torch.equal(enc(px), bare(px))  # bitwise: 8 gated layers add exactly nothing at init
    for name in ("gate_attn", "gate_mlp"):
        e = _enc(n_gated=2)
        with torch.no_grad():
            getattr(e.gated[1], name).fill_(0.5)
        assert not torch.allclose(e(px), bare(px))


def test_tile_embeddings_are_gated():
    enc = _enc(max_tiles=4)
    px = torch.randn(1, 2, 3, 16, 16)
    wide, tall = torch.tensor([_aid((1, 2))]), torch.tensor([_aid((2, 1))])
    ref = enc(px, wide)
    assert torch.equal(ref, enc(px, tall))  # aspect-ratio / tile embeddings have no effect at init
    one = _enc()  # one tile: exactly timm's ViT (forward_features) before the gated layers
    x = torch.randn(3, 1, 3, 16, 16)
    assert torch.equal(one.local_features(x, torch.zeros(3, dtype=torch.long))[0], one.vit.forward_features(x[:, 0]))
    for gate in ("pre_tile_gate", "tile_pos_gate", "post_tile_gate"):
        e = _enc(max_tiles=4)
        with torch.no_grad():
            getattr(e, gate).fill_(0.3)
        assert not torch.allclose(e(px, wide), e(px, tall)), gate


@pytest.mark.parametrize("h,w,max_tiles,grid", [
    (64, 64, 4, (1, 1)), (64, 128, 4, (1, 2)), (128, 64, 4, (2, 1)), (128, 128, 4, (2, 2)), (200, 50, 4, (4, 1)),
    (50, 200, 4, (1, 4)), (32, 32, 4, (1, 1)), (300, 300, 4, (2, 2)), (100, 300, 2, (1, 2)), (64, 200, 1, (1, 1)),
    (96, 64, 4, (2, 1)),
])
def test_best_grid(h, w, max_tiles, grid):
    assert best_grid(h, w, 64, max_tiles) == grid


def test_tile_image_content_and_padding():
    img = torch.randint(0, 256, (3, 16, 32), dtype=torch.uint8)  # exactly 1x2 tiles: no resize
    t = tile_image(img, 16, 4)
    assert t.grid == (1, 2) and t.aspect_id == _aid((1, 2)) and t.tiles.dtype == torch.uint8
    assert torch.equal(t.tiles[0], img[:, :, :16]) and torch.equal(t.tiles[1], img[:, :, 16:])
    t = tile_image(img[:, :, :24], 16, 4)  # 16x24 -> 1x2 canvas, right 8 columns padded
    assert t.tiles.shape == (2, 3, 16, 16) and torch.all(t.tiles[1, :, :, 8:] == 0)
    t = tile_image(np.zeros((40, 30, 3), np.uint8), 16, 4)  # numpy HWC input, downscaled into 2x2
    assert t.grid == (2, 2) and t.tiles.shape == (4, 3, 16, 16)
    px, aspect = tile_batch([img, np.zeros((32, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], 16, 4)
    assert px.shape == (3, 4, 3, 16, 16) and aspect.tolist() == [_aid((1, 2)), _aid((2, 1)), _aid((1, 1))]
    assert _enc(max_tiles=4)(normalize_pixels(px), aspect).shape == (3, 4 * T, 96)


def test_thumbnail_tile_first_masked_slots_and_gated_tables():
    img = torch.randint(0, 256, (3, 16, 32), dtype=torch.uint8)  # a 1x2 grid
    small = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)  # one tile: already the whole image, no thumbnail
    px, aspect = tile_batch([img, small], 16, 4, thumbnail=True)
    assert px.shape == (2, 5, 3, 16, 16)
    assert torch.equal(px[0, 0], tile_image(img, 16, 1).tiles[0])  # the whole image fitted to one tile, first
    assert torch.equal(px[0, 1:3], tile_image(img, 16, 4).tiles) and not px[0, 3:].any()
    assert torch.equal(px[1, 0], small) and not px[1, 1:].any()
    enc = _enc(max_tiles=4, thumbnail=True)
    assert enc.cfg.tile_slots == 5 and enc.pre_tile_embed.shape[1] == 5
    assert enc.tile_counts(aspect).tolist() == [3, 1]
    x = normalize_pixels(px)
    out = enc(x, aspect)  # (2, 5 * T, 96): padding tiles' tokens zeroed
    assert out.shape == (2, 5 * T, 96) and not out[0, 3 * T:].any() and not out[1, T:].any()
    alone = enc(x[:1, :3], aspect[:1])  # the real tiles alone give the same tokens: padding changes nothing
    torch.testing.assert_close(alone, out[:1, :3 * T], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="thumbnail=False"):
        _enc(max_tiles=4)(x, aspect)  # 5 tiles into an encoder without the thumbnail slot


def test_paper_shape_parameter_count():
    cfg = vision_config("paper")
    assert cfg.out_dim == 7680 and cfg.tokens_per_tile == 1025 and len(supported_grids(cfg.max_tiles)) == 8
    with torch.device("meta"):
        n = count_params(VisionEncoder(cfg))
    assert abs(n - 850e6) / 850e6 < 0.03, n


# ---- CLIP ------------------------------------------------------------------------------------------------------

LABELS = ("bag", "sandal")


def _toy(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n 16x16 uint8 images (N, 3, 16, 16): red-ish left bar for bag, blue-ish bottom bar for sandal."""
    rng = np.random.default_rng(seed)
    imgs, labels = rng.integers(0, 60, (n, 3, 16, 16)).astype(np.uint8), []
    for i in range(n):
        lab = LABELS[i % 2]
        if lab == "bag":
            imgs[i, 0, :, :6] = 230
        else:
            imgs[i, 2, 10:, :] = 230
        labels.append(lab)
    return imgs, labels


def _tok():
    return train_tokenizer([f"a photo of a {lab}." for lab in LABELS] * 20 + ["a small picture"] * 5, 300)


def test_clip_loss_decreases_and_zero_shot_beats_chance():
    tok = _tok()
    torch.manual_seed(0)
    model = ClipModel(VisionConfig(**{**SMALL, "layers": 2, "taps": [0], "n_gated": 1}),
                      TextConfig(context_length=12, width=32, heads=2, layers=1), tok.vocab_size, tok.pad_id,
                      tok.eot_id, embed_dim=32, pool="mean")  # at init a tiny ViT's CLS barely sees the image
    imgs, labels = _toy(16, 0)
    px = normalize_pixels(torch.from_numpy(imgs))
    ids = tokenize_captions(tok, [f"a photo of a {lab}." for lab in labels], 12)
    assert (ids == tok.eot_id).sum(1).tolist() == [1] * 16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn, losses = ClipLoss(), []
    for _ in range(30):
        loss = loss_fn(*model(px, ids))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses  # 16 pairs, 2 distinct captions: the floor is log(8) ~ 2.08
    test_imgs, test_labels = _toy(20, 1)
    acc = zero_shot_accuracy(model, tok, test_imgs, test_labels, list(LABELS), ["a photo of a {label}."])
    assert acc > 0.8, acc  # chance 0.5
    r = retrieval_recall_at_k(model, tok, test_imgs, [f"a photo of a {lab}." for lab in test_labels], (1,))
    assert r["n_captions"] == 2 and r["i2t_r@1"] > r["i2t_chance@1"]
    # the stage's trainable set (DESIGN.md invariant 4): ViT, projection, text tower, logit scale; not the tile
    # embeddings, their gates or the gated layers (those train from image_pretrain on)
    from mm.stages.clip_pretrain import freeze_for_clip

    counts = freeze_for_clip(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "logit_scale" in trainable and "visual_proj.weight" in trainable and "vision.vit.pos_embed" in trainable
    assert all(n.startswith(("vision.vit.", "visual_proj.", "text.")) or n == "logit_scale" for n in trainable)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("vision.") and
                      not n.startswith("vision.vit.")} and counts["frozen"] > 0


# ---- the stage ---------------------------------------------------------------------------------------------------

N = 2  # interruption point; the run has 2N steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip_shards")
    for split, n, seed in (("train", 48, 0), ("val", 12, 1)):
        imgs, labels = _toy(n, seed)
        samples = [{"__key__": f"{split}{i:05d}", "png": encode_image(imgs[i].transpose(1, 2, 0), "png"),
                    "txt": f"a photo of a {lab}.".encode(),
                    "json": json.dumps({"source": "fashion_mnist", "label": lab, "family": "recognition",
                                        "qa": []}).encode()}
                   for i, lab in enumerate(labels)]
        write_shards(samples, root, split, 24)
    return root


def _run(shards: Path, out: Path, *extra: str) -> dict:
    import contextlib
    import io

    from mm.cli import main

    ov = [f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", f"steps={2 * N}",
          "vision.image_size=16", "vision.width=32", "vision.layers=2", "vision.heads=2", "vision.mlp_dim=64",
          "vision.taps=[0]", "vision.n_gated=1", "text.context_length=12", "text.width=32", "text.heads=2",
          "text.layers=1", "embed_dim=32", "tokenizer.vocab_size=300", "data.num_workers=0", "train.batch_size=8",
          "train.warmup_steps=1", "train.threads=0", "train.log_every=1", "train.eval_every=0", "train.progress=false",
          f"train.ckpt_every={N}"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", "experiments/image/clip_pretrain_tiny.yaml", "--out", str(out), *ov, *extra])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0, res
    return res


def test_clip_pretrain_stage_resume_and_loaders(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    full = _run(shards, tmp_path / "full")
    assert {"zs_fashion_mnist", "zs_fashion_mnist_chance", "i2t_r@1", "i2t_r@5", "t2i_r@1"} <= set(full)
    part = _run(shards, tmp_path / "part", f"train.stop_after={N}")
    assert part["stopped_at"] == N and not (tmp_path / "part" / "final").exists()
    _run(shards, tmp_path / "part", "--resume")
    a = load_tensors(tmp_path / "full" / "final" / "model.safetensors")
    b = load_tensors(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only the ViT, projection, text tower and logit scale train: the tile gates get a gradient through the one-tile
    # path, so had they been in the optimizer they would have moved off 0 at the first step
    assert all(a[f"vision.{g}"].item() == 0.0 for g in ("pre_tile_gate", "tile_pos_gate", "post_tile_gate"))
    assert a["vision.gated.0.gate_attn"].item() == 0.0
    # loading: the vision encoder alone, the whole CLIP model, and the curation scorer
    from data.curation import clip_filter
    from encoders.clip import clip_score_fn
    from mm.model.runs import load_clip
    from mm.model.store import load_vision

    enc = load_vision(tmp_path / "full")
    assert isinstance(enc, VisionEncoder) and enc.cfg.width == 32 and enc.cfg.taps == [0]
    assert torch.equal(enc.vit.pos_embed, a["vision.vit.pos_embed"])
    big = load_vision(tmp_path / "full", tile_size=32)  # 2 x 2 patches -> 4 x 4: the position tables resampled
    assert big.cfg.image_size == 32 and big.vit.pos_embed.shape == (1, 17, 32)
    assert torch.equal(big.vit.pos_embed[:, 0], enc.vit.pos_embed[:, 0])  # the CLS row kept
    assert torch.equal(big.vit.blocks[0].attn.qkv.weight, enc.vit.blocks[0].attn.qkv.weight)
    assert big(torch.randn(2, 1, 3, 32, 32), torch.zeros(2, dtype=torch.long)).shape == (2, 17, big.cfg.out_dim)
    with pytest.raises(ValueError, match="tile_size 20 is not a positive multiple of the encoder's patch size 8"):
        load_vision(tmp_path / "full", tile_size=20)
    model, tok, meta = load_clip(tmp_path / "full")
    assert meta["kind"] == "clip" and tok.vocab_size == model.text.vocab_size
    score = clip_score_fn(model, tok)
    imgs, _ = _toy(2, 3)
    s = score(imgs[0].transpose(1, 2, 0), "a photo of a bag.")
    assert isinstance(s, float) and -1.0 <= s <= 1.0
    kept, removed = clip_filter([{"image": imgs[0].transpose(1, 2, 0), "caption": "a bag"}], score, 2.0)
    assert kept == [] and removed["clip_below_threshold"] == 1


def test_resample_positions_keeps_a_smooth_table_and_the_cls_row():
    """Position tables resampled from a 4 x 4 to an 8 x 8 patch grid (a 2x tile): the CLS row kept, a table that
    varies smoothly over the grid kept (2 x 2 means of the new grid within 2% of the old), the same grid unchanged."""
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, taps=[0], n_gated=1)
    sd = VisionEncoder(cfg).state_dict()
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    field = (torch.stack([yy.flatten(), xx.flatten()], 1) + 1) @ torch.randn(2, 32)  # (16, D), linear in position
    sd["vit.pos_embed"] = torch.cat([torch.randn(1, 32), field])[None]
    new = resample_positions(sd, 8, 4)
    assert new["vit.pos_embed"].shape == (1, 65, 32) and new["tile_pos_embed"].shape == (1, 1, 65, 32)
    assert torch.equal(new["vit.pos_embed"][0, 0], sd["vit.pos_embed"][0, 0])
    assert torch.equal(new["tile_pos_embed"][..., 0, :], sd["tile_pos_embed"][..., 0, :])
    pooled = new["vit.pos_embed"][0, 1:].view(4, 2, 4, 2, 32).mean((1, 3)).reshape(16, 32)
    assert (pooled - field).norm() < 0.02 * field.norm()
    same = resample_positions(sd, 4, 4)
    assert torch.equal(same["vit.pos_embed"], sd["vit.pos_embed"])


def test_conv_stem_same_tokens_per_image_and_one_line_errors():
    """stem 'conv' (log2(patch) stride-2 convs + a 1x1 projection): the same token grid and output width as the
    patch stem, a different embedding of the same pixels, each image's features independent of the other images and
    padding tiles in its batch (per-image GroupNorm), and a patch size that is no power of 2 refused in one line."""
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, taps=[0], n_gated=1,
                       max_tiles=4)
    patch, conv = VisionEncoder(cfg), VisionEncoder(VisionConfig(**{**cfg.to_dict(), "stem": "conv"}))
    px = torch.randn(3, 4, 3, 32, 32)
    aspect = torch.tensor([0, 3, 5])  # 1 tile (3 padding tiles), a 2x2 grid, another grid
    a, b = patch(px, aspect), conv(px, aspect)
    assert a.shape == b.shape == (3, 4 * cfg.tokens_per_tile, cfg.out_dim)
    assert not torch.allclose(a, b)
    assert "vit.patch_embed.backbone.0.conv.weight" in dict(conv.named_parameters())
    one = conv(px[:1], aspect[:1])
    assert torch.allclose(one, b[:1], atol=1e-5)  # the batch's other images do not change image 0
    bad = px.clone()
    bad[0, 1:] = 7.0  # image 0's padding tiles (masked) hold other values: its real tile's features are unchanged
    assert torch.allclose(conv(bad, aspect)[0, :cfg.tokens_per_tile], b[0, :cfg.tokens_per_tile], atol=1e-5)
    with pytest.raises(ValueError, match="power-of-2 patch_size"):
        VisionEncoder(VisionConfig(image_size=28, patch_size=14, stem="conv"))
