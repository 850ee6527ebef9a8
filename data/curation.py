"""Image-text curation after PAPER.md §8.1, at our scale.

Each step takes a list of records (dicts with at least "caption"; some need "image" or "hash") and returns
(kept, removed) where `removed` is a Counter {reason: count} that the kit builders put into the manifest:
caption quality filters, exact and perceptual near-duplicate removal (dHash + union-find connected components,
keep one per component), MetaCLIP-style entry (n-gram) balancing with threshold T, and a CLIP-score filter hook.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np
from PIL import Image

STOPWORDS = frozenset("a an the of and or in on at to for with by from is are was be this that it its as".split())
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


# ---- caption quality --------------------------------------------------------------------------------------

def caption_reason(caption: str, min_words: int = 1, max_words: int = 60, min_alpha: float = 0.6) -> str | None:
    """Return why a caption is low quality (None if fine): caption_empty/too_short/too_long/low_alpha."""
    text = (caption or "").strip()
    if not text:
        return "caption_empty"
    words = text.split()
    if len(words) < min_words:
        return "caption_too_short"
    if len(words) > max_words:
        return "caption_too_long"
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) / len(chars) < min_alpha:
        return "caption_low_alpha"
    return None


def filter_captions(records: Sequence[dict], min_words: int = 1, max_words: int = 60,
                    min_alpha: float = 0.6) -> tuple[list[dict], Counter]:
    """Drop records with low-quality captions (caption_reason) and exact (image bytes, caption) duplicates."""
    kept, removed, seen = [], Counter(), set()
    for r in records:
        reason = caption_reason(r.get("caption", ""), min_words, max_words, min_alpha)
        if reason is None:
            img = r.get("image")
            digest = hashlib.sha1(np.asarray(img).tobytes()).hexdigest() if img is not None else None
            sig = (digest, " ".join(r["caption"].lower().split()))
            if digest is not None and sig in seen:
                reason = "exact_duplicate"
            seen.add(sig)
        if reason is None:
            kept.append(r)
        else:
            removed[reason] += 1
    return kept, removed


# ---- perceptual near-duplicates ---------------------------------------------------------------------------

def dhash(image, size: int = 16) -> int:
    """Difference hash: the size*size signs of horizontal gradients of a (size, size+1) grey thumbnail, as an int.

    Own code: `imagehash` would pull scipy and PyWavelets in for these few lines; the paper's SSCD embeddings
    are a model we do not have. 16 (256 bits), not the usual 8: on small cut-out objects 64 bits merge
    unrelated thin shapes (a pen, a candle, a bassoon).
    """
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    grey = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()  # (size*size,)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        """Return the root of i's set."""
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        """Merge the sets of i and j."""
        a, b = self.find(i), self.find(j)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def near_duplicate_components(hashes: Sequence[int], max_hamming: int = 2, block: int = 256) -> list[list[int]]:
    """Group indices whose hashes are within `max_hamming` bits (transitively): the connected components.

    All pairs in numpy blocks (n^2/2 popcounts: fine to ~50k images; the paper's FAISS/k-means is for billions).
    """
    n = len(hashes)
    nbytes = max(1, (max((int(x).bit_length() for x in hashes), default=1) + 7) // 8)
    h = np.array([np.frombuffer(int(x).to_bytes(nbytes, "big"), np.uint8) for x in hashes]).reshape(n, nbytes)
    uf = UnionFind(n)
    for start in range(0, n, block):
        a = h[start:start + block]  # (b, nbytes)
        dist = _POP8[a[:, None, :] ^ h[None, :, :]].sum(-1)  # (b, n) Hamming distances
        ii, jj = np.nonzero(dist <= max_hamming)
        for i, j in zip(ii + start, jj):
            if i < j:
                uf.union(int(i), int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def dedup_near(records: Sequence[dict], max_hamming: int = 2) -> tuple[list[dict], Counter]:
    """Keep one record per near-duplicate component (the one with the longest caption, then the first).

    Records need "hash" (from `dhash`) or "image". Removed ones count as "near_duplicate".
    """
    hashes = [r["hash"] if "hash" in r else dhash(r["image"]) for r in records]
    keep_idx = []
    for comp in near_duplicate_components(hashes, max_hamming):
        keep_idx.append(max(comp, key=lambda i: (len(records[i].get("caption", "")), -i)))
    keep = sorted(keep_idx)
    return [records[i] for i in keep], Counter({"near_duplicate": len(records) - len(keep)})


# ---- MetaCLIP-style balancing -----------------------------------------------------------------------------

def caption_entries(caption: str, ngrams: Sequence[int] = (1, 2), vocabulary: set | None = None) -> set[str]:
    """The metadata entries a caption matches: its lower-case word n-grams (no stop-word-only unigrams),
    restricted to `vocabulary` when one is given (MetaCLIP matches a fixed entry list)."""
    words = _WORD.findall(caption.lower())
    out = set()
    for n in ngrams:
        for i in range(len(words) - n + 1):
            gram = words[i:i + n]
            if n == 1 and gram[0] in STOPWORDS:
                continue
            if all(w in STOPWORDS for w in gram):
                continue
            out.add(" ".join(gram))
    return out if vocabulary is None else out & vocabulary


def balance_entries(records: Sequence[dict], threshold: int, power: float = 1.0, seed: int = 0,
                    ngrams: Sequence[int] = (1, 2), vocabulary: set | None = None) -> tuple[list[dict], Counter]:
    """MetaCLIP balancing: keep a record if any entry has count <= T ("tail"), else sample each entry with
    probability (T / count)^power and keep the record if any is sampled.

    power=1 is MetaCLIP's T/count; power=0.5 is the paper's sqrt(T/f_i) (PAPER.md §8.1). Records whose caption
    has no entry are kept. Deterministic for a seed. Removed ones count as "balanced_out".
    """
    entries = [caption_entries(r.get("caption", ""), ngrams, vocabulary) for r in records]
    counts = Counter(e for es in entries for e in es)
    rng = random.Random(seed)
    kept, removed = [], Counter()
    for r, es in zip(records, entries):
        keep = not es or any(counts[e] <= threshold for e in es)
        if not keep:
            keep = any(rng.random() < (threshold / counts[e]) ** power for e in sorted(es))
        if keep:
            kept.append(r)
        else:
            removed["balanced_out"] += 1
    return kept, removed


def entry_counts(records: Sequence[dict], ngrams: Sequence[int] = (1, 2)) -> Counter:
    """Counter of caption entries over records (to report the head of the distribution before/after)."""
    return Counter(e for r in records for e in caption_entries(r.get("caption", ""), ngrams))


# ---- CLIP-score hook --------------------------------------------------------------------------------------

def clip_filter(records: Sequence[dict], score: Callable | None, threshold: float) -> tuple[list[dict], Counter]:
    """Drop records with score(image, caption) < threshold ("clip_below_threshold"); a no-op while score is None
    (no CLIP model trained yet)."""
    if score is None:
        return list(records), Counter()
    kept, removed = [], Counter()
    for r in records:
        if float(score(r["image"], r["caption"])) >= threshold:
            kept.append(r)
        else:
            removed["clip_below_threshold"] += 1
    return kept, removed


def curate(records: Sequence[dict], cfg: dict | None = None, score: Callable | None = None) -> tuple[list, dict]:
    """Run the steps in the paper's order (captions, near-dups, CLIP score, balancing); return (kept, report).

    cfg keys (all optional): min_words, max_words, min_alpha, max_hamming (None: no near-dup step),
    clip_threshold, balance_T (None: no balancing), balance_power, seed.
    """
    cfg = dict(cfg or {})
    report: dict = {"input": len(records)}
    kept, removed = filter_captions(records, cfg.get("min_words", 1), cfg.get("max_words", 60),
                                    cfg.get("min_alpha", 0.6))
    report["caption_filter"] = dict(removed)
    if cfg.get("max_hamming") is not None:
        kept, removed = dedup_near(kept, int(cfg["max_hamming"]))
        report["near_dedup"] = dict(removed)
    kept, removed = clip_filter(kept, score, float(cfg.get("clip_threshold", 0.0)))
    report["clip_filter"] = dict(removed) if score is not None else "skipped (no score function)"
    if cfg.get("balance_T") is not None:
        kept, removed = balance_entries(kept, int(cfg["balance_T"]), float(cfg.get("balance_power", 1.0)),
                                        int(cfg.get("seed", 0)))
        report["balance"] = dict(removed)
    report["output"] = len(kept)
    return kept, report
