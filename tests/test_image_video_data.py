"""Image/video data: decoders, hostile shards through inspect_shards (invariant 8), curation, resumable loaders,
held-out splits by source image, and temporal questions that one middle frame cannot answer."""
from __future__ import annotations

import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.curation import balance_entries, caption_reason, dedup_near, dhash, filter_captions
from data.decode import decode_image, decode_video, uniform_indices
from data.image_sources import FASHION_LABELS, fit_square, on_white, parse_stamp_txt, split_of, stamp_label
from data.image_synth import gray_sprite
from data.shards import BadSample
from tests.shard_helpers import write_tar

av = pytest.importorskip("av")


# ---- helpers ------------------------------------------------------------------------------------------------

def _img_bytes(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _pattern(seed: int, size: int = 64) -> np.ndarray:
    """A blocky random RGB image (8x8 cells upsampled) whose hash is robust to small changes."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(cells).resize((size, size), Image.Resampling.NEAREST))




def _moving_clip(frames=16, size=32) -> np.ndarray:
    out = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        out[t, 8:20, t:t + 10] = (255, 255, 255)
    return out


class _Creates:
    """Unpickling this creates the file at `path` (stands in for any code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _fake_pools(n: int = 60, size: int = 32) -> dict:
    """Pools shaped like image_kit.load_pools' output, from synthetic arrays (no cache needed)."""
    names = ["frog", "cat", "dog", "tree", "car", "boat", "star", "house"]
    pools: dict = {"tuxpaint": [], "fashion_mnist": [], "mnist": []}
    for i in range(n):
        g = np.zeros((28, 28), np.uint8)
        g[3 + i % 9:22, 5 + i % 7:23] = 120 + i % 100
        grey_rgb = np.asarray(Image.fromarray(255 - g).convert("RGB").resize((size, size)))
        pools["mnist"].append({"source": "mnist", "source_id": f"mnist5k:{i}", "label": str(i % 10), "gray": g,
                               "caption": f"A handwritten digit {i % 10}.", "image": grey_rgb,
                               "sprite": gray_sprite(g)})
        pools["fashion_mnist"].append({"source": "fashion_mnist", "source_id": f"fashion_mnist:train/{i}",
                                       "label": FASHION_LABELS[i % 10], "gray": g, "image": grey_rgb,
                                       "caption": f"A photo of a {FASHION_LABELS[i % 10]}."})
        sprite = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        ImageDraw.Draw(sprite).ellipse((2, 2, 38, 28), fill=(30 * (i % 8), 200, 90, 255))
        pools["tuxpaint"].append({"source": "tuxpaint", "source_id": f"tuxpaint:stamps/x/{i}.png",
                                  "caption": f"A {names[i % 8]}.", "label": names[i % 8],
                                  "category": ["animals", "town"][i % 2], "sprite": sprite,
                                  "image": np.asarray(fit_square(on_white(sprite), size))})
    return pools


def _fake_doc(i: int) -> dict:
    """A Brown-like document: sentences of varied length over a Zipf-ish vocabulary (distinct word counts)."""
    rng = random.Random(i)
    vocab = ["people", "city", "river", "market", "school", "farmer", "bridge", "voter", "letter", "garden",
             "window", "number", "morning", "country", "story"]
    sents = []
    for _ in range(30):
        words = rng.choices(vocab, weights=[1.0 / (k + 1) for k in range(len(vocab))], k=rng.randint(4, 18))
        sents.append(" ".join(words).capitalize() + ".")
    return {"key": f"brown_c{i:02d}", "genre": "news", "text": " ".join(sents)}


_DOCS = [_fake_doc(i) for i in range(12)]


# ---- decoders -----------------------------------------------------------------------------------------------

def test_decode_image_png_jpeg_and_alpha_on_white():
    arr = _pattern(0)
    assert np.array_equal(decode_image(_img_bytes(arr)), arr)
    jpg = decode_image(_img_bytes(arr, "JPEG"))
    assert jpg.shape == (64, 64, 3) and jpg.dtype == np.uint8 and np.abs(jpg.astype(int) - arr).mean() < 20
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    out = decode_image(_img_bytes(rgba))
    assert (out[:4] == (255, 0, 0)).all() and (out[4:] == 255).all()
    assert decode_image(_img_bytes(arr), size=16).shape == (16, 16, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_image_truncated_is_bad_image(fmt):
    data = _img_bytes(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8), fmt)
    for broken in (data[: len(data) // 2], data[:20], b"", b"not an image at all"):
        with pytest.raises(BadSample) as e:
            decode_image(broken)
        assert e.value.reason == "bad_image"


def test_decode_image_oversize_checked_before_decoding():
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header_only = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                   + chunk(b"IEND", b""))  # claims 10^10 pixels, holds none
    with pytest.raises(BadSample) as e:
        decode_image(header_only)
    assert e.value.reason == "image_too_large"
    with pytest.raises(BadSample) as e:
        decode_image(_img_bytes(_pattern(2)), max_pixels=32 * 32)
    assert e.value.reason == "image_too_large"


def test_uniform_indices_are_segment_middles():
    assert uniform_indices(16, 1) == [8]
    assert uniform_indices(16, 4) == [2, 6, 10, 14]
    assert uniform_indices(64, 16) == [2 + 4 * i for i in range(16)]
    idx = uniform_indices(100, 7)
    assert idx == sorted(idx) and idx[0] < 100 / 7 and idx[-1] >= 100 - 100 / 7
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than samples: repeats, still in order
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_decode_video_roundtrip_and_broken_mp4(backend):
    if backend == "decord":
        pytest.importorskip("decord")
    from data.video_kit import encode_mp4

    clip = _moving_clip()
    data = encode_mp4(clip, fps=8)
    out = decode_video(data, num_frames=4, backend=backend)
    assert out["frames"].shape == (4, 32, 32, 3) and out["frames"].dtype == np.uint8
    assert out["indices"] == [2, 6, 10, 14] and out["total_frames"] == 16 and out["fps"] == pytest.approx(8)
    assert np.abs(out["frames"].astype(int) - clip[[2, 6, 10, 14]]).mean() < 8
    for broken in (data[: len(data) // 2], b"\x00" * 64, b""):
        with pytest.raises(BadSample) as e:
            decode_video(broken, num_frames=2, backend=backend)
        assert e.value.reason == "bad_video"


# ---- inspect: hostile shards ----------------------------------------------------------------------------------

def test_inspect_counts_every_bad_sample_and_never_unpickles(tmp_path):
    import pickle

    from data.inspect import inspect_shards
    from data.video_kit import encode_mp4

    marker = tmp_path / "PWNED"
    png, mp4 = _img_bytes(_pattern(3)), encode_mp4(_moving_clip(), 8)
    jpg = _img_bytes(_pattern(4), "JPEG")
    meta = json.dumps({"source": "t", "qa": []}).encode()
    shard = write_tar(tmp_path / "s-000000.tar", [
        ("good.png", png), ("good.txt", b"a pattern"), ("good.json", meta),
        ("evil.pkl", pickle.dumps(_Creates(marker))), ("evil.txt", b"a caption"),
        ("trunc.jpg", jpg[: len(jpg) // 2]), ("trunc.txt", b"cut short"),
        ("brokenvid.mp4", mp4[: len(mp4) // 3]), ("brokenvid.txt", b"a clip"),
        ("nocap.png", png), ("nocap.json", meta),
        ("vid.mp4", mp4), ("vid.txt", b"a bar moves right"), ("vid.json", json.dumps({"fps": 8}).encode()),
    ])
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"this is not a tar file" * 40)
    sheet = tmp_path / "sheet.png"
    r = inspect_shards([shard, not_tar], sheet)
    assert not marker.exists()
    assert r["skipped"] == {"bad_image": 1, "bad_tar": 1, "bad_video": 1, "missing_caption": 1, "pickle_member": 1}
    assert r["samples"] == 6 and r["decoded"] == 3  # good image, vid, and evil's caption as a text sample
    assert r["modalities"] == {"image": 1, "video": 1, "text": 1}
    assert r["extensions"]["png"] == 2 and "pkl" not in r["extensions"]
    assert r["contact_sheet"] == str(sheet) and Image.open(sheet).size[0] > 0
    assert {e["key"] for e in r["examples"]} == {"good", "evil", "vid"}


# ---- curation -----------------------------------------------------------------------------------------------

def test_near_duplicates_collapse_to_one_per_component():
    recs = []
    for base in range(4):
        arr = _pattern(10 + base)
        variants = [arr, np.clip(arr.astype(int) + 6, 0, 255).astype(np.uint8),
                    decode_image(_img_bytes(arr, "JPEG")), np.asarray(Image.fromarray(arr).resize((60, 60)))]
        for k, v in enumerate(variants):
            recs.append({"image": v, "caption": f"image {base} variant {k}" + "!" * k})
    kept, removed = dedup_near(recs, max_hamming=8)
    assert len(kept) == 4 and removed["near_duplicate"] == 12
    assert sorted(r["caption"][:7] for r in kept) == ["image 0", "image 1", "image 2", "image 3"]
    assert all(r["caption"].endswith("!!!") for r in kept)  # the longest caption is kept
    assert bin(dhash(recs[0]["image"]) ^ dhash(recs[4]["image"])).count("1") > 40


def test_entry_balancing_caps_frequent_entries_keeps_the_tail():
    recs = [{"caption": "a photo of a dog", "i": i} for i in range(1000)]
    recs += [{"caption": "a photo of a cat", "i": 1000 + i} for i in range(10)]
    kept, removed = balance_entries(recs, threshold=50, ngrams=(1,), seed=0)
    dogs = sum(r["caption"].endswith("dog") for r in kept)
    assert sum(r["caption"].endswith("cat") for r in kept) == 10
    assert 60 <= dogs <= 140 and removed["balanced_out"] == 1000 - dogs  # expected ~97 (1-(1-50/1010)(1-50/1000))
    kept_sqrt, _ = balance_entries(recs, threshold=50, power=0.5, ngrams=(1,), seed=0)
    assert len(kept_sqrt) > len(kept)  # the paper's sqrt(T/f) keeps more of the head
    assert balance_entries(recs, threshold=50, ngrams=(1,), seed=0)[0] == kept  # deterministic


def test_caption_filters():
    assert caption_reason("") == "caption_empty"
    assert caption_reason("word " * 100) == "caption_too_long"
    assert caption_reason("1234 5678 !!!") == "caption_low_alpha"
    assert caption_reason("A frog.") is None
    img = _pattern(5)
    kept, removed = filter_captions([{"image": img, "caption": "A frog."}, {"image": img, "caption": "a  FROG."},
                                     {"image": _pattern(6), "caption": "A frog."}, {"image": img, "caption": "%%"}])
    assert len(kept) == 2 and removed == {"exact_duplicate": 1, "caption_low_alpha": 1}


def test_parse_stamp_txt_and_label():
    cap, tr = parse_stamp_txt("A frog.\nde.utf8=Ein Frosch.\nca@valencia.utf8=Una granota.\nen_GB.utf8=A frog.\n"
                              "xx.utf8=\nnot a translation line\n")
    assert cap == "A frog." and tr == {"de": "Ein Frosch.", "ca@valencia": "Una granota.", "en_GB": "A frog."}
    assert stamp_label("A calculator.  6x7=42") == "calculator"
    assert stamp_label("An albino peahen (a female peafowl).") == "albino peahen"


# ---- loaders ------------------------------------------------------------------------------------------------

def _image_shards(tmp_path, n_shards=3, per=20, bad=True):
    from webdataset import TarWriter

    paths = []
    for s in range(n_shards):
        paths.append(tmp_path / f"img-{s:06d}.tar")
        with TarWriter(str(paths[-1])) as w:
            for i in range(per):
                data = _img_bytes(_pattern(100 * s + i, 16))
                if bad and s == 1 and i == 3:
                    data = data[:30]
                w.write({"__key__": f"s{s}_{i:03d}", "png": data, "txt": f"pattern {s} {i}".encode(),
                         "json": json.dumps({"source": "t"}).encode()})
    return str(tmp_path / "img-{000000..000002}.tar")


def _keys(batches):
    return [b["key"] for b in batches]


def test_loader_resume_gives_identical_batches(tmp_path):
    from data.loader import Loader

    spec = _image_shards(tmp_path)
    a = Loader(spec, "image", batch_size=4, seed=7, image_size=16)
    first = list(a.batches(5))
    state = a.state_dict()
    assert state["next_batch"] == 5
    cont = list(a.batches(4))
    for workers in (0, 2):  # the stream does not depend on the worker count
        b = Loader(spec, "image", batch_size=4, seed=7, num_workers=workers, image_size=16)
        b.load_state_dict(json.loads(json.dumps(state)))
        again = list(b.batches(4))
        assert _keys(again) == _keys(cont)
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(again, cont))
    assert first[0]["image"].shape[1:] == (3, 16, 16) and first[0]["image"].dtype == torch.uint8
    other = Loader(spec, "image", batch_size=4, seed=8, image_size=16)
    assert _keys(other.batches(3)) != _keys(first[:3])  # the seed matters
    with pytest.raises(ValueError):
        Loader(spec, "image", batch_size=8, seed=7).load_state_dict(state)


def test_loader_node_split_and_skip_counts(tmp_path):
    from data.loader import Loader

    spec = _image_shards(tmp_path)
    seen = {}
    for rank in (0, 1):
        ld = Loader(spec, "image", batch_size=6, seed=1, rank=rank, world=2, resampled=False, shards_per_chunk=1,
                    image_size=16)
        seen[rank] = [k for b in ld.batches(5) for k in b["key"]]
    shard_of = lambda k: k.split("_")[0]  # noqa: E731
    assert {shard_of(k) for k in seen[0][:20]}.isdisjoint({shard_of(k) for k in seen[1][:20]})  # epoch 0: own shards
    ld = Loader(spec, "image", batch_size=10, seed=1, image_size=16, resampled=False, shards_per_chunk=3)
    keys = [k for b in ld.batches(6) for k in b["key"]]  # 60 positions = one epoch over all 3 shards
    assert len(keys) == 59 and len(set(keys)) == 59 and ld.skipped == {"bad_image": 1}


def test_video_loader_batches(tmp_path):
    from webdataset import TarWriter

    from data.loader import Loader
    from data.video_kit import encode_mp4

    with TarWriter(str(tmp_path / "v-000000.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"v{i}", "mp4": encode_mp4(_moving_clip(12), 6), "txt": b"a bar moves right",
                     "json": json.dumps({"fps": 6, "frames": 12, "qa": []}).encode()})
    ld = Loader(str(tmp_path / "v-000000.tar"), "video", batch_size=2, num_frames=4, image_size=32, backend="pyav")
    b = next(iter(ld.batches(1)))
    assert b["frames"].shape == (2, 4, 3, 32, 32) and b["size"] == 2 and len(b["caption"]) == 2


# ---- kit builders without the cache ---------------------------------------------------------------------------

def _by_split(pools, vf=0.3):
    return {s: {n: [r for r in recs if split_of(r["source_id"], vf, 0) == s] for n, recs in pools.items()}
            for s in ("train", "val")}


def test_image_items_held_out_by_source_image():
    from data.image_kit import DEFAULTS, split_items

    cfg = {**DEFAULTS, "size": 32, "val_frac": 0.3, "ocr_words": 10, "ocr_docs": 6, "bar_charts": 6,
           "line_charts": 4, "counting": 10}
    sp = _by_split(_fake_pools())
    docs = {s: [d for d in _DOCS if split_of(f"brown:{d['key']}", 0.3, 0) == s] for s in sp}
    items = {s: split_items(s, sp[s], docs[s], cfg, ["animals", "town"]) for s in sp}
    ids = {s: {i for it in items[s] for i in it["meta"]["source_ids"]} for s in sp}
    assert ids["train"] and ids["val"] and ids["train"].isdisjoint(ids["val"])
    fams = {it["meta"]["family"] for it in items["train"]}
    assert fams == {"recognition", "counting", "ocr", "chart"}
    for it in items["train"]:
        assert it["image"].shape == (32, 32, 3) and it["meta"]["qa"]
        for q in it["meta"]["qa"]:
            assert q["answers"] and all(isinstance(a, str) for a in q["answers"])
            assert "choices" not in q or q["answers"][0] in q["choices"]


def test_anneal_set_renders_fresh_text_from_the_given_documents_only():
    from data.image_kit import DEFAULTS, anneal_items

    cfg = {**DEFAULTS, "size": 32, "val_frac": 0.3, "anneal_words": 12, "anneal_docs": 5}
    train = [d for d in _DOCS if split_of(f"brown:{d['key']}", 0.3, 0) == "train"]
    items = anneal_items(train, cfg)
    srcs = [it["meta"]["source"] for it in items]
    assert srcs.count("ocr/brown") == 12 and srcs.count("ocr_doc/brown") == 5
    keys = {f"brown:{d['key']}" for d in train}
    assert all(set(it["meta"]["source_ids"]) <= keys and it["meta"]["split"] == "train" for it in items)
    assert all(it["image"].shape == (32, 32, 3) and it["meta"]["qa"] for it in items)
    again = anneal_items(train, cfg)  # seeded: the same set on a rebuild
    assert [it["caption"] for it in again] == [it["caption"] for it in items]
    assert anneal_items(train, {**cfg, "anneal_words": 0, "anneal_docs": 0}) == []


def test_anneal_set_is_written_to_its_own_folder_only(tmp_path):
    from data.image_kit import DEFAULTS, build_anneal_set
    from data.shards import expand_shards

    cfg = {"size": 32, "val_frac": 0.3, "anneal_words": 7, "anneal_docs": 3}
    m = build_anneal_set(None, tmp_path, cfg, docs=_DOCS)
    shards = expand_shards(str(tmp_path / "image_anneal" / "train-*.tar"))
    assert m["samples"] == 10 and m["shards"] == [p.name for p in shards]
    assert json.loads((tmp_path / "image_anneal" / "manifest.json").read_text()) == m
    assert m["config"] == {**{k: DEFAULTS[k] for k in ("render_scale", "seed")}, **cfg}
    assert not (tmp_path / "image").exists()  # image/ (fingerprinted by every image run) is not touched
    assert build_anneal_set(None, tmp_path, {**cfg, "anneal_words": 0, "anneal_docs": 0}, docs=_DOCS) is None
    assert not list((tmp_path / "image_anneal").glob("*.tar"))  # a rebuild without a set leaves no stale shards


def test_video_clips_held_out_and_balanced():
    from data.video_kit import DEFAULTS, split_clips

    cfg = {**DEFAULTS, "size": 32, "frames": 8, "sprite_px": 12, "val_frac": 0.3,
           "clips": {"direction": 24, "order": 6, "which_moved": 6, "bounces": 12}}
    sp = _by_split(_fake_pools())
    clips = {s: split_clips(s, sp[s], cfg) for s in sp}
    ids = {s: {i for c in clips[s] for i in c["meta"]["source_ids"]} for s in sp}
    assert ids["train"] and ids["val"] and ids["train"].isdisjoint(ids["val"])
    train = clips["train"]
    assert all(c["video"].shape == (8, 32, 32, 3) for c in train)
    dirs = [c["meta"]["label"] for c in train if c["meta"]["family"] == "direction"]
    assert sorted(set(dirs)) == ["down", "left", "right", "up"] and max(map(dirs.count, set(dirs))) - \
        min(map(dirs.count, set(dirs))) <= 1
    for c in train:
        q = c["meta"]["qa"][0]
        assert q["answers"][0] in q["choices"] or q["answers"][1] in q["choices"]


def test_middle_frame_cannot_answer_direction_or_order():
    from data.video_kit import background, direction_clip, encode_mp4, make_object, order_clip

    pools = _fake_pools()
    obj, other = make_object(pools["mnist"][5], 12), make_object(pools["mnist"][6], 12)
    bg = background("mnist", 32, random.Random(0))
    clips = {d: direction_clip(obj, d, bg, 16, random.Random(1))[0] for d in ("left", "right", "up", "down")}
    mid = 16 // 2
    assert mid == uniform_indices(16, 1)[0]  # the frame a 1-frame sampler picks
    for d in ("right", "up", "down"):
        assert np.array_equal(clips[d][mid], clips["left"][mid])  # identical middle frames...
        assert not np.array_equal(clips[d][0], clips["left"][0])  # ...different motion
    decoded = {d: decode_video(encode_mp4(clips[d], 8), num_frames=3, backend="pyav")["frames"].astype(int)
               for d in ("left", "right")}  # indices [2, 8, 13]: the middle one is frame 8
    mid_diff = np.abs(decoded["left"][1] - decoded["right"][1]).mean()
    first_diff = np.abs(decoded["left"][0] - decoded["right"][0]).mean()
    assert mid_diff < 0.5 and first_diff > 20 * max(mid_diff, 0.1)  # only H.264 noise at the middle
    frames, _, qa, motion = order_clip(obj, other, bg, 16, random.Random(2))
    assert frames[0].max() == 0 and frames[mid].max() > 0  # nothing at first; both already visible at the middle
    left, right = frames[mid][:, :16], frames[mid][:, 16:]
    assert left.max() > 0 and right.max() > 0
    assert motion["appear"][0] < motion["appear"][1] < mid


# ---- on the real cache ----------------------------------------------------------------------------------------

@pytest.mark.data_cache
def test_tuxpaint_stamps_and_small_kit_on_real_cache(tmp_path):
    from data.fetch import cached_text_dirs, default_cache_dir
    from data.image_sources import cached_image_dirs

    cache = default_cache_dir()
    if cached_image_dirs(cache) is None or cached_text_dirs(cache) is None:
        pytest.skip(f"image/text data cache not fetched at {cache} (run data.image_sources.fetch_images)")
    from data.image_kit import tuxpaint_stamps
    from data.kit import build_kit

    stamps = tuxpaint_stamps(cache)
    assert len(stamps) == 785 and len({s["category"] for s in stamps}) == 16
    frog = next(s for s in stamps if s["path"].endswith("amphibians/frog.png"))
    assert frog["caption"] == "A frog." and frog["translations"]["de"] == "Ein Frosch."
    m = build_kit({"text": False, "speech": False, "processes": 2,
                   "image": {"fashion_mnist": 200, "mnist": 200, "ocr_words": 50, "ocr_docs": 30, "bar_charts": 20,
                             "line_charts": 20, "counting": 50, "anneal_words": 20, "anneal_docs": 10},
                   "video": {"clips": {"direction": 20, "order": 10, "which_moved": 10, "bounces": 10},
                             "pool": {"fashion_mnist": 100, "mnist": 100}}}, cache, tmp_path)
    assert m["parts"]["image"]["val"]["samples"] > 0 and m["parts"]["video"]["val"]["samples"] > 0
    assert json.loads((tmp_path / "image_anneal" / "manifest.json").read_text())["samples"] == 30
    assert "Tux Paint" in (tmp_path / "ATTRIBUTION.md").read_text()
    from data.inspect import inspect_shards

    r = inspect_shards(str(tmp_path / "video" / "val-*.tar"), None)
    assert r["skipped"] == {} and r["modalities"] == {"video": r["samples"]}


def test_mm_data_inspect_cli_on_a_hostile_shard_exits_0_and_reports_reasons(tmp_path, capsys):
    """The issue's check through the real command: pickle, truncated JPEG, broken MP4, bad WAV header, a sample
    without its caption and a non-tar file; exit code 0, no payload runs, one JSON line with each reason."""
    import io
    import pickle

    import soundfile as sf

    from data.video_kit import encode_mp4
    from mm.cli import main

    marker = tmp_path / "PWNED"
    jpg = _img_bytes(_pattern(4), "JPEG")
    wav = io.BytesIO()
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    bad_wav = b"RIFX" + wav.getvalue()[4:12] + b"junk" + wav.getvalue()[16:]
    write_tar(tmp_path / "h-000000.tar", [
        ("evil.pkl", pickle.dumps(_Creates(marker))), ("evil.txt", b"a caption"),
        ("trunc.jpg", jpg[: len(jpg) // 2]), ("trunc.txt", b"cut short"),
        ("vid.mp4", encode_mp4(_moving_clip(), 8)[:300]), ("vid.txt", b"a clip"),
        ("voice.wav", bad_wav), ("voice.txt", b"hello"), ("voice.json", b'{"language": "en"}'),
        ("nocap.png", _img_bytes(_pattern(3))),
    ])
    (tmp_path / "z-notes.tar").write_bytes(b"plain text, not a tar archive\n" * 30)
    code = main(["data", "inspect", str(tmp_path), "--png", str(tmp_path / "sheet.png")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and res["ok"] and not marker.exists()
    assert res["skipped"] == {"pickle_member": 1, "bad_image": 1, "bad_video": 1, "bad_audio": 1,
                              "missing_caption": 1, "bad_tar": 1}
