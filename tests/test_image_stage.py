"""Stages image_pretrain / image_anneal (DESIGN.md invariants 1, 4, 7): the exact trainable set (ViT + image adapter), the LM
bitwise unchanged by training, composed no-image logits bitwise equal to the bare LM after training, the stage through
`mm run` with exact resume, load_model, and the VQA scoring rule of benchmarks/image.py."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.image_kit import encode_image
from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig
from llm.tokenizer import train_tokenizer
from mm.model.checkpoint import load_tensors, save_weights
from mm.model.runs import load_lm, save_lm
from mm.model.store import load_model
from mm.model.streams import Pixels

REPO = Path(__file__).resolve().parents[1]
YAML = "experiments/image/image_pretrain_tiny.yaml"
N = 2  # interruption point; the run has 2N steps
VCFG = VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, taps=[0], n_gated=1,
                    max_tiles=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(i: int) -> np.ndarray:
    img = np.random.default_rng(i).integers(0, 60, (16, 16, 3)).astype(np.uint8)
    img[:, : 6 if i % 2 else 16, 0 if i % 2 else 2] = 230
    return img


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny image shards (png + txt + json via TarWriter), a tiny LM run and a tiny 'clip' run with a ViT."""
    return make_world(tmp_path_factory.mktemp("image_stage"))


def make_world(root: Path, max_seq_len: int = 128) -> dict:
    """The world fixture's files under root (the LM with max_seq_len positions)."""
    for split, n in (("train", 24), ("val", 6)):
        with wds.TarWriter(str(root / f"{split}-000000.tar")) as w:
            for i in range(n):
                lab = "bag" if i % 2 else "sandal"
                meta = {"source": "toy", "label": lab, "family": "recognition",
                        "qa": [{"question": "What is shown?", "answers": [lab]},
                               {"question": "Is it a bag?", "answers": ["yes" if i % 2 else "no"],
                                "choices": ["yes", "no"]}]}
                w.write({"__key__": f"{split}{i:04d}", "png": encode_image(_image(i), "png"),
                         "txt": f"a photo of a {lab}.", "json": json.dumps(meta)})
    tok = train_tokenizer(["a photo of a bag. a photo of a sandal. what is shown? is it a bag? yes no"] * 20, 300)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    lm = Llama(cfg)
    save_lm(root / "lm" / "final", lm.state_dict(), cfg, tok, {"stage": "lm_pretrain"})
    torch.manual_seed(1)
    enc = VisionEncoder(VCFG)
    save_weights(root / "clip" / "final", {"model": {f"vision.{k}": v for k, v in enc.state_dict().items()}},
                 {"kind": "clip", "vision_config": VCFG.to_dict()})
    return {"root": root, "lm": root / "lm", "clip": root / "clip"}


def _overrides(world: dict) -> list[str]:
    r = world["root"]
    return [f"lm={world['lm']}", f"vision={world['clip']}", f"data.shards={r}/train-*.tar",
            f"data.val_shards={r}/val-*.tar", f"steps={2 * N}", "adapter.every=2", "seq_len=48", "train.batch_size=4",
            "train.warmup_steps=1", "train.threads=0", "train.log_every=1", "train.progress=false",
            f"train.ckpt_every={N}", "train.lr=1e-2", "bow_weight=0.0"]  # the LM loss only unless a test sets it


def _run(world: dict, out: Path, *extra: str) -> dict:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", YAML, "--out", str(out), *_overrides(world), *extra])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0, res
    return res


def test_trainable_set_is_vit_plus_adapter(world):
    from mm.config import load_config
    from mm.train.distributed import DistInfo
    from mm.stages.image_pretrain import build_model
    from mm.train.trainer import Trainer

    cfg = load_config(REPO / YAML, _overrides(world))
    model, tok, _ = build_model(cfg)
    counts = model.train_only("image")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    vit = {f"image.encoder.{n}" for n, _ in model.image.encoder.named_parameters()}
    adapter = {f"image.adapter.{n}" for n, _ in model.image.adapter.named_parameters()}
    assert names == vit | adapter | {"image.token.weight"}
    assert "image.encoder.gated.0.gate_attn" in names and "image.adapter.blocks.1.gate_attn" in names
    lm_names = {n for n, _ in model.lm.named_parameters()}
    assert lm_names and not (lm_names & names) and counts["frozen"] == sum(p.numel() for p in model.lm.parameters())
    tr = Trainer(model, cfg.train, world["root"] / "opt_probe", loss_fn=None, lr_at=lambda s: 0.0, info=DistInfo())
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}  # the optimizer: trainable only
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in names}


def test_stage_trains_keeps_lm_and_resumes_exactly(world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    full = _run(world, tmp_path / "full")
    assert full["stage"] == "image_pretrain" and full["params_frozen"] > 0 and full["params_trainable"] > 0
    part = _run(world, tmp_path / "part", f"train.stop_after={N}")
    assert part["stopped_at"] == N and not (tmp_path / "part" / "final").exists()
    _run(world, tmp_path / "part", "--resume")
    a = load_tensors(tmp_path / "full" / "final" / "model.safetensors")
    b = load_tensors(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("layers.", "tok_embeddings")) for k in a)  # no LM weights in final
    # training moved the adapter gates and the ViT; the LM (in the step checkpoint, which holds everything) did not
    gates = [k for k in a if k.startswith("image.adapter.") and k.endswith(("gate_attn", "gate_ffn"))]
    assert any(a[k].abs().item() > 0 for k in gates)
    # the metrics log tanh(gate) per block; the last record matches the final weights
    last = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()][-1]
    for k in ("attn", "ffn"):
        assert last[f"gate_image/1.{k}"] == pytest.approx(torch.tanh(a[f"image.adapter.blocks.1.gate_{k}"]).item())
    lm_sd = load_tensors(world["lm"] / "final" / "model.safetensors")
    ck = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[-1]
    c = load_tensors(ck / "model.safetensors")
    assert all(torch.equal(c[k], v) for k, v in lm_sd.items())
    # invariant 1 after training: composed with no media == bare LM, bitwise; with media the answer changes
    model, tok, _ = load_model(tmp_path / "full")
    lm, _, _ = load_lm(world["lm"])
    toks = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(toks), lm(toks))
        img = tok.special_id("<|image|>")
        toks[:, 3] = img
        media = model.image.features(Pixels(torch.randn(2, 1, 3, 16, 16), None))  # (2, 1, P+1, D_out)
        assert not torch.equal(model(toks, image=media), lm(toks))
    # image_anneal: same runner from the trained run, more tiles (2x2 of 16 px from 32-px images), LM still frozen
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", "experiments/image/image_anneal_tiny.yaml", "--out", str(tmp_path / "anneal"),
                   *_overrides(world), f"init_from={tmp_path / 'full'}", "max_tiles=4", "data.image_size=32",
                   "thumbnail=true", "steps=1"])
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0 and res["stage"] == "image_anneal", res
    model2, _, _ = load_model(tmp_path / "anneal")
    assert model2.image.encoder.cfg.max_tiles == 4 and torch.equal(model2(toks[:, :3]), lm(toks[:, :3]))
    from mm.eval.image import image_features

    assert model2.image.encoder.cfg.thumbnail  # the whole image + its 2x2 tiles: 5 tiles' tokens
    assert image_features(model2, torch.zeros(3, 32, 32, dtype=torch.uint8)).shape[2] == 5 * 5


def test_vqa_scoring_rule():
    from mm.eval.image import vqa_score as score

    assert score("Two", ["2"]) == 1.0  # one reference: exact match after normalisation (number words -> digits)
    assert score("the cat.", "cat") == 1.0 and score("dog", ["cat"]) == 0.0
    assert score("2", ["2", "two", "3"]) == pytest.approx(2 / 3)  # 3+ refs (annotators): min(matches / 3, 1)
    assert score("three", ["3", "three"]) == 1.0 and score("second", ["2", "second"]) == 1.0  # 1-2: accepted forms
    assert score("4", ["3", "three"]) == 0.0
    assert score("red", ["red", "Red", "red!", "blue"]) == 1.0
    assert score("blue", ["red", "Red", "red!", "blue"]) == pytest.approx(1 / 3)
    assert score("green", ["red", "blue"]) == 0.0


def test_stage_media_cap_reaches_the_loader_workers(world, tmp_path):
    """`media.max_pixels` in the stage config caps what its DataLoader workers decode: with a 10-pixel cap every
    image is skipped and counted, and the run stops with one line saying so."""
    from mm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["run", YAML, "--out", str(tmp_path / "run"), *_overrides(world), "media.max_pixels=10",
                   "data.num_workers=1"])
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    assert rc == 2 and "no sample of batch 0 decodes" in res["error"] and "image_too_large" in res["error"]


def test_read_bow_aid_trains_the_read_resumes_exactly_and_is_not_saved(world, tmp_path, monkeypatch):
    """bow_weight > 0: the metrics log the bag-of-words loss beside the LM loss, the head is trained (its weights in
    the step checkpoint move) but never saved in final/, resume is still exact, and a design without cross-attention
    blocks is refused with one line."""
    monkeypatch.chdir(REPO)
    full = _run(world, tmp_path / "full", "bow_weight=1.0")
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("bow" in r and "lm_loss" in r for r in rows if "loss" in r)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["lm_loss"] + rows[-1]["bow"], rel=1e-5)
    _run(world, tmp_path / "part", "bow_weight=1.0", f"train.stop_after={N}")
    _run(world, tmp_path / "part", "bow_weight=1.0", "--resume")
    a = load_tensors(tmp_path / "full" / "final" / "model.safetensors")
    b = load_tensors(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("bow" in k for k in a)
    ck = load_tensors(sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    head = [k for k in ck if k.startswith("bow_head.")]
    assert head and full["params_trainable"] > _run(world, tmp_path / "plain")["params_trainable"]
    # the LM loss alone differs from the plain run's: the aid changed what the read learned
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()][-1]
    assert plain["loss"] != rows[-1]["lm_loss"]
    from mm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", YAML, "--out", str(tmp_path / "mlp"), *_overrides(world), "bow_weight=1.0",
                   "adapter={kind: mlp_concat, n_tokens: 4}"])
    assert rc != 0 and "bow_weight needs an image design with cross-attention blocks" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1
    err = io.StringIO()  # image_dpo's pairs carry no captions: refused before anything is built
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "experiments/image/image_dpo_tiny.yaml", "--out", str(tmp_path / "dpo"),
                   *_overrides(world), f"init_from={tmp_path / 'full'}", "bow_weight=1.0"])
    assert rc != 0 and "bow_weight applies to the VQA/caption objective, not DPOObjective" in err.getvalue(), \
        err.getvalue()


def test_qa_turns_asks_an_images_questions_as_consecutive_turns(world, tmp_path, monkeypatch):
    """qa_turns > 1: the image's qa items (all when it has fewer) follow the first answer as text-only turns after
    the one image, every answer and its <|eot_id|> trained; qa_turns 1 draws exactly what pick_question draws; 0 is
    refused with one line, and so is qa_turns > 1 on image_dpo (one question per pair)."""
    import random

    from data.dialog import dialog
    from llm.tokenizer import ChatFormat
    from mm.stages.image_pretrain import DESCRIBE, pick_question, pick_questions

    qa = [{"question": "What is shown?", "answers": ["bag"]},
          {"question": "Is it a bag?", "answers": ["yes"], "choices": ["yes", "no"]}]
    meta = {"qa": qa}
    ones = [pick_questions(meta, "cap", random.Random(s), 0.0) for s in range(20)]
    assert ones == [[pick_question(meta, "cap", random.Random(s), 0.0)] for s in range(20)]
    assert {o[0][0] for o in ones} == {"What is shown?", "Is it a bag? Options: yes, no."}
    both = [pick_questions(meta, "cap", random.Random(s), 0.0, turns=3) for s in range(20)]
    assert all(sorted(b) == sorted([("What is shown?", "bag"), ("Is it a bag? Options: yes, no.", "yes")])
               for b in both)
    assert {b[0][0] for b in both} == {"What is shown?", "Is it a bag? Options: yes, no."}  # the order is drawn
    assert pick_questions(meta, "cap", random.Random(0), 1.0, turns=3) == [(DESCRIBE, "cap")]

    _, tok, _ = load_lm(world["lm"])
    fmt, media = ChatFormat(tok), [tok.special_id("<|image|>")]
    one, one_mask = dialog(fmt, "What is shown?", "bag", media=media)
    ids, mask = dialog(fmt, "What is shown?", "bag", media=media, follow=[("Is it a bag?", "yes")])
    assert ids[:len(one)] == one and mask[:len(one)] == one_mask  # the first turn is the single-turn dialog
    assert ids.count(media[0]) == 1 and ids.count(tok.bos_id) == 1
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("bag") + [tok.eot_id] + tok.encode("yes") + [tok.eot_id]
    with pytest.raises(ValueError, match="follow-up turns need"):
        dialog(fmt, "What is shown?", None, media=media, follow=[("Is it a bag?", "yes")])

    monkeypatch.chdir(REPO)
    from mm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", YAML, "--out", str(tmp_path / "zero"), *_overrides(world), "qa_turns=0"])
    assert rc != 0 and "qa_turns must be >= 1" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1
    err = io.StringIO()  # image_dpo's pairs are one question each: refused before anything is built
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "experiments/image/image_dpo_tiny.yaml", "--out", str(tmp_path / "dpo"),
                   *_overrides(world), f"init_from={world['clip']}", "qa_turns=3"])
    assert rc != 0 and "qa_turns applies to the VQA/caption objective, not DPOObjective" in err.getvalue(), \
        err.getvalue()


def test_qa_sources_asks_several_turns_of_the_listed_sources_only(world, tmp_path, monkeypatch):
    """qa_sources: rows whose meta source starts with a listed prefix get qa_turns turns; every other row's tokens
    and labels are bit for bit those of the one-question feed; qa_sources with qa_turns 1 is refused with one line."""
    from mm.config import ImageStageConfig
    from mm.stages.image_pretrain import ImageFeed

    _, tok, _ = load_lm(world["lm"])
    images = torch.stack([torch.as_tensor(_image(i)).permute(2, 0, 1) for i in range(6)])  # (6, 3, 16, 16)
    qa = [{"question": "What is shown?", "answers": ["bag"]}, {"question": "Is it red?", "answers": ["no"]}]
    metas = [{"source": "mnist" if i % 2 else "toy", "qa": qa} for i in range(6)]
    batch = {"image": images, "meta": metas, "caption": ["a photo of a bag."] * 6}

    def feed(**kw) -> dict:
        cfg = ImageStageConfig(lm="x", vision="x", seq_len=64, caption_prob=0.0, **kw)
        return ImageFeed(None, tok, cfg, VCFG, torch.device("cpu")).make(5, batch)

    one, some = feed(), feed(qa_turns=2, qa_sources=["mnist"])
    eot = tok.eot_id
    for j in range(6):
        n_one = int((one["tokens"][j] != tok.pad_id).sum())
        answers = int(((some["labels"][j] == eot)).sum())
        assert answers == (2 if j % 2 else 1), j  # one <|eot_id|> trained per answer
        if j % 2 == 0:  # an unlisted source: the one-question row, bit for bit
            assert torch.equal(some["tokens"][j, :n_one], one["tokens"][j, :n_one])
            assert torch.equal(some["labels"][j, :n_one], one["labels"][j, :n_one])
    assert int((feed(qa_turns=2)["labels"] == eot).sum()) == 12  # no qa_sources: every row

    monkeypatch.chdir(REPO)
    from mm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", YAML, "--out", str(tmp_path / "bad"), *_overrides(world), "qa_turns=1",
                   "qa_sources=[mnist]"])
    assert rc != 0 and "qa_sources needs qa_turns > 1" in err.getvalue(), err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1


def test_augment_jitters_only_the_listed_sources_reproducibly(world, tmp_path, monkeypatch):
    """augment: the listed sources' training images are warped (same shape and dtype, the draw a function of (seed,
    batch, row)), other sources' pixels and every row's tokens stay bit for bit those of the unaugmented feed; zero
    ranges are the identity; out-of-range values and image_dpo are refused with one line."""
    import random

    from data.augment import affine_jitter
    from mm.config import ImageAugment, ImageStageConfig
    from mm.stages.image_pretrain import ImageFeed

    img = torch.full((3, 16, 16), 250, dtype=torch.uint8)
    img[:, 4:12, 6:10] = 10  # a dark bar on a light background
    assert torch.equal(affine_jitter(img, random.Random(0)), img)
    out = affine_jitter(img, random.Random(0), degrees=15, translate=0.2, scale=0.2)
    assert out.shape == img.shape and out.dtype == torch.uint8 and not torch.equal(out, img)
    assert torch.equal(out, affine_jitter(img, random.Random(0), degrees=15, translate=0.2, scale=0.2))
    assert int(out[:, 0, 0].min()) >= 240  # uncovered corners take the background, not black

    _, tok, _ = load_lm(world["lm"])
    images = torch.stack([torch.as_tensor(_image(i)).permute(2, 0, 1) for i in range(4)])  # (4, 3, 16, 16)
    metas = [{"source": "mnist" if i % 2 else "toy", "qa": [{"question": "What is shown?", "answers": ["bag"]}]}
             for i in range(4)]
    batch = {"image": images, "meta": metas, "caption": ["a photo of a bag."] * 4}

    def feed(augment: ImageAugment) -> dict:
        cfg = ImageStageConfig(lm="x", vision="x", seq_len=48, augment=augment)
        return ImageFeed(None, tok, cfg, VCFG, torch.device("cpu")).make(3, batch)

    plain = feed(ImageAugment())
    jittered = feed(ImageAugment(sources=["mnist"], degrees=20, translate=0.2, scale=0.2))
    for k in ("tokens", "labels"):
        assert torch.equal(plain[k], jittered[k])
    for j in range(4):
        same = torch.equal(plain["pixels"][j], jittered["pixels"][j])
        assert same == (j % 2 == 0), j  # only the mnist rows move
    assert torch.equal(jittered["pixels"], feed(ImageAugment(sources=["mnist"], degrees=20, translate=0.2,
                                                             scale=0.2))["pixels"])
    assert not torch.equal(jittered["pixels"], ImageFeed(None, tok, ImageStageConfig(
        lm="x", vision="x", seq_len=48, augment=ImageAugment(sources=["mnist"], degrees=20, translate=0.2,
                                                             scale=0.2)), VCFG, torch.device("cpu")).make(4, batch)["pixels"])

    monkeypatch.chdir(REPO)
    from mm.cli import main

    for extra, msg in ((["augment.scale=1.5"], "augment needs degrees >= 0"),):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["run", YAML, "--out", str(tmp_path / "bad"), *_overrides(world), *extra])
        assert rc != 0 and msg in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "experiments/image/image_dpo_tiny.yaml", "--out", str(tmp_path / "dpo"),
                   *_overrides(world), f"init_from={world['clip']}", "augment.sources=[mnist]"])
    assert rc != 0 and "augment applies to the VQA/caption objective, not DPOObjective" in err.getvalue(), \
        err.getvalue()
