"""`mm chat --image` and `mm eval image` on a tiny image run (DESIGN.md "CLI"; invariant 8 for the image file): the
image is decoded by our decoder, encoded once, answered through mm.model.generate; bad files are one error line naming
the file (exit 2); `mm eval image` uses mm/eval/image.py (the functions benchmarks/image.py uses) and counts skips."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data.dialog import dialog
from data.image_kit import encode_image
from llm.generate import generate as generate_lm
from llm.tokenizer import ChatFormat
from mm.eval.image import eval_image_shards, image_features
from mm.model.generate import generate
from mm.model.media import decode_size, read_image_file
from mm.model.runs import load_lm
from mm.model.store import load_model
from tests.test_image_stage import _image, _run, world  # noqa: F401  (fixtures reused)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(argv: list[str]) -> tuple[int, dict, str]:
    from mm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.fixture(scope="module")
def image_run(world, tmp_path_factory) -> Path:  # noqa: F811
    """A 1-step image_pretrain run over the shared tiny world (through `mm run`)."""
    import os

    out = tmp_path_factory.mktemp("image_cli") / "run"
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        _run(world, out, "steps=1")
    finally:
        os.chdir(cwd)
    return out


def test_chat_image_encodes_once_and_replies(image_run, tmp_path, monkeypatch):
    from encoders.vision import VisionEncoder

    png = tmp_path / "pic.png"
    png.write_bytes(encode_image(_image(3), "png"))
    calls = []
    orig = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    rc, res, err = _cli(["chat", "--ckpt", str(image_run), "--image", str(png), "--max-new-tokens", "6", "--greedy"])
    assert rc == 0 and res["ok"] and isinstance(res["text"], str) and res["image"] == str(png), (res, err)
    assert len(calls) == 1  # encoded once; the media K/V are cached across decoding steps
    rc, res2, _ = _cli(["chat", "--ckpt", str(image_run), "--image", str(png), "--prompt", "What is shown?",
                        "--max-new-tokens", "4", "--greedy"])
    assert rc == 0 and "text" in res2 and len(calls) == 2


def test_chat_image_matches_generate(image_run, tmp_path):
    """The CLI reply is generate on `<|image|>` + prompt with the encoded image (greedy)."""
    png = tmp_path / "pic.png"
    png.write_bytes(encode_image(_image(4), "png"))
    model, tok, _ = load_model(image_run)
    fmt = ChatFormat(tok)
    ids, _ = dialog(fmt, "What is shown?", media=model.image.placeholder_ids())
    assert ids == [tok.bos_id, *fmt.encode_header("user"), tok.special_id("<|image|>"), *tok.encode("What is shown?"),
                   tok.eot_id, *fmt.encode_header("assistant")]  # the training dialog format, as a generation prompt
    media = image_features(model, read_image_file(png, size=decode_size(model.image.encoder.cfg)))
    out = generate(model, ids, 5, image=media, stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    rc, res, _ = _cli(["chat", "--ckpt", str(image_run), "--image", str(png), "--prompt", "What is shown?",
                       "--max-new-tokens", "5", "--greedy"])
    assert rc == 0 and res["text"] == fmt.decode_reply(out).strip()


def test_chat_image_bad_files_exit_2(image_run, tmp_path):
    good = encode_image(_image(1), "png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    for bad in (truncated, text, tmp_path / "missing.png"):
        rc, res, err = _cli(["chat", "--ckpt", str(image_run), "--image", str(bad), "--max-new-tokens", "2"])
        lines = err.strip().splitlines()
        assert rc == 2 and res["ok"] is False and str(bad) in res["error"], res
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], err


def test_chat_text_only_on_image_run_equals_lm(image_run, world):  # noqa: F811
    lm, tok, _ = load_lm(world["lm"])
    ids, _ = ChatFormat(tok).encode_dialog([{"role": "user", "content": "is it a bag?"}])
    ref = ChatFormat(tok).decode_reply(generate_lm(lm, ids, 5, greedy=True, stop_ids=(tok.eot_id, tok.eom_id,
                                                                                       tok.eos_id))).strip()
    rc, res, _ = _cli(["chat", "--ckpt", str(image_run), "--prompt", "is it a bag?", "--max-new-tokens", "5",
                       "--greedy"])
    assert rc == 0 and res["text"] == ref


def test_eval_image_scores_and_counts_skips(image_run, world, tmp_path):  # noqa: F811
    shard = tmp_path / "mine-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            meta = {"source": "mine", "family": "counting" if i < 3 else "ocr",
                    "qa": [{"question": "How many?", "answers": ["2"]}], **({"label": "two"} if i != 3 else {})}
            png = encode_image(_image(i), "png")
            w.write({"__key__": f"s{i}", "png": png if i != 1 else png[:40], "txt": "a thing.",
                     "json": json.dumps(meta)})
    rc, res, err = _cli(["eval", "image", "--ckpt", str(image_run), "--shards", str(shard), "--max-items", "0",
                         "--max-new-tokens", "2"])
    assert rc == 0, (res, err)
    assert {"vqa_acc", "blind_vqa_acc", "vqa_acc_by_family"} <= res.keys() and res["items"] == 3
    assert res["skipped"] == {"bad_image": 1} and res["skipped_total"] == 1 and res["image_samples"] == 3
    assert set(res["vqa_acc_by_family"]) == {"counting", "ocr"} and set(res["vqa_acc_by_source"]) == {"mine"}
    # reading: with the image vs another sample's image, the gain with its paired interval, per family and source
    r = res["reading"]
    assert r["items"] == 3 and r["acc"] == res["vqa_acc"] and r["shuffled"] == res["shuffled_vqa_acc"]
    assert r["gain"] == pytest.approx(r["acc"] - r["shuffled"]) and r["gain_ci95"][0] <= r["gain"] <= r["gain_ci95"][1]
    assert r["blind_gain_ci95"][0] <= r["acc"] - r["blind"] <= r["blind_gain_ci95"][1]
    assert res["reading_by_family"]["counting"]["items"] == 2 and res["reading_by_source"]["mine"]["items"] == 3
    # the naming questions (open, answered by the item's label: "two" == "2" once normalised) of samples 0 and 2
    nm = res["naming_by_source"]
    assert nm["all"]["items"] == 2 and nm["mine"]["items"] == 2 and 0.0 <= nm["mine"]["acc"] <= 1.0
    # the same numbers as the benchmark script's evaluate (one implementation)
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_image", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    b = mod.evaluate(mod.argparse.Namespace(ckpt=str(image_run), shards=str(shard), max_items=0, max_new_tokens=2,
                                            no_blind=False, text_shards="", text_docs=0, seq_len=64,
                                            decode_scale=1, threads=1, seed=0, examples_dir=str(tmp_path / "ex"),
                                            families="", peer=None, against=None))
    assert {k: b[k] for k in ("vqa_acc", "blind_vqa_acc", "skipped", "items")} == \
        {k: res[k] for k in ("vqa_acc", "blind_vqa_acc", "skipped", "items")}
    # --against: a second run scored on the same items, paired (here the run itself: no difference on any item)
    a = mod.evaluate(mod.argparse.Namespace(ckpt=str(image_run), shards=str(shard), max_items=0, max_new_tokens=2,
                                            no_blind=True, text_shards="", text_docs=0, seq_len=64, decode_scale=1,
                                            threads=1, seed=0, examples_dir=None, families="", peer=None,
                                            against=str(image_run), against_decode_scale=1))
    assert a["against"]["items"] == 3 and a["against"]["acc"] == a["against"]["ours"] == a["vqa_acc"]
    assert a["against"]["delta"] == 0.0 and a["against"]["ci95"] == [0.0, 0.0] and "per_item" not in a
    # and per source on the naming questions alone (the shard's two naming items)
    assert a["against"]["naming_by_source"] == {"mine": {"items": 2, "acc": b["naming_by_source"]["mine"]["acc"],
                                                        "ours": b["naming_by_source"]["mine"]["acc"], "delta": 0.0,
                                                        "ci95": [0.0, 0.0]}}
    # --families keeps one task family's samples (all of them: the cap does not cut them before the filter)
    model, tok, _ = load_model(image_run)
    one = eval_image_shards(model, tok, str(shard), max_items=2, max_new_tokens=2, blind=False, families=("ocr",))
    assert one["items"] == 1 and set(one["vqa_acc_by_family"]) == {"ocr"}
    with pytest.raises(ValueError, match="unknown image families"):
        eval_image_shards(model, tok, str(shard), max_items=2, families=("ocrr",))
    # the examples' images are saved for the report: one RGB PNG per example, at the decode size
    from PIL import Image
    size = Image.open(b["examples"][0]["image"]).size
    assert size[0] == size[1] > 0 and all(Image.open(e["image"]).mode == "RGB" for e in b["examples"])
    torch.set_num_threads(1)  # evaluate() set it; keep the shared CPU at one thread


def test_image_probe_reads_the_label_where_the_pixels_hold_it(image_run, world):  # noqa: F811
    """benchmarks/image_probe.py on the tiny world, whose two labels differ in colour: a linear probe reads the label
    from the ViT tokens on held-out images; every place and the model's own answers are reported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_image_probe", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "image_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = world["root"]
    res = mod.evaluate(mod.argparse.Namespace(ckpt=str(image_run), train_shards=f"{r}/train-*.tar",
                                              shards=f"{r}/val-*.tar", sources="toy", train=24, val=6,
                                              weight_decay=1e-3, threads=1))
    toy = res["toy"]
    assert toy["classes"] == 2 and toy["train"] == 24 and toy["val"] == 6 and toy["chance"] == 0.5
    assert set(mod.PLACES) <= toy.keys() and set(toy["answers"]) == {"image", "shuffled"}
    assert toy["vit_mean"]["val_acc"] == 1.0 and toy["vit_flat"]["val_acc"] == 1.0
    assert all(0.0 <= toy[p]["val_acc"] <= 1.0 for p in mod.PLACES)
    assert 0.0 <= toy["label_head"] <= 1.0 and -1.0 <= toy["label_rows_cos"] <= 1.0
    # label_head: the frozen output rows of each class's first label token, applied to the state
    head = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.1, 0, 0]]))
    stub = mod.argparse.Namespace(output=head)
    tok = mod.argparse.Namespace(encode=lambda c: {"a": [0], "b": [1], "c": [2], "d": [0]}[c])
    state, y = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]]), torch.tensor([0, 1])
    sep = mod.label_head(stub, tok, ["a", "b"], state, y)
    assert sep == {"label_head": 1.0, "label_rows_cos": 0.0}
    same = mod.label_head(stub, tok, ["a", "d"], state, y)  # one first token for both classes: one row, cos 1
    assert same == {"label_head": 0.5, "label_rows_cos": 1.0}
    near = mod.label_head(stub, tok, ["a", "c"], state, torch.tensor([0, 1]))
    assert near["label_rows_cos"] > 0.99 and near["label_head"] == 1.0  # close rows, a state along their difference
    with pytest.raises(ValueError, match="mnist: too few recognition samples"):
        mod.evaluate(mod.argparse.Namespace(ckpt=str(image_run), train_shards=f"{r}/train-*.tar",
                                            shards=f"{r}/val-*.tar", sources="mnist", train=24, val=6,
                                            weight_decay=1e-3, threads=1))
    torch.set_num_threads(1)
