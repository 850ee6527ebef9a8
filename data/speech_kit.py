"""The speech part of the real data kit (DATA.md §4): real sentences spoken by several TTS engines and voices.

Writes out_dir/audio/{train,val}-XXXXXX.tar with members `flac` (16 kHz mono), `txt` (what is spoken) and `json`
{language, voice, engine, duration, task: asr|ast|sqa, source, rate, pitch, speed, snr_db, translation?: {lang,
text}, question?, answer?}. Evaluation holds out whole VOICES: val is spoken only by `heldout_voices`, train never
by them; val texts are also disjoint from train texts (a stable hash of the text). Train audio is augmented
(speed perturbation, additive white/pink/brown noise at a random SNR, random gain); val audio is clean.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
from num2words import num2words
from webdataset import TarWriter

from data import tts
from data.fetch import PINS, TTS_KEYS, fetch_text
from data.text_kit import brown_documents

DEFAULTS: dict = {
    "seed": 0,
    "engines": list(tts.ENGINES),
    "engine_weights": {"espeak": 0.4, "flite": 0.35, "festival": 0.25},
    "voices": None,  # explicit voice ids to use (default: every voice of every available engine)
    "heldout_voices": ["espeak:en-gb-scotland+f4", "espeak:en-029+m7", "flite:awb"],
    "n_asr": 2400, "caption_share": 0.25,  # ASR utterances; this share are Tux Paint captions, the rest Brown
    "n_ast": 600, "ast_languages": ["es", "fr", "de"],  # or "auto": the best-covered plain language codes
    "n_sqa": 300,
    "val_frac": 0.1,  # share of texts (so of utterances) held out for val
    "min_words": 3, "max_words": 12,  # Brown sentences
    "rate": [0.8, 1.25], "pitch": [0.8, 1.25], "speed": [0.95, 1.05],
    "noise_prob": 0.6, "snr_db": [5.0, 30.0], "peak": [0.25, 0.9],
    "shard_size": 500, "processes": 2, "chunk": 24,
    "sentences": None, "captions": None,  # in-memory text sources (tests): skip fetching Brown / Tux Paint
}
_CLEAN = re.compile(r"[A-Za-z][A-Za-z ,.'!?;:-]*[.!?]?")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey")
KINDS = {"animals": "an animal", "food": "food", "plants": "a plant", "clothes": "clothing",
         "vehicles": "a vehicle", "household": "a household object", "sports": "sports equipment"}


def number_word(n: int) -> str:
    """n as English words ("twenty-one")."""
    return num2words(n)


def _text_split(text: str, val_frac: float = DEFAULTS["val_frac"], seed: int = DEFAULTS["seed"]) -> str:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{text.lower()}".encode()).digest()[:8], "big")
    return "val" if h / 2 ** 64 < val_frac else "train"


def held_out_text(text: str) -> bool:
    """Would the speech kit (default split) hold this text out for val? Other kits keep such texts out of training."""
    return _text_split(_clean(text) or " ".join(text.split())) == "val"


def _clean(text: str) -> str | None:
    t = " ".join(text.replace("’", "'").replace("‘", "'").split())
    return t if _CLEAN.fullmatch(t) else None


def brown_sentences(brown_dir, min_words: int = 3, max_words: int = 12) -> list[str]:
    """Distinct Brown sentences of min..max words made only of letters and plain punctuation (no digits)."""
    out: dict[str, None] = {}
    for doc in brown_documents(brown_dir):
        for para in doc["text"].split("\n\n"):
            for s in re.split(r"(?<=[.!?])\s+", para):
                s = _clean(s)
                if s and s[-1] in ".!?" and min_words <= len(s.split()) <= max_words:
                    out.setdefault(s)
    return list(out)


def load_captions(cache_dir) -> list[dict]:
    """Tux Paint stamps [{caption, category, label?, translations}] via the image kit; [] (one warning) if absent."""
    try:
        from data.image_kit import tuxpaint_stamps
        return tuxpaint_stamps(cache_dir, require_image=False)
    except Exception as e:  # the image kit is optional here: speech still builds from Brown alone
        print(f"[speech] warning: no Tux Paint captions ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
        return []


def _ast_languages(captions: list[dict], want) -> list[str]:
    if want != "auto":
        return list(want)
    cover = Counter(lang for c in captions for lang in c.get("translations", {}) if re.fullmatch(r"[a-z]{2}", lang))
    return [lang for lang, _ in sorted(cover.items(), key=lambda kv: (-kv[1], kv[0])) if lang != "en"][:3]


def sqa_items(captions: list[dict], rng: random.Random) -> list[dict]:
    """Template spoken-QA pairs, interleaved by kind: arithmetic, counting, colours and kinds of things from captions.

    A colour question ("a brown hen." -> hen: brown) is kept only when all captions naming that thing agree.
    """
    w = number_word
    arith = [(f"What is {w(a)} plus {w(b)}?", w(a + b)) for a in range(11) for b in range(11)]
    arith += [(f"What is {w(a)} minus {w(b)}?", w(a - b)) for a in range(11) for b in range(a + 1)]
    arith += [(f"What is {w(a)} times {w(b)}?", w(a * b)) for a in range(6) for b in range(6)]
    count = [(f"What number comes after {w(n)}?", w(n + 1)) for n in range(20)]
    count += [(f"What number comes before {w(n)}?", w(n - 1)) for n in range(1, 21)]
    colours: dict[str, set] = defaultdict(set)
    kinds: dict[str, str] = {}
    for c in captions:
        for m in re.finditer(rf"\b({'|'.join(COLOURS)})\s+([a-z]{{3,}})(?=[.!?,;]|$)", c["caption"].lower()):
            if m.group(2) not in COLOURS and m.group(2) not in ("and", "with", "the", "of", "or"):
                colours[m.group(2)].add(m.group(1).replace("grey", "gray"))
        label = c.get("label") or ""
        if c.get("category") in KINDS and _clean(label) and 1 <= len(label.split()) <= 3:
            kinds.setdefault(f"What kind of thing is {'an' if label[0] in 'aeiou' else 'a'} {label}?",
                             KINDS[c["category"]])
    colour = [(f"What colour is the {noun}?", cs.pop()) for noun, cs in sorted(colours.items()) if len(cs) == 1]
    groups = [arith, count, colour, sorted(kinds.items())]
    for g in groups:
        rng.shuffle(g)
    mixed = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]  # round robin by kind
    return [{"task": "sqa", "text": q, "source": "template", "question": q, "answer": a} for q, a in mixed]


def plan_items(cfg: dict, sentences: list[str], captions: list[dict]) -> list[dict]:
    """Choose the texts of every utterance: [{task, text, source, split, translation?, question?, answer?}]."""
    rng = random.Random(cfg["seed"])
    clean_caps = {}
    for c in captions:
        t = _clean(c["caption"])
        if t and 1 <= len(t.split()) <= 20:
            clean_caps.setdefault(t, c)
    caps = list(clean_caps.items())
    rng.shuffle(caps)
    n_cap = min(len(caps), round(cfg["n_asr"] * cfg["caption_share"])) if caps else 0
    sents = list(sentences)
    rng.shuffle(sents)
    items = [{"task": "asr", "text": t, "source": "tuxpaint"} for t, _ in caps[:n_cap]]
    items += [{"task": "asr", "text": s, "source": "brown"} for s in sents[: cfg["n_asr"] - n_cap]]
    langs = _ast_languages(captions, cfg["ast_languages"])
    ast = [{"task": "ast", "text": t, "source": "tuxpaint", "translation": {"lang": lang, "text": tr[lang]}}
           for t, c in caps for tr in [c.get("translations", {})] for lang in langs if tr.get(lang)]
    rng.shuffle(ast)
    items += ast[: cfg["n_ast"]]
    items += sqa_items([c for _, c in caps], rng)[: cfg["n_sqa"]]
    for it in items:
        it["split"] = _text_split(it["text"], cfg["val_frac"], cfg["seed"])
    return items


def voice_pools(cfg: dict, engines: list[str]) -> dict[str, dict[str, list[str]]]:
    """{"train"|"val": {engine: [voice ids]}}; val = the held-out voices, train = every other voice."""
    known = {e: [tts.Voice(e, v).id for v in tts.ENGINE_CLASSES[e].voices] for e in tts.ENGINES}
    wanted = cfg["voices"] or [v for e in engines for v in known[e]]
    for v in list(wanted) + list(cfg["heldout_voices"]):
        eng = tts.Voice.parse(v).engine
        if v not in known[eng]:
            raise ValueError(f"unknown voice {v!r}; {eng} has {known[eng]}")
    held = set(cfg["heldout_voices"])
    pools: dict = {"train": defaultdict(list), "val": defaultdict(list)}
    for v in dict.fromkeys(list(wanted) + list(held)):
        eng = tts.Voice.parse(v).engine
        if eng in engines:
            pools["val" if v in held else "train"][eng].append(v)
    return {s: dict(p) for s, p in pools.items()}


def assign(items: list[dict], pools: dict, cfg: dict) -> list[dict]:
    """Draw voice, prosody and augmentation for each item (seeded: independent of worker scheduling)."""
    rng = random.Random(cfg["seed"] + 1)
    out = []
    for i, it in enumerate(items):
        pool = pools[it["split"]]
        if not pool:
            continue
        engines = sorted(pool)
        weights = [cfg["engine_weights"].get(e, 1.0) for e in engines]
        eng = rng.choices(engines, weights)[0]
        train = it["split"] == "train"
        u = lambda lo_hi: rng.uniform(*lo_hi)  # noqa: E731
        job = dict(it, index=i, engine=eng, voice=rng.choice(pool[eng]), rate=round(u(cfg["rate"]), 3),
                   pitch=round(u(cfg["pitch"]), 3), speed=round(u(cfg["speed"]), 3) if train else 1.0,
                   snr_db=round(u(cfg["snr_db"]), 1) if train and rng.random() < cfg["noise_prob"] else None,
                   noise=rng.choice(["white", "pink", "brown"]), peak=round(u(cfg["peak"]), 3) if train else 0.7,
                   noise_seed=rng.getrandbits(32))
        out.append(job)
    return out


_WORKER_ENGINES: dict = {}
_WORKER_SPECS: dict = {}


def _init_worker(specs: dict) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER_SPECS.clear()
    _WORKER_SPECS.update(specs)


def _render(jobs: list[dict]) -> list[tuple[int, bytes | None, float]]:
    """Synthesise one engine's chunk of jobs -> [(index, flac bytes or None, seconds)]."""
    name = jobs[0]["engine"]
    key = (name, _WORKER_SPECS[name])
    if key not in _WORKER_ENGINES:
        _WORKER_ENGINES[key] = tts.make_engine(name, _WORKER_SPECS[name])
    eng = _WORKER_ENGINES[key]
    raw = eng.synth_many([(j["text"], tts.Voice.parse(j["voice"]).name, j["rate"], j["pitch"]) for j in jobs])
    out = []
    for j, r in zip(jobs, raw):
        if r is None or r[0].size == 0:
            out.append((j["index"], None, 0.0))
            continue
        wav = tts.trim_silence(tts.to_16k(r[0], r[1], j["speed"]))  # (T,) float32 16 kHz
        if j["snr_db"] is not None:
            wav = tts.add_noise(wav, j["snr_db"], np.random.default_rng(j["noise_seed"]), j["noise"])
        wav = wav * (j["peak"] / max(float(np.abs(wav).max()), 1e-6))
        buf = io.BytesIO()
        sf.write(buf, wav, tts.SR, format="FLAC", subtype="PCM_16")
        out.append((j["index"], buf.getvalue(), len(wav) / tts.SR))
    return out


def render_all(jobs: list[dict], specs: dict, processes: int = 2, chunk: int = 24) -> dict[int, tuple]:
    """Render every job (grouped by engine, festival sorted by voice) with a spawn pool; {index: (flac, sec)}."""
    chunks = []
    for eng in sorted({j["engine"] for j in jobs}):
        mine = sorted((j for j in jobs if j["engine"] == eng), key=lambda j: (j["voice"], j["index"]))
        chunks += [mine[k:k + chunk] for k in range(0, len(mine), chunk)]
    results: dict[int, tuple] = {}

    def collect(parts) -> None:
        for part in parts:
            for idx, data, sec in part:
                results[idx] = (data, sec)

    if processes <= 1:
        _WORKER_SPECS.update(specs)  # in this process: leave its torch thread count alone
        collect(map(_render, chunks))
    else:
        with multiprocessing.get_context("spawn").Pool(processes, _init_worker, (specs,)) as pool:
            collect(pool.imap_unordered(_render, chunks))
    return results


def _meta(j: dict, sec: float) -> dict:
    m = {"language": "en", "voice": j["voice"], "engine": j["engine"], "duration": round(sec, 3), "task": j["task"],
         "source": j["source"], "rate": j["rate"], "pitch": j["pitch"], "speed": j["speed"], "snr_db": j["snr_db"],
         "noise": j["noise"] if j["snr_db"] is not None else None}
    for k in ("translation", "question", "answer"):
        if k in j:
            m[k] = j[k]
    return m


def _counts(rows: list[tuple[str, float]]) -> dict:
    acc: dict = defaultdict(lambda: [0, 0.0])
    for k, sec in rows:
        acc[k][0] += 1
        acc[k][1] += sec
    return {k: {"utterances": n, "hours": round(s / 3600, 4)} for k, (n, s) in sorted(acc.items())}


_ENGINE_NOTES = {"espeak": "espeak-ng 1.52 (GPL-3)", "flite": "CMU flite 2.2 (BSD-style)",
                 "festival": "Festival 2.5 with the kal/ked diphone and CMU ARCTIC slt HTS voices (free licences)"}


def _attribution(engines: list[str], captions: bool) -> str:
    keys = sorted({k for e in engines for k in TTS_KEYS[e]})
    rows = "".join(f"| {k} | `{PINS[k].spec}` | `{PINS[k].sha256}` |\n" for k in keys)
    text = "Brown Corpus (redistribution permitted)" + (
        ", Tux Paint stamp captions and their translations (GPL-2)" if captions else "")
    return (f"# Attribution for the built speech kit\n\nDerived data: never commit it. Text: {text}.\n"
            f"Speech synthesised with {'; '.join(_ENGINE_NOTES[e] for e in engines)}; the Debian packages' "
            f"licences are in share/doc/*/copyright of their folders in the data cache.\n\n"
            "| pin | fetched as | sha256 |\n|---|---|---|\n" + rows)


def _builtin(v):
    """Plain dicts/lists from config containers (e.g. OmegaConf), so the manifest is plain JSON."""
    if hasattr(v, "items"):
        return {k: _builtin(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        return [_builtin(x) for x in v]
    return v


def build_speech_kit(cache_dir, out_dir, cfg: dict | None = None) -> dict:
    """Synthesise the audio-text kit into out_dir/audio/{train,val}-XXXXXX.tar + manifest.json; return the manifest.

    cfg keys: see DEFAULTS (unknown keys are an error). Engines that cannot be fetched or run are skipped with one
    warning each; held-out voices of a skipped engine simply do not occur.
    """
    t0 = time.time()
    unknown = set(cfg or {}) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown speech kit keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **_builtin(cfg or {})}
    sentences = cfg["sentences"]
    if sentences is None:
        sentences = brown_sentences(fetch_text(Path(cache_dir), progress=False)["brown"], cfg["min_words"],
                                    cfg["max_words"])
    captions = load_captions(cache_dir) if cfg["captions"] is None else cfg["captions"]
    specs = tts.load_engines(cache_dir, cfg["engines"])
    if not specs:
        raise RuntimeError("no speech engine is available (see the warnings above)")
    pools = voice_pools(cfg, list(specs))
    jobs = assign(plan_items(cfg, sentences, captions), pools, cfg)
    results = render_all(jobs, specs, cfg["processes"], cfg["chunk"])
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*audio_dir.glob("train-*.tar"), *audio_dir.glob("val-*.tar")]:
        stale.unlink()
    manifest: dict = {"engines": {e: (str(s) if s else "installed espeakng_loader") for e, s in specs.items()},
                      "skipped_engines": [e for e in cfg["engines"] if e not in specs],
                      "heldout_voices": sorted(v for p in pools["val"].values() for v in p),
                      "ast_languages": _ast_languages(captions, cfg["ast_languages"]),
                      "config": {k: v for k, v in cfg.items() if k not in ("sentences", "captions")},
                      "failed": dict(Counter(j["engine"] for j in jobs if results.get(j["index"], (None,))[0] is None)),
                      "splits": {}}
    rng = random.Random(cfg["seed"] + 2)
    for split in ("train", "val"):
        done = [j for j in jobs if j["split"] == split and results.get(j["index"], (None,))[0] is not None]
        rng.shuffle(done)  # mix engines, voices and tasks across shards
        shards: list[Path] = []
        writer = None
        try:
            for n, j in enumerate(done):
                if n % cfg["shard_size"] == 0:
                    if writer is not None:
                        writer.close()
                    shards.append(audio_dir / f"{split}-{len(shards):06d}.tar")
                    writer = TarWriter(str(shards[-1]), mtime=0.0)
                data, sec = results[j["index"]]
                writer.write({"__key__": f"{split}_{j['task']}_{j['index']:06d}", "flac": data,
                              "txt": j["text"].encode("utf-8"),
                              "json": json.dumps(_meta(j, sec), sort_keys=True, ensure_ascii=False).encode("utf-8")})
        finally:
            if writer is not None:
                writer.close()
        secs = [results[j["index"]][1] for j in done]
        manifest["splits"][split] = {
            "utterances": len(done), "hours": round(sum(secs) / 3600, 4), "shards": [p.name for p in shards],
            "by_engine": _counts([(j["engine"], s) for j, s in zip(done, secs)]),
            "by_voice": _counts([(j["voice"], s) for j, s in zip(done, secs)]),
            "by_task": _counts([(j["task"], s) for j, s in zip(done, secs)]),
            "by_source": _counts([(j["source"], s) for j, s in zip(done, secs)]),
            "by_translation_lang": dict(Counter(j["translation"]["lang"] for j in done if "translation" in j)),
        }
    manifest["total_utterances"] = sum(s["utterances"] for s in manifest["splits"].values())
    manifest["total_hours"] = round(sum(s["hours"] for s in manifest["splits"].values()), 4)
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (audio_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (audio_dir / "ATTRIBUTION.md").write_text(_attribution(list(specs), bool(captions)))
    return manifest
