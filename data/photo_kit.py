"""Real photographs for evaluation only (DATA.md §6; never trained on): GCompris' photos (Debian gcompris-qt-data,
inside Qt .rcc bundles read by data.rcc) of animals, fruit, tools, household objects and monuments, each labelled by
its file name and filed under the Tux Paint category the training kit teaches (animals, food, household, sports,
town). Every photo becomes one image sample at its source resolution (JPEG) with the kit's recognition questions:
"What is shown in the image?" (the label) and "Which category does this picture belong to?" (four options).
Writes out_dir/photos/val-000000.tar + manifest.json.
"""
from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data.decode import CAPS
from data.fetch import fetch_one
from data.image_kit import _choices, encode_image, make_qa, write_shards
from data.rcc import read_rcc

RCC = "usr/share/gcompris-qt/rcc"
ANIMALS = ("bear bee beetle bird bull butterfly camel cat chicken cow dog dolphin duck fish fox frog giraffe gorilla "
           "hedgehog hippopotamus horse kangaroo lizard mosquito mouse owl panda pig rabbit rhinoceros shark sheep "
           "snail snake spider turkey turtle whale wolf").split()
FRUIT = "apple apricot coconut kiwi lemon melon orange peach pear plum raspberry strawberry".split()
OTHERS = {"baseball": "sports", "volleyball": "sports", "igloo": "town", "bucket": "household", "bulb": "household",
          "chair": "household", "cup": "household", "knife": "household", "pan": "household", "pencil": "household",
          "pillow": "household", "plate": "household", "spoons": "household"}
# (bundle, folder inside it, which photos: {file stem: (label, category)} or a category for every photo there)
SOURCES = (
    ("lang.rcc", "words_sample", {**{a: (a, "animals") for a in ANIMALS}, **{f: (f, "food") for f in FRUIT}}),
    ("explore_world_animals.rcc", "animals", "animals"),
    ("explore_farm_animals.rcc", "animals", "animals"),
    ("categorization.rcc", "images/fishes", "animals"),
    ("categorization.rcc", "images/tools", "household"),
    ("categorization.rcc", "images/others", {k: (k, c) for k, c in OTHERS.items()}),
    ("explore_monuments.rcc", "", "town"),
)
CATEGORIES = ("animals", "clothes", "food", "hobbies", "household", "medical", "military", "naturalforces", "people",
              "plants", "seasonal", "space", "sports", "symbols", "town", "vehicles")  # the Tux Paint stamp folders


def label_of(stem: str) -> str:
    """A file stem as words: "polar_bear" -> "polar bear", "measuringTape3" -> "measuring tape", "fish12" -> "fish"."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", re.sub(r"\d+$", "", stem)).replace("_", " ").replace("-", " ")
    return " ".join(words.lower().split())


def photos(root: Path) -> list[dict]:
    """Every selected photo of the unpacked package: {name, label, category, image (H, W, 3) uint8}; photos over the
    pixel cap are skipped."""
    out = []
    for bundle, folder, pick in SOURCES:
        files = read_rcc(root / RCC / bundle)
        for path, data in sorted(files.items()):
            parent, _, name = path.rpartition("/")
            if not name.endswith(".webp") or (folder and not parent.endswith(folder)) or len(data) < 15000:
                continue  # icons and thumbnails are small; photos are not
            stem = name[: -len(".webp")]
            if isinstance(pick, dict):
                if stem not in pick:
                    continue
                label, category = pick[stem]
            else:
                label, category = label_of(stem), pick
            im = Image.open(io.BytesIO(data), formats=("WEBP",))
            if im.size[0] * im.size[1] > CAPS.max_pixels:
                continue
            out.append({"name": f"{bundle}/{path}", "label": label, "category": category,
                        "image": np.asarray(im.convert("RGB"))})
    return out


def photo_item(p: dict, rng: random.Random) -> dict:
    """One held-out sample: the photo, its label as caption, the kit's recognition questions."""
    qa = [make_qa("What is shown in the image?", [p["label"]]),
          make_qa("Which category does this picture belong to?", [p["category"]],
                  _choices(p["category"], CATEGORIES, rng))]
    return {"image": p["image"], "caption": f"a photo of a {p['label']}.",
            "meta": {"source": "photos/gcompris", "label": p["label"], "category": p["category"],
                     "family": "recognition", "qa": qa, "source_ids": [f"gcompris:{p['name']}"]}}


def fetch_photos(cache_dir, progress: bool = True) -> dict:
    """Fetch (pinned, sha256-checked) the package holding the photos; {"gcompris": dir}."""
    return {"gcompris": str(fetch_one("gcompris", Path(cache_dir), progress))}


def build_photo_kit(cache_dir, out_dir, seed: int = 0) -> dict:
    """Fetch the pinned package, write out_dir/photos/val-000000.tar and its manifest; returns the manifest."""
    root = fetch_one("gcompris", Path(cache_dir), progress=False)
    rng = random.Random(f"{seed}:photos")
    items = [photo_item(p, rng) for p in photos(root)]
    out = Path(out_dir) / "photos"
    for stale in out.glob("val-*.tar"):
        stale.unlink()
    samples = ({"__key__": f"photo_{i:05d}", "jpg": encode_image(it["image"], "jpg", 92),
                "txt": it["caption"].encode(), "json": json.dumps(it["meta"], sort_keys=True).encode()}
               for i, it in enumerate(items))
    shards = write_shards(samples, out, "val", 1000)
    manifest = {"samples": len(items), "shards": [s.name for s in shards],
                "by_category": dict(sorted(Counter(it["meta"]["category"] for it in items).items()))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
