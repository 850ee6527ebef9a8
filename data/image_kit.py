"""The image-text part of the real data kit: shards of real and synthetic images with captions and template VQA.

Families (json "family"): recognition (Tux Paint stamps with human captions and categories, Fashion-MNIST,
MNIST), ocr (rendered words and short documents from Brown sentences), chart (matplotlib bar/line charts of real
Brown counts), counting (pasted sprites/digits). Held out by SOURCE image: every real image is in one split
(`split_of`), and each split's items are built only from that split's images (Brown documents likewise).
Shards: out_dir/image/{train,val}-XXXXXX.tar with png|jpg + txt + json {source, label, family, qa, source_ids};
with anneal_words / anneal_docs, also the annealing set in its own folder, out_dir/image_anneal/train-XXXXXX.tar
(training documents only) with its own manifest.json, so image/manifest.json (which runs fingerprint) is unchanged.
"""
from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from data import image_synth as syn
from data.curation import balance_entries, curate, dhash, entry_counts
from data.image_sources import (DIGIT_WORDS, FASHION_LABELS, fashion_mnist, fetch_images, fit_square, load_rgba,
                                mnist_5k, on_white, split_of, tuxpaint_stamps)  # tuxpaint_stamps: re-exported

__all__ = ["DEFAULTS", "build_image_kit", "build_anneal_set", "anneal_items", "tuxpaint_stamps", "load_pools",
           "encode_image", "write_shards"]

DEFAULTS: dict = {
    "size": 64, "render_scale": 1, "val_frac": 0.1, "seed": 0, "shard_size": 1000, "jpeg_quality": 90,
    "tuxpaint": True, "fashion_mnist": 4000, "mnist": 3000,
    "ocr_words": 1500, "ocr_docs": 800, "bar_charts": 700, "line_charts": 400, "counting": 1500,
    "anneal_words": 6000, "anneal_docs": 2000,
    "curation": {"min_words": 1, "max_words": 40, "min_alpha": 0.6, "max_hamming": 2,
                 "near_dup_sources": ["tuxpaint"], "balance_T": 300, "balance_power": 1.0,
                 "balance_ngrams": [1]},
}
ANNEAL_KEYS = ("anneal_words", "anneal_docs")  # the annealing set's counts: its own folder and manifest, not image/'s
NUM_WORDS = ("zero",) + DIGIT_WORDS[1:] + ("ten",)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_FASHION_CAPS = ("A grayscale photo of {a} {l}.", "A small picture of {a} {l}.", "{A} {l} on a black background.",
                 "Fashion product: {a} {l}.")
_DIGIT_CAPS = ("A handwritten digit {d}.", "The number {w} written by hand.", "A handwritten {w}.")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_qa(question: str, answers, choices=None) -> dict:
    """One qa entry {question, answers: [str...], choices?: [str...]}; answers[0] is the canonical one."""
    out = {"question": question, "answers": [str(a) for a in answers]}
    if choices is not None:
        out["choices"] = [str(c) for c in choices]
    return out


def _choices(answer: str, pool, rng: random.Random, k: int = 4) -> list[str]:
    others = sorted({p for p in pool if p != answer})
    picked = rng.sample(others, min(k - 1, len(others))) + [answer]
    rng.shuffle(picked)
    return picked


def _yes_no(rng: random.Random, label: str, pool, template: str, article: bool = False) -> dict:
    asked = label if rng.random() < 0.5 else rng.choice(sorted({p for p in pool if p != label} or {label}))
    x = f"{_article(asked)} {asked}" if article else asked
    return make_qa(template.format(x=x), ["yes" if asked == label else "no"], ["yes", "no"])


def _gray_rgb(gray: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


# ---- real-image pools ----------------------------------------------------------------------------------------

def load_pools(cache_dir, cfg: dict) -> dict:
    """Load the real images: {"tuxpaint": [...], "fashion_mnist": [...], "mnist": [...]} records with
    source_id, caption, label, image (size, size, 3) uint8 and, for stamps and digits, an RGBA `sprite`."""
    dirs = fetch_images(cache_dir, progress=False)
    size, rng = int(cfg["size"]), random.Random(cfg["seed"])
    pools: dict = {"tuxpaint": [], "fashion_mnist": [], "mnist": []}
    if cfg["tuxpaint"]:
        root = Path(dirs["tuxpaint"]) / "stamps"
        for st in tuxpaint_stamps(cache_dir):
            sprite = load_rgba(st["path"], 2 * size)
            rel = Path(st["path"]).relative_to(root).as_posix()
            pools["tuxpaint"].append({"source": "tuxpaint", "source_id": f"tuxpaint:{rel}", "caption": st["caption"],
                                      "label": st["label"] or st["caption"].rstrip("."), "category": st["category"],
                                      "image": np.asarray(fit_square(on_white(sprite), size)), "sprite": sprite})
    if cfg["fashion_mnist"]:
        images, labels = fashion_mnist(dirs["fashion_mnist"], "train")
        for i in sorted(rng.sample(range(len(labels)), min(int(cfg["fashion_mnist"]), len(labels)))):
            lab = FASHION_LABELS[labels[i]]
            cap = rng.choice(_FASHION_CAPS).format(l=lab, a=_article(lab), A=_article(lab).capitalize())
            pools["fashion_mnist"].append({"source": "fashion_mnist", "source_id": f"fashion_mnist:train/{i}",
                                           "caption": cap, "label": lab,
                                           "image": _gray_rgb(images[i], size), "gray": images[i]})
    if cfg["mnist"]:
        images, labels = mnist_5k(dirs["mnist5k"])
        for i in sorted(rng.sample(range(len(labels)), min(int(cfg["mnist"]), len(labels)))):
            d = int(labels[i])
            cap = rng.choice(_DIGIT_CAPS).format(d=d, w=DIGIT_WORDS[d])
            pools["mnist"].append({"source": "mnist", "source_id": f"mnist5k:{i}", "caption": cap, "label": str(d),
                                   "image": _gray_rgb(255 - images[i], size), "gray": images[i],
                                   "sprite": syn.gray_sprite(images[i])})
    return pools


def curate_pools(pools: dict, cfg: dict, score=None) -> tuple[dict, dict]:
    """Caption filters + near-dup removal per source, then CLIP hook + entry balancing over all of them."""
    c = dict(cfg["curation"])
    report: dict = {}
    out: dict = {}
    for name, recs in pools.items():
        for r in recs:
            r["hash"] = dhash(r["image"])
        step = {**c, "max_hamming": c.get("max_hamming") if name in c.get("near_dup_sources", []) else None,
                "balance_T": None}
        out[name], report[name] = curate(recs, step, score)
    if c.get("balance_T") is not None:
        flat = [r for recs in out.values() for r in recs]
        ngrams = tuple(c.get("balance_ngrams", (1,)))
        kept, removed = balance_entries(flat, int(c["balance_T"]), float(c.get("balance_power", 1.0)),
                                        int(cfg["seed"]), ngrams)
        ids = {r["source_id"] for r in kept}
        def head(recs):  # the 5 commonest entries, ties by name: a rebuild writes the same manifest
            return dict(sorted(entry_counts(recs, ngrams).items(), key=lambda kv: (-kv[1], kv[0]))[:5])
        report["balance"] = {"T": c["balance_T"], "power": c.get("balance_power", 1.0), **dict(removed),
                             "head_before": head(flat), "head_after": head(kept),
                             "by_source": {n: sum(r["source_id"] not in ids for r in recs) for n, recs in out.items()}}
        out = {n: [r for r in recs if r["source_id"] in ids] for n, recs in out.items()}
    return out, report


# ---- items per family ----------------------------------------------------------------------------------------

def recognition_item(r: dict, rng: random.Random, labels_by_source: dict, categories: list[str]) -> dict:
    """A recognition item (caption + what / which / is-it questions) for one curated real image."""
    src, lab = r["source"], r["label"]
    pool = labels_by_source[src]
    if src == "tuxpaint":
        what = lab if len(lab.split()) <= 4 else r["caption"].rstrip(".")
        qa = [make_qa("What is shown in the image?", [what, r["caption"].rstrip(".")]),
              make_qa("Which category does this picture belong to?", [r["category"]],
                      _choices(r["category"], categories, rng)),
              _yes_no(rng, lab, [p for p in pool if len(p.split()) <= 4] + [lab], "Is this {x}?", True)]
    elif src == "fashion_mnist":
        qa = [make_qa("What kind of clothing item is this?", [lab]),
              make_qa("Which item is shown?", [lab], _choices(lab, pool, rng)),
              _yes_no(rng, lab, pool, "Is this {x}?", True)]
    else:
        d = int(lab)
        qa = [make_qa("What digit is shown?", [lab, DIGIT_WORDS[d]]),
              make_qa("Is the digit odd or even?", ["even" if d % 2 == 0 else "odd"], ["odd", "even"]),
              _yes_no(rng, lab, pool, "Is this the digit {x}?")]
    return {"image": r["image"], "ext": "jpg" if src == "tuxpaint" else "png", "caption": r["caption"],
            "meta": {"source": src, "label": lab, "family": "recognition", "qa": qa, "source_ids": [r["source_id"]],
                     **({"category": r["category"]} if "category" in r else {})}}


def counting_item(a: dict, b: dict, n_a: int, n_b: int, size: int, rng: random.Random) -> dict:
    """n_a copies of sprite a and n_b of sprite b pasted on white; how-many questions."""
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    sprites = [a["sprite"]] * n_a + [b["sprite"]] * n_b
    rng.shuffle(sprites)
    syn.paste_sprites(canvas, sprites, size // 3, rng)
    name = (lambda r: f"digit {r['label']}") if a["source"] == "mnist" else (lambda r: r["label"])
    caption = (f"{NUM_WORDS[n_a].capitalize()} {'copy' if n_a == 1 else 'copies'} of the {name(a)}"
               + (f" and {NUM_WORDS[n_b]} of the {name(b)}." if n_b else "."))
    qa = [make_qa(f"How many times does the {name(a)} appear in the picture?", [n_a, NUM_WORDS[n_a]],
                  [str(i) for i in range(1, 6)]),
          make_qa("How many objects are there in total?", [n_a + n_b, NUM_WORDS[n_a + n_b]])]
    return {"image": np.asarray(canvas.convert("RGB")), "ext": "png", "caption": caption,
            "meta": {"source": f"counting/{a['source']}", "label": str(n_a), "family": "counting", "qa": qa,
                     "source_ids": [a["source_id"], b["source_id"]]}}


def ocr_word_item(doc: dict, size: int, rng: random.Random) -> dict | None:
    """One rendered Brown word; what-word and is-it questions."""
    words = syn.text_words(doc["text"], 3, 9)
    if len(words) < 2:
        return None
    word, other = rng.sample(words, 2)
    img = syn.render_word(word, size, rng)
    asked = word if rng.random() < 0.5 or other.lower() == word.lower() else other
    qa = [make_qa("What word is written in the image?", [word, word.lower()]),
          make_qa(f'Is the word "{asked}" written in the image?', ["yes" if asked == word else "no"], ["yes", "no"]),
          make_qa("How many letters does the word have?", [len(word)])]
    return {"image": np.asarray(img), "ext": "png", "caption": f'The word "{word}" written on a plain background.',
            "meta": {"source": "ocr/brown", "label": word, "family": "ocr", "qa": qa,
                     "source_ids": [f"brown:{doc['key']}"]}}


def ocr_doc_item(doc: dict, size: int, rng: random.Random) -> dict | None:
    """A few lines of a real Brown sentence rendered as a tiny page; the caption is its transcription."""
    sents = [s for s in syn.sentences(doc["text"]) if 4 <= len(s.split()) <= 40]
    if not sents:
        return None
    px = max(8, size // 7)
    lines = syn.wrap_lines(rng.choice(sents).split(), size, px, max_lines=max(2, (size - 4) // int(px * 1.25)))
    if len(lines) < 2:
        return None
    img = syn.render_document(lines, size, px, rng)
    words = " ".join(lines).split()
    first, last = words[0], lines[0].split()[-1]
    qa = [make_qa("What is the first word of the text?", [first, first.strip(".,;:!?\"'")]),
          make_qa("What is the last word on the first line?", [last, last.strip(".,;:!?\"'")]),
          make_qa("How many lines of text are there?", [len(lines), NUM_WORDS[len(lines)]], ["2", "3", "4", "5", "6"])]
    return {"image": np.asarray(img), "ext": "png", "caption": "\n".join(lines),
            "meta": {"source": "ocr_doc/brown", "label": words[0], "family": "ocr", "qa": qa,
                     "source_ids": [f"brown:{doc['key']}"]}}


def bar_chart_item(doc: dict, size: int, rng: random.Random) -> dict | None:
    """Bars of real word counts in one Brown text; tallest / shortest / compare / how-many-bars questions."""
    k = rng.choice((3, 4, 5))
    pairs = syn.word_counts(doc["text"], k, rng)
    if not pairs:
        return None
    colors = rng.sample(sorted(syn.COLORS), k)
    values = [c for _, c in pairs]
    img = syn.bar_chart(values, colors, size)
    hi, lo = colors[int(np.argmax(values))], colors[int(np.argmin(values))]
    i, j = rng.sample(range(k), 2)
    table = ", ".join(f'{c} "{w}" {v}' for c, (w, v) in zip(colors, pairs))
    qa = [make_qa("Which color is the tallest bar?", [hi], colors),
          make_qa("Which color is the shortest bar?", [lo], colors),
          make_qa(f"Is the {colors[i]} bar taller than the {colors[j]} bar?",
                  ["yes" if values[i] > values[j] else "no"], ["yes", "no"]),
          make_qa("How many bars are there?", [k, NUM_WORDS[k]])]
    return {"image": np.asarray(img), "ext": "png",
            "caption": f"A bar chart of word counts in a Brown {doc['genre']} text: {table}.",
            "meta": {"source": "chart/bar", "label": hi, "family": "chart", "qa": qa, "values": values,
                     "source_ids": [f"brown:{doc['key']}"]}}


def line_chart_item(doc: dict, size: int, rng: random.Random) -> dict | None:
    """Words per sentence of consecutive real sentences; trend and argmax questions."""
    lens = [len(s.split()) for s in syn.sentences(doc["text"])]
    k = rng.randint(5, 8)
    if len(lens) < k:
        return None
    start = rng.randint(0, len(lens) - k)
    vals = lens[start:start + k]
    if vals[0] == vals[-1] or vals.count(max(vals)) > 1:
        return None
    img = syn.line_chart(vals, size)
    top = int(np.argmax(vals))
    qa = [make_qa("Does the line end higher or lower than it starts?", ["higher" if vals[-1] > vals[0] else "lower"],
                  ["higher", "lower"]),
          make_qa("Which point is the highest, counting from the left?", [top + 1, ORDINALS[top]],
                  [str(i + 1) for i in range(k)]),
          make_qa("How many points are on the line?", [k, NUM_WORDS[k]])]
    return {"image": np.asarray(img), "ext": "png",
            "caption": f"A line chart of the number of words in {k} consecutive sentences of a Brown {doc['genre']} "
                       f"text: {', '.join(map(str, vals))}.",
            "meta": {"source": "chart/line", "label": str(top + 1), "family": "chart", "qa": qa, "values": vals,
                     "source_ids": [f"brown:{doc['key']}"]}}


def _n_for(split: str, total: int, val_frac: float) -> int:
    n_val = int(round(total * val_frac))
    return n_val if split == "val" else total - n_val


def split_items(split: str, pools: dict, docs: list[dict], cfg: dict, categories: list[str]) -> list[dict]:
    """All items of one split, built only from that split's images and documents."""
    size, vf = int(cfg["size"]), float(cfg["val_frac"])
    rng = random.Random(f"{cfg['seed']}:{split}")
    labels_by_source = {n: sorted({r["label"] for r in recs}) for n, recs in pools.items()}
    items = [recognition_item(r, rng, labels_by_source, categories) for recs in pools.values() for r in recs]
    sprites = {"tuxpaint": [r for r in pools["tuxpaint"] if len(r["label"].split()) <= 3],
               "mnist": pools["mnist"]}
    kinds = [k for k, v in sprites.items() if len({r["label"] for r in v}) >= 2]
    for i in range(_n_for(split, int(cfg["counting"]), vf) if kinds else 0):
        recs = sprites[kinds[i % len(kinds)]]
        a = rng.choice(recs)
        b = rng.choice([r for r in recs if r["label"] != a["label"]] or recs)
        n_a = 1 + i // len(kinds) % 5  # answers 1..5 equally often
        items.append(counting_item(a, b, n_a, rng.randint(0, min(3, 9 - n_a)), size, rng))
    makers = (("ocr_words", ocr_word_item), ("ocr_docs", ocr_doc_item), ("bar_charts", bar_chart_item),
              ("line_charts", line_chart_item))
    rendered = size * int(cfg["render_scale"])  # text and charts drawn at render_scale x the tile: detail for tiling
    for key, make in makers:
        items += _rendered(make, _n_for(split, int(cfg[key]), vf), docs, rendered, rng)
    for it in items:
        it["meta"]["split"] = split
    return items


def _rendered(make, want: int, docs: list[dict], size: int, rng: random.Random) -> list[dict]:
    """Up to `want` items make(doc, size, rng) from random documents (a maker may decline a document)."""
    out, tries = [], 0
    while docs and len(out) < want and tries < 20 * want + 20:
        tries += 1
        item = make(rng.choice(docs), size, rng)
        if item is not None:
            out.append(item)
    return out


def anneal_items(docs: list[dict], cfg: dict) -> list[dict]:
    """The annealing set (PAPER.md §8.2 item 5, synthetic text images): cfg["anneal_words"] rendered words and
    cfg["anneal_docs"] pages drawn afresh from `docs` (the training split's Brown documents) with their own seed,
    asked the kit's OCR questions; training data only (meta split "train", source as the kit's OCR items)."""
    rng = random.Random(f"anneal:{cfg['seed']}")
    rendered = int(cfg["size"]) * int(cfg["render_scale"])
    items = (_rendered(ocr_word_item, int(cfg["anneal_words"]), docs, rendered, rng)
             + _rendered(ocr_doc_item, int(cfg["anneal_docs"]), docs, rendered, rng))
    for it in items:
        it["meta"]["split"] = "train"
    rng.shuffle(items)
    return items


# ---- writing -------------------------------------------------------------------------------------------------

def encode_image(arr: np.ndarray, ext: str, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> PNG or JPEG bytes."""
    buf = io.BytesIO()
    if ext == "jpg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_shards(samples, out_dir: Path, prefix: str, shard_size: int) -> list[Path]:
    """Write sample dicts ({"__key__", ext: bytes}) to out_dir/prefix-XXXXXX.tar, shard_size per tar."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    try:
        for n, s in enumerate(samples):
            if n % shard_size == 0:
                if writer is not None:
                    writer.close()
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                writer = TarWriter(str(paths[-1]), mtime=0.0)
            writer.write(s)
    finally:
        if writer is not None:
            writer.close()
    return paths


def _encoded(items: list[dict], prefix: str, cfg: dict):
    """The shard samples ({"__key__", ext, "txt", "json"}) of kit items, in order."""
    return ({"__key__": f"{prefix}_{i:06d}", it["ext"]: encode_image(it["image"], it["ext"], cfg["jpeg_quality"]),
             "txt": it["caption"].encode("utf-8"), "json": json.dumps(it["meta"], sort_keys=True).encode()}
            for i, it in enumerate(items))


def build_image_kit(cache_dir, out_dir, cfg: dict | None = None, score=None) -> dict:
    """Build out_dir/image/{train,val}-XXXXXX.tar and manifest.json from the fetched images and Brown text (and,
    when configured, the annealing set: out_dir/image_anneal/train-XXXXXX.tar and its manifest.json);
    `score(image, caption) -> float` enables the CLIP filter (curation.clip_threshold). Returns the image manifest
    with the annealing set's under "anneal"."""
    from data.fetch import fetch_text
    from data.text_kit import brown_documents

    cfg = {**DEFAULTS, **(cfg or {}), "curation": {**DEFAULTS["curation"], **((cfg or {}).get("curation") or {})}}
    pools, report = curate_pools(load_pools(cache_dir, cfg), cfg, score)
    docs = list(brown_documents(fetch_text(Path(cache_dir), progress=False)["brown"]))
    categories = sorted({r["category"] for r in pools["tuxpaint"]}) or ["none"]
    out = Path(out_dir) / "image"
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        stale.unlink()
    manifest: dict = {"config": {k: v for k, v in cfg.items() if k not in ANNEAL_KEYS}, "curation": report,
                      "splits": {}}
    vf, seed = float(cfg["val_frac"]), int(cfg["seed"])
    for split in ("train", "val"):
        sp_pools = {n: [r for r in recs if split_of(r["source_id"], vf, seed) == split] for n, recs in pools.items()}
        sp_docs = [d for d in docs if split_of(f"brown:{d['key']}", vf, seed) == split]
        items = split_items(split, sp_pools, sp_docs, cfg, categories)
        random.Random(f"{seed}:{split}:order").shuffle(items)
        shards = write_shards(_encoded(items, split, cfg), out, split, int(cfg["shard_size"]))
        manifest["splits"][split] = {
            "samples": len(items), "shards": [p.name for p in shards],
            "shard_bytes": sum(p.stat().st_size for p in shards),
            "by_family": dict(sorted(Counter(it["meta"]["family"] for it in items).items())),
            "by_source": dict(sorted(Counter(it["meta"]["source"] for it in items).items())),
            "questions": sum(len(it["meta"]["qa"]) for it in items),
            "source_images": len({s for it in items for s in it["meta"]["source_ids"]}),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    anneal = build_anneal_set(cache_dir, out_dir, cfg, docs)
    return {**manifest, "anneal": anneal} if anneal else manifest


def build_anneal_set(cache_dir, out_dir, cfg: dict | None = None, docs: list[dict] | None = None) -> dict | None:
    """Write the annealing set (anneal_items from the training split's Brown documents) to
    out_dir/image_anneal/train-XXXXXX.tar and its manifest.json, touching nothing in image/; returns that manifest,
    or None (and no folder) when cfg asks for no items. cfg: image_kit.DEFAULTS keys."""
    from data.fetch import fetch_text
    from data.text_kit import brown_documents

    cfg = {**DEFAULTS, **(cfg or {})}
    out = Path(out_dir) / "image_anneal"
    for stale in out.glob("train-*.tar"):
        stale.unlink()
    if docs is None:
        docs = list(brown_documents(fetch_text(Path(cache_dir), progress=False)["brown"]))
    vf, seed = float(cfg["val_frac"]), int(cfg["seed"])
    items = anneal_items([d for d in docs if split_of(f"brown:{d['key']}", vf, seed) == "train"], cfg)
    if not items:
        return None
    shards = write_shards(_encoded(items, "anneal", cfg), out, "train", int(cfg["shard_size"]))
    manifest = {"config": {k: cfg[k] for k in ("size", "render_scale", "val_frac", "seed", *ANNEAL_KEYS)},
                "samples": len(items), "shards": [p.name for p in shards],
                "shard_bytes": sum(p.stat().st_size for p in shards),
                "by_source": dict(sorted(Counter(it["meta"]["source"] for it in items).items()))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
