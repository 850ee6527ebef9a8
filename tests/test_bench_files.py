"""Benchmark files (data/bench_files.py; `mm eval image --tsv / --jsonl`, benchmarks/image.py): VLMEvalKit TSV and
lmms-eval JSONL rows become the image samples the shard reader gives (one scoring path, mm/eval/image.py), lettered
multiple choice in the data/qa_format.py prompt, bad rows skipped and counted, a file of the wrong shape is one
error line naming the file."""
from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from data.bench_files import load_bench_samples, read_jsonl_rows, read_tsv_rows
from data.image_kit import encode_image
from tests.test_image_cli import _cli
from tests.test_image_stage import _image, _run, make_world

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 1-step image_pretrain run over tests/test_image_stage.py's world with a 256-position LM (the lettered
    prompt is ~170 tokens with the tiny byte-level tokenizer)."""
    import os

    root = tmp_path_factory.mktemp("bench_files")
    world = make_world(root, max_seq_len=256)
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        _run(world, root / "run", "steps=1")
    finally:
        os.chdir(cwd)
    return root / "run"


def _b64(i: int, fmt: str = "png") -> str:
    return base64.b64encode(encode_image(_image(i), fmt)).decode()


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def mc_tsv(tmp_path) -> Path:
    """6 MMBench-style rows: 4 good (2 'color', 2 'shape'; row 3 reuses row 0's image by index), one bad base64,
    one undecodable image, one answer that is no option letter."""
    rows = [["0", _b64(0), "What color?", "red", "blue", "green", "", "A", "color"],
            ["1", _b64(1, "jpg"), "Which animal?", "dog", "cat", "", "", "B", "shape"],
            ["2", _b64(2), "Which shape?", "round", "square", "tall", "flat", "D", "shape"],
            ["3", "0", "What color again?", "red", "blue", "", "", "A", "color"],
            ["4", "not base64 at all!", "Broken?", "yes", "no", "", "", "A", "color"],
            ["5", base64.b64encode(b"\x89PNG junk").decode(), "Junk?", "yes", "no", "", "", "B", "color"],
            ["6", _b64(3), "Bad answer?", "yes", "no", "", "", "E", "color"]]
    return _tsv(tmp_path / "mmb.tsv", ["index", "image", "question", "A", "B", "C", "D", "answer", "category"], rows)


def test_tsv_reader_items_and_skips(mc_tsv, tmp_path):
    rows, skips = read_tsv_rows(mc_tsv)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4", "5"] and skips.as_dict() == {"bad_answer": 1}
    qa = [r["qa"] for r in rows]
    assert qa[1] == {"question": "Which animal?", "choices": ["dog", "cat"], "answers": ["cat"], "letter": "B"}
    assert qa[2]["choices"] == ["round", "square", "tall", "flat"] and qa[2]["letter"] == "D"
    assert [r["category"] for r in rows[:4]] == ["color", "shape", "shape", "color"]
    samples, skips = load_bench_samples(mc_tsv, "tsv", 16)
    assert skips == {"bad_answer": 1, "bad_base64": 1, "bad_image": 1} and len(samples) == 4
    assert all(s["image"].shape == (3, 16, 16) and s["image"].dtype.name == "uint8" for s in samples)
    assert (samples[3]["image"] == samples[0]["image"]).all()  # row 3's image is row 0's (by index)
    assert samples[0]["meta"]["family"] == "color" and samples[0]["meta"]["qa"][0]["letter"] == "A"
    # without option columns or category: short answers (a list literal = several references), family "other"
    plain = _tsv(tmp_path / "vqa.tsv", ["index", "image", "question", "answer"],
                 [["0", _b64(0), "What is it?", "bag"], ["1", _b64(1), "Count?", "['2', 'two']"], ["2", _b64(2)]])
    rows, skips = read_tsv_rows(plain)
    assert [r["qa"] for r in rows] == [{"question": "What is it?", "answers": ["bag"]},
                                       {"question": "Count?", "answers": ["2", "two"]}]
    assert skips.as_dict() == {"bad_row": 1} and {r["category"] for r in rows} == {"other"}
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # a UTF-8 byte-order mark does not hide 'index'
    assert [r["qa"] for r in read_tsv_rows(bom)[0]] == [r["qa"] for r in rows]
    samples, _ = load_bench_samples(plain, "tsv", 16, max_samples=1, seed=3)
    assert len(samples) == 1


def test_jsonl_reader_paths_and_base64(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode_image(_image(0), "png"))
    recs = [{"image": "img/a.png", "question": "What is shown?", "answers": ["bag", "a bag"], "category": "rec"},
            {"image": _b64(1), "question": "Pick one.", "choices": ["cat", "dog", "cow"], "answer": "dog"},
            {"image": "data:image/png;base64," + _b64(2), "question": "Letter?", "choices": ["x", "y"], "answer": "A"},
            {"image": "img/missing.png", "question": "Gone?", "answer": "no"},
            {"image": _b64(3), "answers": ["no question"]}]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    rows, skips = read_jsonl_rows(path)
    assert skips.as_dict() == {"bad_json": 1, "missing_field": 1} and len(rows) == 4
    assert rows[0]["qa"] == {"question": "What is shown?", "answers": ["bag", "a bag"]}
    assert rows[1]["qa"]["letter"] == "B" and rows[2]["qa"] == {"question": "Letter?", "choices": ["x", "y"],
                                                                 "answers": ["x"], "letter": "A"}
    assert [r["category"] for r in rows] == ["rec", "other", "other", "other"]
    samples, skips = load_bench_samples(path, "jsonl", 16)
    assert len(samples) == 3 and skips == {"bad_json": 1, "missing_field": 1, "missing_image": 1}
    assert (samples[0]["image"] == _image(0).transpose(2, 0, 1)).all()  # the relative path, decoded losslessly


def test_wrong_shape_is_one_error_naming_the_file(tmp_path, image_run):
    bad = _tsv(tmp_path / "bad.tsv", ["index", "image", "prompt", "answer"], [["0", _b64(0), "q", "a"]])
    with pytest.raises(ValueError, match=r"bad\.tsv: not a VLMEvalKit-style TSV: no 'question' column"):
        read_tsv_rows(bad)
    js = tmp_path / "bad.jsonl"
    js.write_text(json.dumps({"image": "a.png", "answers": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: not an lmms-eval-style JSONL: no 'question' field on line 1"):
        read_jsonl_rows(js)
    txt = tmp_path / "notes.jsonl"
    txt.write_text("index\timage\n")
    with pytest.raises(ValueError, match=r"notes\.jsonl: line 1 is not a JSON object"):
        read_jsonl_rows(txt)
    rc, res, err = _cli(["eval", "image", "--ckpt", str(image_run), "--tsv", str(bad)])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0] and "'question'" in lines[0], err
    rc, res, _ = _cli(["eval", "image", "--ckpt", str(image_run), "--tsv", str(bad), "--jsonl", str(js)])
    assert rc == 2 and "exactly one of" in res["error"]


def test_letter_scoring():
    from mm.eval.image import item_score, vqa_items

    s = {"meta": {"family": "pets", "qa": [{"question": "Which?", "choices": ["dog", "cat"], "answers": ["cat"],
                                            "letter": "B"}, {"question": "What?", "answers": ["cat"]}]}}
    mc, short = vqa_items([s])
    assert mc["question"] == ("Select the correct answer from the following options: Which? (A) dog (B) cat. "
                              "Answer with the correct option letter and nothing else.") and mc["letter"] == "B"
    assert [item_score(mc, p) for p in ("B) cat", "(B)", "A", "cat", "")] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert item_score(short, "Cat.") == 1.0 and item_score(short, "B") == 0.0 and "letter" not in short


def test_eval_image_tsv_end_to_end(mc_tsv, image_run, tmp_path):
    rc, res, err = _cli(["eval", "image", "--ckpt", str(image_run), "--tsv", str(mc_tsv), "--max-items", "0",
                         "--max-new-tokens", "2"])
    assert rc == 0, (res, err)
    assert res["tsv"] == str(mc_tsv) and res["image_samples"] == 4 and res["items"] == 4 and res["mc_items"] == 4
    assert res["skipped"] == {"bad_answer": 1, "bad_base64": 1, "bad_image": 1} and res["skipped_total"] == 3
    assert res["items_by_family"] == {"color": 2, "shape": 2}
    for key in ("vqa_acc", "blind_vqa_acc", "shuffled_vqa_acc"):
        assert set(res[f"{key}_by_family"]) == {"color", "shape"}, key
        assert 0.0 <= res[key] <= 1.0 and all(0.0 <= v <= 1.0 for v in res[f"{key}_by_family"].values())
    assert res["examples"][0]["q"].startswith("Select the correct answer from the following options:")
    # a JSONL file, and the benchmark script on the same TSV (one implementation: the same numbers)
    (tmp_path / "a.png").write_bytes(encode_image(_image(5), "png"))
    js = tmp_path / "b.jsonl"
    js.write_text("\n".join(json.dumps(r) for r in [{"image": "a.png", "question": "What is shown?",
                                                      "answers": ["bag"], "category": "rec"},
                                                     {"image": _b64(6), "question": "Is it a bag?",
                                                      "choices": ["yes", "no"], "answer": "no"}]))
    rc, rj, err = _cli(["eval", "image", "--ckpt", str(image_run), "--jsonl", str(js), "--max-new-tokens", "2"])
    assert rc == 0 and rj["items_by_family"] == {"other": 1, "rec": 1} and rj["mc_items"] == 1, (rj, err)
    assert rj["skipped_total"] == 0 and 0.0 <= rj["shuffled_vqa_acc"] <= 1.0
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_image", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    b = mod.evaluate(mod.argparse.Namespace(ckpt=str(image_run), shards="", tsv=str(mc_tsv), jsonl=None,
                                            max_items=0, max_new_tokens=2, no_blind=False, text_shards="",
                                            text_docs=0, seq_len=64, decode_scale=1, threads=1, seed=0,
                                            examples_dir=None, families="shape"))
    assert b["items_by_family"] == {"shape": 2} and b["vqa_acc"] == res["vqa_acc_by_family"]["shape"]
    import torch

    torch.set_num_threads(1)  # evaluate() set it; keep the shared CPU at one thread
