"""Stages video_pretrain / video_sft (DESIGN.md invariants 1, 4, 6, 7): the exact trainable set (video adapter
only, also in the optimizer), image weights bitwise unchanged by video training (so image figures cannot move),
no-video logits bitwise the bare LM's, exact resume, the instruct-LM hot-swap and factor change of video_sft, the
benchmark metrics (paper prompts, letter parsing, single-frame control) and `mm eval video` / `mm chat --video`."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.image_kit import make_qa
from data.video_kit import encode_mp4
from encoders.vision import VisionConfig, VisionEncoder
from llm.model import Llama, LlamaConfig
from llm.tokenizer import train_tokenizer
from mm.model.checkpoint import load_tensors
from mm.model.composed import ComposedLM
from mm.model.runs import load_lm, save_lm
from mm.model.store import load_model, save_model
from mm.model.streams import ImageStream, Pixels

REPO = Path(__file__).resolve().parents[1]
PRE, SFT = "experiments/video/video_pretrain_tiny.yaml", "experiments/video/video_sft_tiny.yaml"
VCFG = VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, taps=[0], n_gated=1,
                    max_tiles=1)
DIRS = ["left", "right", "up", "down"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip(i: int) -> np.ndarray:
    """8 frames of 16x16: a bright square moving in direction DIRS[i % 4]."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[DIRS[i % 4]]
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    for t in range(8):
        x, y = 6 + dx * (t - 4), 6 + dy * (t - 4)
        frames[t, max(0, y):y + 4, max(0, x):x + 4] = 230
    return frames


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny video shards, a tiny LM + an 'instruct' LM with the same tokenizer, and an image run built at init."""
    root = tmp_path_factory.mktemp("video_stage")
    for split, n in (("train", 16), ("val", 4)):
        with wds.TarWriter(str(root / f"{split}-000000.tar")) as w:
            for i in range(n):
                d = DIRS[i % 4]
                meta = {"family": "direction", "fps": 8, "frames": 8,
                        "qa": [make_qa("In which direction does the square move?", [d], DIRS),
                               make_qa("Where is the square at the end?", [d])]}
                w.write({"__key__": f"{split}{i:04d}", "mp4": encode_mp4(_clip(i), 8),
                         "txt": f"The square moves {d}.", "json": json.dumps(meta)})
    tok = train_tokenizer(["the square moves left right up down. in which direction does it move? select the "
                           "correct answer from the following options answer with the correct option letter and "
                           "nothing else A B C D describe video where is end"] * 20, 400)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=160)
    for name, seed in (("lm", 0), ("instruct", 5)):
        torch.manual_seed(seed)
        save_lm(root / name / "final", Llama(cfg).state_dict(), cfg, tok, {"stage": "lm_pretrain"})
    torch.manual_seed(1)
    vision = VisionEncoder(VCFG)
    lm, tok, _ = load_lm(root / "lm")
    model = ComposedLM(lm, image=ImageStream.build(lm, tok.special_id("<|image|>"), vision,
                                                   {"kind": "gated_xattn", "every": 2}))
    with torch.no_grad():
        for blk in model.image.blocks.values():
            blk.gate_attn.fill_(0.5)  # an image adapter that does something
    save_model(root / "image" / "final", model, tok, {"stage": "image_anneal", "lm": str(root / "lm" / "final")})
    return {"root": root, "image": root / "image", "lm": root / "lm", "instruct": root / "instruct"}


def _overrides(world: dict, steps: int = 4, recipe: bool = False) -> list[str]:
    """Tiny-world overrides; recipe False pins the paper-faithful adapter (no spatial layers, no output positions,
    no bag-of-words head), True keeps the tiny YAMLs' beyond-the-paper recipe."""
    r = world["root"]
    paper = [] if recipe else ["aggregator.spatial_depth=0", "aggregator.out_positions=false", "bow_weight=0",
                               "bow_source=aggregate"]
    return [f"init_from={world['image']}", f"data.shards={r}/train-*.tar", f"data.val_shards={r}/val-*.tar",
            f"steps={steps}", "num_frames=8", "factor=8", "aggregator.width=16", "aggregator.n_latents=4",
            "aggregator.depth=1", "aggregator.heads=2", "aggregator.max_frames=16", "train.batch_size=4",
            "train.warmup_steps=1", "train.threads=0", "train.log_every=1", "train.progress=false",
            "train.ckpt_every=2", "train.lr=1e-2", "seq_len=96", *paper]


def _cli(*argv: str) -> tuple[int, dict]:
    from mm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, json.loads(buf.getvalue().strip().splitlines()[-1])


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _video_adapter(model) -> set[str]:
    """The stage-model-level names of the video stream's parameters."""
    return {f"model.video.{n}" for n, _ in model.model.video.named_parameters()}


def test_trainable_set_is_the_video_adapter_and_the_recipe_head(world):
    from mm.config import load_config
    from mm.train.distributed import DistInfo
    from mm.stages.video import build_model
    from mm.train.trainer import Trainer

    cfg = load_config(REPO / PRE, _overrides(world))
    model, tok, _, _ = build_model(cfg)
    counts = model.train_only_video()
    video = _video_adapter(model)
    assert _trainable(model) == video
    assert {"model.video.token.weight", "model.video.aggregator.frame_embed", "model.video.aggregator.latents",
            "model.video.xattn.blocks.3.gate_attn", "model.video.xattn.projection.weight"} <= video
    assert counts["trainable"] == sum(p.numel() for p in model.model.video.parameters())
    frozen = [p for n, p in model.named_parameters() if n not in video]
    assert frozen and not any(p.requires_grad for p in frozen)  # ViT, image adapter, <|image|> row, LM
    tr = Trainer(model, cfg.train, world["root"] / "opt_probe", loss_fn=None, lr_at=lambda s: 0.0, info=DistInfo())
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in video}
    # the tiny YAMLs' recipe: spatial layers and output positions inside the adapter, plus the bag-of-words head on
    # the read; video_sft must name the same adapter as the pretraining it starts from (else build_model refuses)
    pre = load_config(REPO / PRE, _overrides(world, recipe=True))
    model, _, _, _ = build_model(pre)
    model.train_only_video()
    agg = model.model.video.aggregator
    assert len(agg.spatial) == 2 and agg.cfg.out_positions and model.bow_head.in_features == model.model.lm.cfg.dim
    assert _trainable(model) == _video_adapter(model) | {"bow_head.weight", "bow_head.bias"}
    sft = load_config(REPO / SFT, _overrides(world, recipe=True))
    assert (sft.aggregator, sft.bow_weight, sft.bow_source) == (pre.aggregator, pre.bow_weight, pre.bow_source)
    # xattn_gate_init: video_pretrain's fresh attention gates start there (the FFN gates at 0); the default is 0
    assert all(b.gate_attn.item() == 0.0 for b in model.model.video.blocks.values())
    opened, _, _, _ = build_model(load_config(REPO / PRE, _overrides(world) + ["xattn_gate_init=1.0"]))
    assert [(b.gate_attn.item(), b.gate_ffn.item()) for b in opened.model.video.blocks.values()] == \
        [(1.0, 0.0)] * len(opened.model.video.blocks)


def test_caption_bag_of_words_trains_only_the_aggregator_side(world):
    from mm.config import load_config
    from mm.stages.video import build_model
    from mm.train.read_bow import caption_bow

    cfg = load_config(REPO / PRE, _overrides(world) + ["bow_weight=1.0"])
    model, tok, _, _ = build_model(cfg)
    model.train_only_video()
    assert {n for n in _trainable(model) if not n.startswith("model.video.")} == {"bow_head.weight", "bow_head.bias"}
    bow = caption_bow(tok, ["A red ball moves to the left.", ""])
    assert torch.allclose(bow[0].sum(), torch.tensor(1.0)) and bow[1].sum() == 0  # uniform over distinct tokens
    assert set(bow[0].nonzero().flatten().tolist()) == set(tok.encode("A red ball moves to the left."))
    torch.manual_seed(0)
    t = model.model.image.encoder.cfg.image_size
    pixels, aspect = torch.randn(2, 8, 1, 3, t, t), torch.zeros(2, 8, dtype=torch.long)  # 8 frames, one tile each
    toks = torch.full((2, 6), 5)
    toks[:, 1] = tok.special_id("<|video|>")
    labels = toks.clone()
    with torch.no_grad():
        for blk in model.model.video.blocks.values():  # open the gates: the video reaches the loss
            blk.gate_attn.fill_(0.5)
    loss, bow_loss = model(toks, pixels, aspect, labels=labels, bow=bow)
    assert torch.equal(loss, model(toks, pixels, aspect, labels=labels))  # the same LM loss as without the head
    bow_loss.backward()
    agg_grad = model.model.video.aggregator.latents.grad
    assert agg_grad is not None and agg_grad.abs().sum() > 0 and model.bow_head.weight.grad.abs().sum() > 0
    assert all(b.wq.weight.grad is None for b in model.model.video.blocks.values())  # no read involved


def test_bag_of_words_on_the_read_trains_the_cross_attention_not_its_gates(world):
    from mm.config import load_config
    from mm.stages.video import VideoModel, build_model
    from mm.train.read_bow import caption_bow

    cfg = load_config(REPO / PRE, _overrides(world) + ["bow_weight=1.0", "bow_source=read"])
    model, tok, _, _ = build_model(cfg)
    model.train_only_video()
    assert model.bow_head.in_features == model.model.lm.cfg.dim  # it reads the LM-width cross-attention output
    torch.manual_seed(0)
    t = model.model.image.encoder.cfg.image_size
    pixels, aspect = torch.randn(2, 8, 1, 3, t, t), torch.zeros(2, 8, dtype=torch.long)
    toks = torch.full((2, 6), 5)
    toks[:, 2] = tok.special_id("<|video|>")  # rows 0-1 see no clip (their read is zero and not averaged)
    bow = caption_bow(tok, ["A red ball moves to the left.", "A cat moves up."])
    loss, bow_loss = model(toks, pixels, aspect, labels=toks.clone(), bow=bow)
    blocks = list(model.model.video.blocks.values())
    assert all(not b.keep_read and b.read is None for b in blocks)  # nothing kept after the step
    assert torch.equal(loss, model(toks, pixels, aspect, labels=toks.clone()))  # the LM loss is unchanged
    bow_loss.backward()
    assert all(b.wq.weight.grad.abs().sum() > 0 and b.wkv.weight.grad.abs().sum() > 0 for b in blocks)
    assert model.model.video.aggregator.latents.grad.abs().sum() > 0
    assert all(b.gate_attn.grad is None or b.gate_attn.grad.abs().sum() == 0 for b in blocks)  # pre-gate: no gate
    with pytest.raises(ValueError, match=r"video_pretrain_tiny\.yaml .*'bow_source': Invalid value 'reads'"):
        build_model(load_config(REPO / PRE, _overrides(world) + ["bow_weight=1.0", "bow_source=reads"]))
    with pytest.raises(ValueError, match="bow_source must be one of"):
        VideoModel(model.model, tok.vocab_size, "reads")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_probe_reads_separable_features_and_not_noise():
    lp = _bench("video_probe").linear_probe
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 8, generator=g)
    x[:, :4] += 3.0 * torch.nn.functional.one_hot(y, 4)  # the label written into 4 of 8 dims
    assert lp(x[:160], y[:160], x[160:], y[160:])["val_acc"] >= 0.95
    noise = torch.randn(200, 8, generator=g)
    assert lp(noise[:160], y[:160], noise[160:], y[160:])["val_acc"] <= 0.5


def test_attention_read_probe_needs_positions_when_only_the_place_differs():
    probe = _bench("video_probe").attention_read_probe
    g = torch.Generator().manual_seed(0)
    n, T, W = 240, 6, 8
    x = 0.3 * torch.randn(n, T, W, generator=g)
    place = torch.arange(n) % T
    x[torch.arange(n), place] += 2.0 * torch.nn.functional.one_hot(torch.tensor(0), W).float()  # the same "object"
    y = (place >= T // 2).long()  # the label is where the object sits: the token set alone does not carry it
    tr, va = slice(0, 180), slice(180, n)
    blind = probe(x[tr], y[tr], x[va], y[va], positions=False, epochs=60)
    seeing = probe(x[tr], y[tr], x[va], y[va], positions=True, epochs=60)
    assert seeing["val_acc"] >= 0.95 and blind["val_acc"] <= 0.7, (blind, seeing)


def test_pretrain_keeps_image_weights_resumes_and_sft_hot_swaps(world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, full = _cli("run", PRE, "--out", str(tmp_path / "pre"), *_overrides(world))
    assert rc == 0 and full["stage"] == "video_pretrain" and full["params_trainable"] > 0, full
    logged = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert all({"gate_video/3.attn", "gate_video/3.ffn"} <= set(r) for r in logged if "loss" in r)  # gate plots
    # benchmarks/video_probe.py: every place is probed; fitted on the aggregator's tokens of the training clips, the
    # probe names the direction of the held-out ones (the same four motions re-encoded: labels must line up with the
    # clips). The frame floor is not asserted: mp4 artifacts make the middle frames differ slightly.
    probe = _bench("video_probe").evaluate(argparse.Namespace(
        ckpt=str(tmp_path / "pre"), train_shards=str(world["root"] / "train-*.tar"),
        shards=str(world["root"] / "val-*.tar"), train_clips=16, val_clips=4, frames=0, weight_decay=1e-3, threads=1,
        read_epochs=5))
    assert probe["train_clips"] == 16 and probe["val_clips"] == 4
    assert set(probe) >= {"agg_flat", "agg_mean", "lm_state", "lm_state_frame", "agg_read", "agg_read_pos"} and \
        probe["agg_flat"]["val_acc"] == 1.0, probe
    rc, part = _cli("run", PRE, "--out", str(tmp_path / "part"), *_overrides(world), "train.stop_after=2")
    assert rc == 0 and part["stopped_at"] == 2
    _cli("run", PRE, "--out", str(tmp_path / "part"), *_overrides(world), "--resume")
    a = load_tensors(tmp_path / "pre" / "final" / "model.safetensors")
    b = load_tensors(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    # image weights (ViT, image adapter, <|image|> row) bitwise those of the image run; video gates moved
    img = load_tensors(world["image"] / "final" / "model.safetensors")
    assert set(img) < set(a) and all(torch.equal(a[k], v) for k, v in img.items())
    assert any(a[k].abs().item() > 0 for k in a if k.startswith("video.") and k.endswith("gate_attn"))
    assert not any(k.startswith(("layers.", "tok_embeddings")) for k in a)  # no LM weights saved
    # the image part of the video run is the image model: identical image logits; no media: the bare LM
    vmodel, tok, _ = load_model(tmp_path / "pre")
    imodel, _, _ = load_model(world["image"])
    lm, _, _ = load_lm(world["lm"])
    toks = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vmodel(toks), lm(toks))
        itoks = toks.clone()
        itoks[:, 2] = tok.special_id("<|image|>")
        px = torch.randn(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        media = imodel.image.features(Pixels(px, None))
        assert torch.equal(vmodel(itoks, image=media), imodel(itoks, image=media))
        vtoks = toks.clone()
        vtoks[:, 2] = tok.special_id("<|video|>")
        video = torch.randn(2, 1, 8, VCFG.tokens_per_tile, VCFG.out_dim)
        assert not torch.allclose(vmodel(vtoks, video=video), lm(vtoks))
    # video_sft: from the pretrain run, instruct LM hot-swapped, a different factor, still only the video adapter
    from mm.config import load_config
    from mm.stages.video import build_model

    sft_over = [*_overrides(world, steps=2), f"init_from={tmp_path / 'pre'}", f"instruct_lm={world['instruct']}",
                "factor=4"]
    cfg = load_config(REPO / SFT, sft_over)
    model, _, lm_path, _ = build_model(cfg)
    model.train_only_video()
    assert _trainable(model) == _video_adapter(model)
    ilm, _, _ = load_lm(world["instruct"])
    assert lm_path == (world["instruct"] / "final").resolve()
    assert all(torch.equal(v, model.model.lm.state_dict()[k]) for k, v in ilm.state_dict().items())
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in a.items())  # streams untouched by the swap
    # output positions switched on at SFT over a pretraining without them: zero tables, the same function, trained
    grown, _, _, _ = build_model(load_config(REPO / SFT, [*sft_over, "aggregator.out_positions=true"]))
    grown.train_only_video()
    agg = grown.model.video.aggregator
    assert agg.out_token_embed.requires_grad and not agg.out_token_embed.any() and not agg.out_frame_embed.any()
    with torch.no_grad():
        assert torch.equal(grown.model(vtoks, video=video), model.model(vtoks, video=video))
    rc, sft = _cli("run", SFT, "--out", str(tmp_path / "sft"), *sft_over, "eval_items=6")
    assert rc == 0 and sft["stage"] == "video_sft" and sft["items"] == 6, sft
    s = load_tensors(tmp_path / "sft" / "final" / "model.safetensors")
    assert all(torch.equal(s[k], v) for k, v in img.items())  # image weights still untouched
    sft_model, _, _ = load_model(tmp_path / "sft")
    assert sft_model.video.aggregator.cfg.factor == 4
    with torch.no_grad():
        assert torch.equal(sft_model(toks), ilm(toks))  # no video: the bare instruct LM
    # the CLI on the trained run: eval and chat about a clip
    rc, ev = _cli("eval", "video", "--ckpt", str(tmp_path / "sft"), "--shards", str(world["root"] / "val-*.tar"),
                  "--max-items", "5")
    assert rc == 0 and ev["items"] == 5 and set(ev["by_type"]) == {"direction"}, ev
    assert set(ev["by_format"]) == {"mc", "short"} and ev["temporal"]["items"] == 5
    t = ev["temporal"]  # the temporal gap and the gain over blind carry their paired intervals
    assert t["gap_ci95"][0] <= t["gap"] <= t["gap_ci95"][1]
    assert ev["blind_gain_ci95"][0] <= ev["video_acc"] - ev["blind_acc"] <= ev["blind_gain_ci95"][1]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_mp4(_clip(1), 8))
    rc, chat = _cli("chat", "--ckpt", str(tmp_path / "sft"), "--video", str(clip), "--prompt", "Where?",
                    "--max-new-tokens", "3", "--greedy")
    assert rc == 0 and isinstance(chat["text"], str) and chat["video"] == str(clip)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    rc, err = _cli("chat", "--ckpt", str(tmp_path / "sft"), "--video", str(bad), "--prompt", "Where?")
    assert rc == 2 and str(bad) in err["error"]
    rc, err = _cli("chat", "--ckpt", str(world["image"]), "--video", str(clip))
    assert rc == 2 and "has no video stream" in err["error"]


def test_video_metrics_prompts_and_controls():
    from mm.eval.video import item_score, single_frame, video_items
    from data.qa_format import parse_letter

    meta = {"family": "order", "qa": [make_qa("Which appeared first, the cat or the dog?", ["the dog", "dog"],
                                              ["the cat", "the dog"]),
                                      make_qa("How many?", ["2", "two"])]}
    items = video_items(meta)
    assert [(it["format"], it.get("letter")) for it in items] == [("mc", "B"), ("short", None), ("short", None)]
    assert items[0]["prompt"] == ("Select the correct answer from the following options: Which appeared first, the "
                                  "cat or the dog? (A) the cat (B) the dog. Answer with the correct option letter "
                                  "and nothing else.")
    assert items[1]["prompt"] == ("Answer the question using a single word or phrase. Which appeared first, the "
                                  "cat or the dog?")
    assert [parse_letter(p) for p in ("B", "(B)", " B. the dog", "Because", "b", "")] == ["B", "B", "B", None,
                                                                                          None, None]
    assert item_score(items[0], "B") == 1.0 and item_score(items[0], "A") == 0.0
    assert item_score(items[1], "Dog.") == 1.0 and item_score(items[1], "cat") == 0.0
    assert item_score(items[2], "two") == 1.0
    frames = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2)
    sf = single_frame(frames)
    assert sf.shape == frames.shape and all(torch.equal(f, frames[2]) for f in sf)
