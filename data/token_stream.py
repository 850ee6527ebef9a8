"""Pretraining token streams: documents -> one flat token array per source -> packed windows with document ids.

Windows are drawn by a generator seeded with (seed, step, micro-batch), so the data order is a pure function of the
step: a resumed run sees exactly the batches the uninterrupted one would have, and every world size sees the same
global batch. (Our own sampler because webdataset's shuffle buffers cannot be rewound to an exact step.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

IGNORE = -100


@dataclass
class TokenSource:
    """All documents of one source as [BOS] doc [EOS] runs in one uint32 array; `starts` are run offsets."""

    tokens: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, starts=self.starts)

    @classmethod
    def load(cls, path: Path) -> "TokenSource":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["tokens"], z["starts"])


def tokenize_docs(texts: Iterable[str], tok) -> TokenSource:
    """Encode documents as [BOS] text [EOS] and concatenate them."""
    chunks, starts, pos = [], [], 0
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        starts.append(pos)
        chunks.append(np.asarray(ids, dtype=np.uint32))
        pos += len(ids)
    if not chunks:
        raise ValueError("no documents to tokenize")
    return TokenSource(np.concatenate(chunks), np.asarray(starts, dtype=np.int64))


def normalise_mix(mix: dict[str, float], available: Iterable[str]) -> dict[str, float]:
    """Mixture weights over the available sources (equal weights when mix is empty); unknown names are an error."""
    available = sorted(available)
    if not mix:
        return {s: 1.0 / len(available) for s in available}
    unknown = sorted(set(mix) - set(available))
    if unknown:
        raise ValueError(f"data mix names source {unknown[0]!r}, but the shards hold only {available}")
    total = sum(w for w in mix.values() if w > 0)
    if total <= 0:
        raise ValueError("data mix weights must have a positive sum")
    return {s: w / total for s, w in sorted(mix.items()) if w > 0}


class PackedSampler:
    """Draws (tokens, labels, doc_ids) windows of a given length from weighted sources, deterministically per step.

    repeat_frac: the share of windows that start with a span of text read twice (its length, hence the distance to
    its copy, drawn per window from [8, seq_len / 2], so no fixed offset finds it), then the text goes on: copy
    data, from which induction heads form (Olsson et al. 2022)."""

    def __init__(self, sources: dict[str, TokenSource], mix: dict[str, float], seed: int, repeat_frac: float = 0.0):
        if not 0.0 <= repeat_frac <= 1.0:
            raise ValueError(f"repeat_frac must be in [0, 1], got {repeat_frac}")
        self.repeat_frac = repeat_frac
        self.sources = sources
        self.mix = normalise_mix(mix, sources)
        self.names = list(self.mix)
        self.probs = np.array([self.mix[n] for n in self.names])
        self.seed = seed

    def batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The global micro-batch `micro` of step `step`: tokens/labels/doc_ids, each (batch_size, seq_len)."""
        rng = np.random.default_rng([self.seed, step, micro])
        picks = rng.choice(len(self.names), size=batch_size, p=self.probs)
        copy_len = np.zeros(batch_size, dtype=np.int64)  # per window: a span of h tokens read twice (0: none)
        if self.repeat_frac:  # its own stream, so 0 keeps the old windows
            rep_rng = np.random.default_rng([self.seed, step, micro, 1])
            repeat = rep_rng.random(batch_size) < self.repeat_frac
            copy_len = np.where(repeat, rep_rng.integers(min(8, seq_len // 2), seq_len // 2 + 1, batch_size), 0)
        rows_t, rows_d = [], []
        for src_idx, h in zip(picks, copy_len.tolist()):
            src = self.sources[self.names[src_idx]]
            if len(src) < seq_len + 1:
                raise ValueError(f"source {self.names[src_idx]!r} has {len(src)} tokens, fewer than seq_len+1={seq_len + 1}")
            off = int(rng.integers(0, len(src) - seq_len))
            pos = np.concatenate([np.arange(off, off + h), np.arange(off, off + seq_len + 1 - h)])  # (seq_len + 1,)
            rows_t.append(src.tokens[pos].astype(np.int64))
            rows_d.append(np.searchsorted(src.starts, pos, side="right"))
        win = torch.from_numpy(np.stack(rows_t))  # (B, T+1)
        doc = torch.from_numpy(np.stack(rows_d))  # (B, T+1)
        doc = doc - doc[:, :1]
        labels = win[:, 1:].clone()
        labels[doc[:, 1:] != doc[:, :-1]] = IGNORE  # never predict across a document boundary
        return {"tokens": win[:, :-1].contiguous(), "labels": labels, "doc_ids": doc[:, :-1].contiguous()}


def eval_windows(doc_tokens: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Cut each [BOS]+doc token list into windows of <= seq_len predictions (each window re-starts its context).

    Returns tokens/labels (padded; labels IGNORE on padding), each (N, seq_len); every doc token is predicted once.
    """
    toks, labs = [], []
    for ids in doc_tokens:
        for s in range(0, len(ids) - 1, seq_len):
            chunk = ids[s:s + seq_len + 1]
            x, y = chunk[:-1], chunk[1:]
            pad = seq_len - len(x)
            toks.append(x + [pad_id] * pad)
            labs.append(y + [IGNORE] * pad)
    return {"tokens": torch.tensor(toks, dtype=torch.long), "labels": torch.tensor(labs, dtype=torch.long)}
