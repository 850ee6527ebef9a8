"""The video-text part of the kit: short clips made from the real images, with captions and temporal QA.

Moving digits (Moving-MNIST style, on black), moving garments (Fashion-MNIST) and Tux Paint sprites over
gradient backgrounds. Families: direction (left/right/up/down), order (which appeared first), which_moved,
bounces (how many). Every question needs more than one frame: at the middle frame a moving object is always at
the same place whatever its direction, both objects of an order clip are already visible, the mover of a
which-moved clip is at its rest position, and a single frame shows no bounce. Clips are H.264 MP4 (PyAV,
libx264, yuv420p, even sizes), held out by source image with the image kit's `split_of`.
Shards: out_dir/video/{train,val}-XXXXXX.tar with mp4 + txt + json {fps, frames, qa, family, source_ids, ...}.
"""
from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data.image_kit import NUM_WORDS, load_pools, make_qa, write_shards
from data.image_sources import split_of

DEFAULTS: dict = {
    "size": 64, "frames": 16, "fps": 8, "sprite_px": 24, "val_frac": 0.1, "seed": 0, "shard_size": 500, "crf": 20,
    "clips": {"direction": 800, "order": 400, "which_moved": 400, "bounces": 400},
    "sources": ["mnist", "fashion_mnist", "tuxpaint"], "pool": {"fashion_mnist": 1500, "mnist": 1500},
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_END_PLACE = {"left": "on the left", "right": "on the right", "up": "at the top", "down": "at the bottom"}


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 20) -> bytes:
    """(T, H, W, 3) uint8 (H, W even) -> H.264 MP4 bytes (libx264, yuv420p, no B-frames: decord-friendly)."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ---- objects and backgrounds ---------------------------------------------------------------------------------

def make_object(rec: dict, px: int) -> dict:
    """A clip object from a pool record: {"sprite": RGBA fitted into px, "name": "the digit 7", "source_id"}."""
    if rec["source"] == "mnist":
        g = rec["gray"]
        rgba = np.dstack([np.full_like(g, 255)] * 3 + [g])  # white digit, alpha = ink (Moving-MNIST look)
        sprite, name = Image.fromarray(rgba, "RGBA"), f"the digit {rec['label']}"
    elif rec["source"] == "fashion_mnist":
        g = rec["gray"]
        alpha = np.clip(g.astype(np.int32) * 4, 0, 255).astype(np.uint8)
        sprite, name = Image.fromarray(np.dstack([g, g, g, alpha]), "RGBA"), f"the {rec['label']}"
    else:
        sprite, name = rec["sprite"].copy(), f"the {rec['label']}"
    bbox = sprite.getchannel("A").getbbox()
    sprite = sprite.crop(bbox) if bbox else sprite
    sprite.thumbnail((px, px), Image.Resampling.LANCZOS)
    return {"sprite": sprite, "name": name, "label": rec["label"], "source_id": rec["source_id"]}


def background(source: str, size: int, rng: random.Random) -> Image.Image:
    """Black for digits and garments; a vertical two-colour gradient for Tux Paint sprites (RGBA)."""
    if source in ("mnist", "fashion_mnist"):
        return Image.new("RGBA", (size, size), (0, 0, 0, 255))
    top, bottom = (np.array([rng.randint(120, 255) for _ in range(3)], np.float32) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # (S, 1, 1)
    rgb = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1)  # (S, S, 3)
    return Image.fromarray(np.dstack([rgb.astype(np.uint8), np.full((size, size), 255, np.uint8)]), "RGBA")


def render(bg: Image.Image, tracks: list[tuple[Image.Image, list]]) -> np.ndarray:
    """Composite sprites on a static background per frame; tracks = [(sprite, [(x, y) or None per frame])]
    (None: not visible yet). Returns (T, S, S, 3) uint8."""
    frames = []
    for t in range(len(tracks[0][1])):
        canvas = bg.copy()
        for sprite, path in tracks:
            if path[t] is not None:  # paste with the alpha as mask: clips at the edges (alpha_composite cannot)
                canvas.paste(sprite, (int(path[t][0]), int(path[t][1])), sprite)
        frames.append(np.asarray(canvas.convert("RGB")))
    return np.stack(frames)


# ---- clip families -------------------------------------------------------------------------------------------

def direction_path(direction: str, obj_wh: tuple, size: int, frames: int, speed: float) -> list[tuple]:
    """Positions of an object moving in `direction`, exactly centred at frame frames//2 (the middle frame the
    uniform sampler picks for N=1): the middle frame is the same for every direction."""
    w, h = obj_wh
    cx, cy = (size - w) // 2, (size - h) // 2
    dx, dy = DIRECTIONS[direction]
    mid = frames // 2
    return [(cx + round(dx * speed * (t - mid)), cy + round(dy * speed * (t - mid))) for t in range(frames)]


def direction_clip(obj: dict, direction: str, bg: Image.Image, frames: int, rng: random.Random) -> tuple:
    """One object crossing the frame; returns (frames, caption, qa, motion)."""
    size, (w, h) = bg.width, obj["sprite"].size
    reach = ((size - max(w, h)) / 2 + max(w, h) / 4) / (frames // 2)  # stays >= 3/4 visible
    path = direction_path(direction, (w, h), size, frames, reach * rng.uniform(0.6, 1.0))
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
    name = obj["name"]
    moves = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[direction]
    qa = [make_qa(f"In which direction does {name} move?", [direction], list(DIRECTIONS)),
          make_qa(f"Where is {name} at the end of the video?", [_END_PLACE[direction], direction]),
          make_qa(f"Where is {name} at the start of the video?", [_END_PLACE[opposite], opposite])]
    return render(bg, [(obj["sprite"], path)]), f"{name.capitalize()} moves {moves}.", qa, {"direction": direction}


def order_clip(a: dict, b: dict, bg: Image.Image, frames: int, rng: random.Random) -> tuple:
    """a appears, then b; both are visible from before the middle frame on."""
    size, mid = bg.width, frames // 2
    t_a = rng.randint(1, max(1, mid // 2))
    t_b = rng.randint(t_a + 1, mid - 1) if mid - 1 > t_a else t_a + 1
    slots = [size // 4, 3 * size // 4]
    rng.shuffle(slots)
    tracks = []
    for obj, t0, cx in ((a, t_a, slots[0]), (b, t_b, slots[1])):
        w, h = obj["sprite"].size
        pos = (cx - w // 2, (size - h) // 2 + rng.randint(-size // 8, size // 8))
        tracks.append((obj["sprite"], [pos if t >= t0 else None for t in range(frames)]))
    labels = [a["name"], b["name"]]
    rng.shuffle(labels)
    qa = [make_qa(f"Which appeared first, {labels[0]} or {labels[1]}?", [a["name"], a["label"]], labels),
          make_qa(f"Which appeared last, {labels[0]} or {labels[1]}?", [b["name"], b["label"]], labels)]
    caption = f"First {a['name']} appears, then {b['name']} appears."
    return render(bg, tracks), caption, qa, {"appear": [t_a, t_b]}


def which_moved_clip(objs: list[dict], bg: Image.Image, frames: int, rng: random.Random) -> tuple:
    """objs[0] swings back and forth (at rest at the middle frame), the others stay still."""
    size, mid = bg.width, frames // 2
    cell = size // 2
    cells = rng.sample(range(4), len(objs))
    amp = rng.uniform(0.15, 0.25) * size
    axis = rng.choice((0, 1))
    tracks = []
    for k, (obj, c) in enumerate(zip(objs, cells)):
        w, h = obj["sprite"].size
        x0, y0 = (c % 2) * cell + (cell - w) // 2, (c // 2) * cell + (cell - h) // 2
        path = []
        for t in range(frames):
            off = amp * math.sin(2 * math.pi * (t - mid) / frames) if k == 0 else 0.0
            path.append((x0 + round(off * (axis == 0)), y0 + round(off * (axis == 1))))
        tracks.append((obj["sprite"], path))
    names = [o["name"] for o in objs]
    choices = sorted(names)
    rng.shuffle(choices)
    rest = " and ".join(names[1:])
    qa = [make_qa("Which object moved?", [objs[0]["name"], objs[0]["label"]], choices),
          make_qa(f"Did {names[1]} move?", ["no"], ["yes", "no"])]
    verb = "stays" if len(objs) == 2 else "stay"
    return render(bg, tracks), f"{names[0].capitalize()} moves back and forth while {rest} {verb} still.", qa, \
        {"mover": names[0]}


def bounce_path(start, vel, size: int, wh, frames: int) -> tuple[list, int]:
    """Straight motion reflected at the frame edges; returns (positions, number of frames with a bounce)."""
    (x, y), (vx, vy), (w, h) = start, vel, wh
    path, bounces = [], 0
    for _ in range(frames):
        path.append((round(x), round(y)))
        x, y, hit = x + vx, y + vy, False
        if not 0 <= x <= size - w:
            vx, x, hit = -vx, min(max(x, 0), size - w), True
        if not 0 <= y <= size - h:
            vy, y, hit = -vy, min(max(y, 0), size - h), True
        bounces += hit
    return path, bounces


def bounce_clip(obj: dict, target: int, bg: Image.Image, frames: int, rng: random.Random) -> tuple | None:
    """One object bouncing off the edges exactly `target` times (rejection sampling; None if not found)."""
    size, (w, h) = bg.width, obj["sprite"].size
    for _ in range(300):
        ang, speed = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 6.0) * 16 / frames
        start = (rng.uniform(0, size - w), rng.uniform(0, size - h))
        path, n = bounce_path(start, (speed * math.cos(ang), speed * math.sin(ang)), size, (w, h), frames)
        if n == target:
            break
    else:
        return None
    name = obj["name"]
    qa = [make_qa(f"How many times does {name} bounce off the edges?", [n, NUM_WORDS[n]], ["0", "1", "2", "3"]),
          make_qa(f"Does {name} bounce off an edge?", ["yes" if n else "no"], ["yes", "no"])]
    times = "once" if n == 1 else f"{NUM_WORDS[n]} times"
    caption = f"{name.capitalize()} moves without touching the edges." if n == 0 else \
        f"{name.capitalize()} bounces off the edges {times}."
    return render(bg, [(obj["sprite"], path)]), caption, qa, {"bounces": n}


# ---- building ------------------------------------------------------------------------------------------------

def split_clips(split: str, pools: dict, cfg: dict) -> list[dict]:
    """All clips of one split, from that split's source images only; returns sample dicts ready to write."""
    size, frames, fps, px = int(cfg["size"]), int(cfg["frames"]), int(cfg["fps"]), int(cfg["sprite_px"])
    rng = random.Random(f"{cfg['seed']}:{split}:video")
    usable = {s: [r for r in pools.get(s, []) if s != "tuxpaint" or len(r["label"].split()) <= 3]
              for s in cfg["sources"]}
    sources = [s for s, recs in usable.items() if len({r["label"] for r in recs}) >= 3]
    items: list[dict] = []
    for family, total in cfg["clips"].items():
        n_val = int(round(int(total) * float(cfg["val_frac"])))
        for i in range(n_val if split == "val" else int(total) - n_val):
            if not sources:
                break
            src = sources[i // 4 % len(sources)]  # i % 4 picks the direction / bounce count: balanced answers
            recs = usable[src]
            picked = [rng.choice(recs)]
            while len(picked) < 3:  # distinct labels, so names in a question are unambiguous
                r = rng.choice(recs)
                if r["label"] not in {p["label"] for p in picked}:
                    picked.append(r)
            objs = [make_object(r, px) for r in picked]
            bg = background(src, size, rng)
            if family == "direction":
                out = direction_clip(objs[0], list(DIRECTIONS)[i % 4], bg, frames, rng)
            elif family == "order":
                out = order_clip(objs[0], objs[1], bg, frames, rng)
            elif family == "which_moved":
                out = which_moved_clip(objs[: 2 + i % 2], bg, frames, rng)
            elif family == "bounces":
                out = bounce_clip(objs[0], i % 4, bg, frames, rng)
            else:
                raise ValueError(f"unknown video family {family!r}")
            if out is None:
                continue
            video, caption, qa, motion = out
            used = 1 if family in ("direction", "bounces") else (2 if family == "order" else 2 + i % 2)
            items.append({"video": video, "caption": caption, "meta": {
                "source": f"video/{src}", "family": family, "label": qa[0]["answers"][0], "fps": fps,
                "frames": frames, "width": size, "height": size, "qa": qa, "motion": motion, "split": split,
                "source_ids": [o["source_id"] for o in objs[:used]]}})
    return items


def build_video_kit(cache_dir, out_dir, cfg: dict | None = None) -> dict:
    """Build out_dir/video/{train,val}-XXXXXX.tar and manifest.json; return the manifest."""
    cfg = {**DEFAULTS, **(cfg or {})}
    cfg["clips"] = {**DEFAULTS["clips"], **((cfg or {}).get("clips") or {})}
    pool_cfg = {"size": cfg["size"], "seed": cfg["seed"], "tuxpaint": "tuxpaint" in cfg["sources"],
                "fashion_mnist": cfg["pool"].get("fashion_mnist", 0) if "fashion_mnist" in cfg["sources"] else 0,
                "mnist": cfg["pool"].get("mnist", 0) if "mnist" in cfg["sources"] else 0}
    pools = load_pools(cache_dir, pool_cfg)
    out = Path(out_dir) / "video"
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        stale.unlink()
    manifest: dict = {"config": cfg, "splits": {}}
    vf, seed = float(cfg["val_frac"]), int(cfg["seed"])
    for split in ("train", "val"):
        sp = {n: [r for r in recs if split_of(r["source_id"], vf, seed) == split] for n, recs in pools.items()}
        items = split_clips(split, sp, cfg)
        random.Random(f"{seed}:{split}:video-order").shuffle(items)
        samples = ({"__key__": f"{split}_{i:06d}", "mp4": encode_mp4(it["video"], cfg["fps"], cfg["crf"]),
                    "txt": it["caption"].encode("utf-8"), "json": json.dumps(it["meta"], sort_keys=True).encode()}
                   for i, it in enumerate(items))
        shards = write_shards(samples, out, split, int(cfg["shard_size"]))
        manifest["splits"][split] = {
            "clips": len(items), "shards": [p.name for p in shards],
            "shard_bytes": sum(p.stat().st_size for p in shards),
            "by_family": dict(sorted(Counter(it["meta"]["family"] for it in items).items())),
            "by_source": dict(sorted(Counter(it["meta"]["source"] for it in items).items())),
            "answers": {f: dict(sorted(Counter(it["meta"]["label"] for it in items
                                               if it["meta"]["family"] == f).items()))
                        for f in ("direction", "bounces")},
            "source_images": len({s for it in items for s in it["meta"]["source_ids"]}),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest
