"""Pretrained ViT import (encoders/import_vit.py, mm/vision_import.py, `mm import open_clip|timm`): tiny randomly
initialised open_clip / timm ViTs saved to disk and imported give the same features as their own forward; position
embeddings resample to another tile size; bad checkpoints / archs fail in one line; clip_pretrain starts from one."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from encoders.import_vit import VitImportError, default_taps, import_vit
from mm.model.checkpoint import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

VCFG = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}  # 4 heads, 4x4 patches


def _open_clip_arch(tmp: Path, quick_gelu: bool, **vision) -> Path:
    p = tmp / f"arch_{'q' if quick_gelu else 'g'}_{len(vision)}.json"
    p.write_text(json.dumps({"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {**VCFG, **vision}}))
    return p


def _open_clip_tower(quick_gelu: bool, seed: int = 0):
    """open_clip's own VisionTransformer as open_clip builds it, with every weight perturbed off its init."""
    from open_clip.model import _build_vision_tower

    torch.manual_seed(seed)
    v = _build_vision_tower(32, VCFG, quick_gelu).eval()
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    v.output_tokens = True
    return v


def _save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: t.detach().contiguous() for k, t in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {k: t.detach() for k, t in sd.items()}, "epoch": 3}, path)
    return path


def _feats(enc, x):
    enc.eval()
    with torch.no_grad():
        return enc.local_features(x[:, None], torch.zeros(len(x), dtype=torch.long))


@pytest.mark.parametrize("quick_gelu,fmt,full_clip", [(False, "safetensors", False), (True, "pt", True)])
def test_open_clip_import_matches_open_clip_forward(tmp_path, quick_gelu, fmt, full_clip):
    v = _open_clip_tower(quick_gelu)
    sd = v.state_dict()
    if full_clip:  # a whole CLIP checkpoint: image tower under visual.*, text tower beside it (ignored)
        sd = {**{f"visual.{k}": t for k, t in sd.items()}, "token_embedding.weight": torch.zeros(10, 8),
              "logit_scale": torch.ones(())}
    ckpt = _save(sd, tmp_path / f"oc.{fmt}")
    imp = import_vit("open_clip", ckpt, str(_open_clip_arch(tmp_path, quick_gelu)))
    enc = imp.encoder
    assert enc.cfg.act == ("quick_gelu" if quick_gelu else "gelu") and enc.cfg.heads == 4 and enc.cfg.qkv_bias
    assert imp.info["ignored_keys"] == (2 if full_clip else 0) and enc.cfg.taps == [0, 1]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled, tokens = v(x)
        inter = v.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True)
    out, taps = _feats(enc, x)
    torch.testing.assert_close(out[:, 1:], tokens, atol=1e-5, rtol=0)  # ln_post of every patch token
    torch.testing.assert_close(out[:, 0] @ imp.visual_proj.t(), pooled, atol=1e-5, rtol=0)  # CLS @ proj
    for i in (0, 1):  # tap i = output of block i
        torch.testing.assert_close(taps[i][:, 1:], inter["image_intermediates"][i], atol=1e-5, rtol=0)
    # the activation matters: the same weights read with the other activation give other features
    other = import_vit("open_clip", ckpt, str(_open_clip_arch(tmp_path, not quick_gelu))).encoder
    assert (_feats(other, x)[0][:, 1:] - tokens).abs().max() > 1e-3
    # our own parameters: tile embeddings and gated layers present, every gate at 0
    gates = [p.item() for n, p in enc.named_parameters() if n.endswith(("_gate", "gate_attn", "gate_mlp"))]
    assert gates == [0.0] * 5  # 3 tile gates + attn/mlp gates of the one gated layer


@pytest.mark.parametrize("kw", [{}, {"pre_norm": True, "act_layer": "quick_gelu", "qkv_bias": False}])
def test_timm_import_matches_timm_forward(tmp_path, kw):
    import timm

    arch = {"model": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
            "num_heads": 4, **kw}
    torch.manual_seed(1)
    m = timm.create_model(arch["model"], pretrained=False, num_classes=5,
                          **{k: v for k, v in arch.items() if k != "model"}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    ckpt = _save(m.state_dict(), tmp_path / "t.safetensors")
    imp = import_vit("timm", ckpt, str(tmp_path / "arch.json"), taps=[1], n_gated=2)
    assert imp.info["ignored_keys"] == 2 and imp.visual_proj is None  # head.weight / head.bias
    assert imp.encoder.cfg.pre_norm == bool(kw) and len(imp.encoder.gated) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)
    out, taps = _feats(imp.encoder, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(imp.encoder.vit.norm(taps[0]), ref, atol=1e-5, rtol=0)  # tap of the last block


def test_position_embeddings_resample_to_another_tile_size(tmp_path):
    from timm.layers import resample_abs_pos_embed

    v = _open_clip_tower(False)
    ckpt = _save(v.state_dict(), tmp_path / "oc.safetensors")
    enc = import_vit("open_clip", ckpt, str(_open_clip_arch(tmp_path, False)), image_size=48, max_tiles=4).encoder
    pos = enc.vit.pos_embed
    assert enc.cfg.image_size == 48 and pos.shape == (1, 37, 64)  # 6x6 patches + CLS
    assert torch.equal(pos[0, 0], v.positional_embedding[0])  # the class-token row is kept as is
    want = resample_abs_pos_embed(v.positional_embedding[None], [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.equal(pos, want) and not torch.allclose(pos[0, 1:7], v.positional_embedding[1:7])
    torch.testing.assert_close(enc.vit.patch_embed.proj.weight, v.conv1.weight, atol=0, rtol=0)
    out = enc.eval()(torch.randn(1, 4, 3, 48, 48), torch.tensor([5]))  # (2, 2) grid of 48-px tiles
    assert out.shape == (1, 4 * 37, 64 * 3) and torch.isfinite(out).all()


def test_clear_errors(tmp_path):
    v = _open_clip_tower(False)
    sd = v.state_dict()
    arch = str(_open_clip_arch(tmp_path, False))
    with pytest.raises(VitImportError, match=r"unknown open_clip arch 'ViT-Nope-1'"):
        import_vit("open_clip", _save(sd, tmp_path / "a.safetensors"), "ViT-Nope-1")
    with pytest.raises(VitImportError, match=r"unknown timm arch 'vit_nope'"):
        import_vit("timm", tmp_path / "a.safetensors", "vit_nope")
    with pytest.raises(VitImportError, match=r"a timm ResNet, not a plain VisionTransformer"):
        import_vit("timm", tmp_path / "a.safetensors", "resnet18")
    with pytest.raises(VitImportError, match=r"a ResNet image tower"):
        import_vit("open_clip", tmp_path / "a.safetensors", "RN50")
    missing = _save({k: t for k, t in sd.items() if k != "ln_pre.weight"}, tmp_path / "m.safetensors")
    with pytest.raises(VitImportError, match=r"m\.safetensors: does not fit open_clip arch .*1 missing keys "
                                             r"\(ln_pre\.weight\)"):
        import_vit("open_clip", missing, arch)
    extra = _save({**sd, "transformer.resblocks.0.ls_1.gamma": torch.ones(64)}, tmp_path / "x.safetensors")
    with pytest.raises(VitImportError, match=r"1 unexpected keys \(transformer\.resblocks\.0\.ls_1\.gamma\)"):
        import_vit("open_clip", extra, arch)
    big = str(_open_clip_arch(tmp_path, False, patch_size=16))  # the file holds a patch-8 ViT
    with pytest.raises(VitImportError, match=r"2 shape mismatches \(conv1\.weight \(64, 3, 8, 8\) vs "
                                             r"\(64, 3, 16, 16\), positional_embedding \(1, 17, 64\)"
                                             r" vs \(1, 5, 64\)\)"):
        import_vit("open_clip", tmp_path / "a.safetensors", big)
    with pytest.raises(VitImportError, match=r"nothing\.pt: no such checkpoint file"):
        import_vit("open_clip", tmp_path / "nothing.pt", arch)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(VitImportError, match=r"junk\.pt: unreadable"):
        import_vit("open_clip", tmp_path / "junk.pt", arch)
    # through the CLI: exit 2 and one JSON line naming the file
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["import", "open_clip", "--model", str(missing), "--arch", arch, "--out", str(tmp_path / "r")])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 2 and not res["ok"] and "m.safetensors" in res["error"] and "missing" in res["error"]
    assert not (tmp_path / "r" / "final").exists()


def test_default_taps_follow_the_paper():
    assert default_taps(32) == [3, 7, 15, 23, 30] and default_taps(2) == [0, 1] and default_taps(12) == [1, 2, 5, 8, 10]


def _cli(*argv) -> dict:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0, res
    return res


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, dict]:
    """`mm import open_clip` of a tiny QuickGELU ViT: (run dir, the open_clip state dict)."""
    root = tmp_path_factory.mktemp("imported")
    v = _open_clip_tower(True, seed=3)
    ckpt = _save(v.state_dict(), root / "oc.pt")
    res = _cli("import", "open_clip", "--model", str(ckpt), "--arch", str(_open_clip_arch(root, True)), "--out",
               str(root / "run"), "--taps", "1", "--n-gated", "1")
    assert res["vision_config"]["taps"] == [1] and res["source"]["sha256"] and res["params_imported"] > 0
    return root / "run", v.state_dict()


def test_imported_run_loads_as_vision(imported):
    from mm.model.checkpoint import load_meta
    from mm.model.store import load_vision

    run, sd = imported
    meta = load_meta(run / "final")
    assert meta["kind"] == "vision" and meta["vision_config"]["act"] == "quick_gelu"
    enc = load_vision(run)
    assert torch.equal(enc.vit.blocks[1].attn.qkv.weight, sd["transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(load_tensors(run / "final" / "model.safetensors")["visual_proj.weight"], sd["proj"].t())
    tiled = load_vision(run, max_tiles=4)  # an image stage's `vision=` with more tiles: the trunk is kept
    assert tiled.cfg.max_tiles == 4 and torch.equal(tiled.vit.pos_embed, enc.vit.pos_embed)
    thumb = load_vision(run, max_tiles=4, thumbnail=True)  # image_anneal's thumbnail: one more tile slot, gates at 0
    assert thumb.cfg.tile_slots == 5 and thumb.post_tile_embed.shape[1] == 5 and not thumb.post_tile_gate.detach().any()
    assert torch.equal(thumb.vit.blocks[1].attn.qkv.weight, enc.vit.blocks[1].attn.qkv.weight)


def test_clip_pretrain_starts_from_imported_encoder(imported, tmp_path, monkeypatch):
    from data.image_kit import encode_image, write_shards
    from llm.tokenizer import train_tokenizer
    from mm.config import ConfigError, load_config
    from mm.stages.clip_pretrain import build_clip

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    run, _ = imported
    start = {k[len("vision."):]: t for k, t in load_tensors(run / "final" / "model.safetensors").items()
             if k.startswith("vision.")}
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        samples = []
        for i in range(n):
            img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            img[:, :12, i % 2 * 2] = 230
            lab = ("bag", "sandal")[i % 2]
            samples.append({"__key__": f"{split}{i:05d}", "png": encode_image(img, "png"),
                            "txt": f"a photo of a {lab}.".encode(),
                            "json": json.dumps({"source": "fashion_mnist", "label": lab, "family": "recognition",
                                                "qa": []}).encode()})
        write_shards(samples, tmp_path / "shards", split, 16)
    ov = [f"data.shards={tmp_path}/shards/train-*.tar", f"data.val_shards={tmp_path}/shards/val-*.tar", "steps=2",
          f"vision_from={run}", "text.context_length=12", "text.width=32", "text.heads=2", "text.layers=1",
          "embed_dim=32", "tokenizer.vocab_size=300", "data.num_workers=0", "train.batch_size=8",
          "train.warmup_steps=1", "train.threads=0", "train.log_every=1", "train.eval_every=0",
          "train.progress=false", "train.ckpt_every=2", "data.eval_samples=0",
          "vision.stem=null"]  # the tiny YAML's conv stem is a shape field: the imported encoder brings its own
    cfg = load_config("experiments/image/clip_pretrain_tiny.yaml", ov)
    tok = train_tokenizer(["a photo of a bag.", "a photo of a sandal."] * 20, 300)
    model, _ = build_clip(cfg, tok)  # the stage's initial model: the encoder is exactly the imported one
    init = model.vision.state_dict()
    assert init.keys() == start.keys() and all(torch.equal(init[k], start[k]) for k in start)
    with pytest.raises(ConfigError, match=r"unset vision.stem \(vision.stem=null\)"):
        build_clip(load_config("experiments/image/clip_pretrain_tiny.yaml", ov[:-1]), tok)
    with pytest.raises(ConfigError, match="unset vision.width"):
        build_clip(load_config("experiments/image/clip_pretrain_tiny.yaml", ov + ["vision.width=32"]), tok)
    res = _cli("run", "experiments/image/clip_pretrain_tiny.yaml", "--out", str(tmp_path / "clip"), *ov)
    assert res["steps"] == 2 and np.isfinite(res["final_loss"])
    final = {k[len("vision."):]: t for k, t in load_tensors(tmp_path / "clip" / "final" / "model.safetensors").items()
             if k.startswith("vision.")}
    # two AdamW steps at lr <= 1e-3 move the imported ViT a little (a fresh init would be far off); the frozen
    # tile embeddings and gated layers stay exactly the imported run's
    vit = [k for k in start if k.startswith("vit.")]
    drift = max((final[k] - start[k]).abs().max().item() for k in vit)
    assert 0 < drift < 5e-3, drift
    assert all(torch.equal(final[k], start[k]) for k in start if not k.startswith("vit."))
