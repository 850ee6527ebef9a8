"""Held-out real photos and the OCR peer: the Qt .rcc reader (data/rcc.py) on bundles written here in Qt's layout,
the photo kit's labels and categories (data/photo_kit.py), and the OCR peer's rule answers and scoring
(mm/eval/ocr_peer.py) with a stand-in reader."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data import photo_kit
from data.rcc import RccError, read_rcc
from mm.eval.image import item_score, vqa_items
from mm.eval.ocr_peer import answer_from_lines, peer_eval


def write_rcc(path, files: dict[str, bytes], compress: tuple[str, ...] = (), version: int = 2) -> None:
    """A Qt resource bundle holding `files` ({"dir/sub/name": bytes}) as Qt's rcc lays it out (compressed members
    zlib-packed with their size first)."""
    tree: dict = {}
    for p, data in files.items():
        node = tree
        *dirs, name = p.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = data
    names, data_blob, nodes = bytearray(), bytearray(), []

    def name_off(name: str) -> int:
        off = len(names)
        names.extend(struct.pack(">HI", len(name), 0) + name.encode("utf-16-be"))
        return off

    def place(name: str, value, prefix: str, index: int) -> None:
        full = f"{prefix}/{name}" if prefix else name
        if isinstance(value, dict):
            first = len(nodes)
            nodes.extend([None] * len(value))
            nodes[index] = struct.pack(">IHII", name_off(name) if name else 0, 2, len(value), first)
            for k, (child, v) in enumerate(value.items()):
                place(child, v, full, first + k)
        else:
            packed = struct.pack(">I", len(value)) + zlib.compress(value) if full in compress else value
            off = len(data_blob)
            data_blob.extend(struct.pack(">I", len(packed)) + packed)
            nodes[index] = struct.pack(">IHHHI", name_off(name), 1 if full in compress else 0, 0, 0, off)

    nodes.append(None)
    place("", tree, "", 0)
    width = 14 if version == 1 else 22
    tree_blob = b"".join(n + b"\0" * (width - len(n)) for n in nodes)
    head = 20
    tree_off, data_off = head, head + len(tree_blob)
    names_off = data_off + len(data_blob)
    path.write_bytes(b"qres" + struct.pack(">IIII", version, tree_off, data_off, names_off) + tree_blob
                     + bytes(data_blob) + bytes(names))


def webp(color, size=(80, 60), noise: bool = True) -> bytes:
    rng = np.random.default_rng(sum(color))
    arr = np.full((size[1], size[0], 3), color, np.uint8)
    if noise:  # photos are large files; the kit skips small icons
        arr = rng.integers(0, 255, arr.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_rcc_reader_returns_every_file_and_refuses_garbage(tmp_path):
    files = {"a/b/one.txt": b"hello", "a/two.bin": bytes(range(200)) * 5, "top.txt": b"x"}
    for version in (1, 2):
        write_rcc(tmp_path / "r.rcc", files, compress=("a/two.bin",), version=version)
        assert read_rcc(tmp_path / "r.rcc") == files
    (tmp_path / "bad.rcc").write_bytes(b"not a bundle at all")
    with pytest.raises(RccError, match="bad.rcc: not a Qt resource bundle"):
        read_rcc(tmp_path / "bad.rcc")
    raw = bytearray((tmp_path / "r.rcc").read_bytes())
    raw[4:8] = struct.pack(">I", 9)
    (tmp_path / "v9.rcc").write_bytes(bytes(raw))
    with pytest.raises(RccError, match="version 9 is not supported"):
        read_rcc(tmp_path / "v9.rcc")


def test_rcc_reader_bounds_what_a_member_inflates_to(tmp_path, monkeypatch):
    """A zlib member that inflates past the cap is refused in one line (a small stored size proves nothing)."""
    import data.rcc

    write_rcc(tmp_path / "z.rcc", {"zeros.bin": bytes(1000)}, compress=("zeros.bin",))
    assert read_rcc(tmp_path / "z.rcc") == {"zeros.bin": bytes(1000)}
    monkeypatch.setattr(data.rcc, "MAX_FILE", 500)
    with pytest.raises(RccError, match="z.rcc: a compressed member inflates past 500 bytes"):
        read_rcc(tmp_path / "z.rcc")


def test_photo_kit_labels_and_files_photos_under_kit_categories(tmp_path, monkeypatch):
    assert photo_kit.label_of("polar_bear") == "polar bear"
    assert photo_kit.label_of("measuringTape3") == "measuring tape" and photo_kit.label_of("fish12") == "fish"
    rcc = tmp_path / photo_kit.RCC
    rcc.mkdir(parents=True)
    pic = webp((200, 10, 10), size=(120, 90))
    write_rcc(rcc / "lang.rcc", {"x/words_sample/cat.webp": pic, "x/words_sample/arm.webp": pic,
                                 "x/words_sample/apple.webp": pic, "x/words_sample/dog.webp": webp((1, 2, 3), noise=False)})
    write_rcc(rcc / "explore_world_animals.rcc", {"y/animals/polar_bear.webp": pic})
    write_rcc(rcc / "explore_farm_animals.rcc", {})
    write_rcc(rcc / "categorization.rcc", {"images/tools/hammer2.webp": pic, "images/others/igloo.webp": pic,
                                           "images/others/erasers.webp": pic})
    write_rcc(rcc / "explore_monuments.rcc", {"france/eiffelTower.webp": pic})
    got = {(p["label"], p["category"]) for p in photo_kit.photos(tmp_path)}
    # arm: not a kit category; dog: an icon-sized file; erasers: not in the table
    assert got == {("cat", "animals"), ("apple", "food"), ("polar bear", "animals"), ("hammer", "household"),
                   ("igloo", "town"), ("eiffel tower", "town")}
    monkeypatch.setattr(photo_kit, "fetch_one", lambda key, cache, progress=True: tmp_path)
    m = photo_kit.build_photo_kit(tmp_path / "cache", tmp_path / "out")
    assert m["samples"] == 6 and m["by_category"] == {"animals": 2, "food": 1, "household": 1, "town": 2}
    from data.loader import load_image_samples

    samples, skips = load_image_samples(str(tmp_path / "out" / "photos" / "val-*.tar"), 64)
    assert len(samples) == 6 and not skips
    qa = {s["meta"]["label"]: s["meta"]["qa"] for s in samples}
    assert qa["hammer"][0] == {"question": "What is shown in the image?", "answers": ["hammer"]}
    assert qa["hammer"][1]["answers"] == ["household"] and "household" in qa["hammer"][1]["choices"]
    assert all(s["meta"]["source"] == "photos/gcompris" for s in samples)


def test_ocr_peer_answers_the_kit_questions_from_its_lines():
    lines = ["The organic", "concentration in"]
    assert answer_from_lines("What word is written in the image?", lines) == "The"
    assert answer_from_lines("What is the first word of the text?", lines) == "The"
    assert answer_from_lines("What is the last word on the first line?", lines) == "organic"
    assert answer_from_lines('Is the word "organic" written in the image? Options: yes, no.', lines) == "yes"
    assert answer_from_lines('Is the word "bird" written in the image? Options: yes, no.', lines) == "no"
    assert answer_from_lines("How many lines of text are there? Options: 2, 3, 4, 5, 6.", lines) == "2"
    assert answer_from_lines("How many letters does the word have?", ["house"]) == "5"
    assert answer_from_lines("What word is written in the image?", []) == ""
    samples = [{"image": np.zeros((3, 8, 8), np.uint8), "meta": {"family": "ocr", "qa": [
        {"question": "What word is written in the image?", "answers": ["house"]},
        {"question": "How many letters does the word have?", "answers": ["5"]}]}},
        {"image": np.ones((3, 8, 8), np.uint8), "meta": {"family": "ocr", "qa": [
            {"question": "What word is written in the image?", "answers": ["tree"]}]}}]
    reads = []

    def fake(image):
        reads.append(int(image.max()))
        return ["house"] if image.max() == 0 else ["free"]

    res = peer_eval(samples, vqa_items(samples), fake, item_score)
    assert res["per_item"] == [1.0, 1.0, 0.0] and res["acc"] == pytest.approx(2 / 3) and res["items"] == 3
    assert reads == [0, 1]  # each image read once for all its questions
