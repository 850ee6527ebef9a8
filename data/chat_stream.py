"""Post-training batches: chat dialogs packed with a document mask (SFT), and padded preference pairs (RM, DPO).

As in pretraining, every batch is a pure function of (seed, step, micro-batch), so resume is exact.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from data.token_stream import IGNORE


@dataclass
class Dialog:
    """One encoded dialog: token ids and the positions trained on (assistant content + its end-of-turn)."""

    ids: np.ndarray  # (L,) int64
    train: np.ndarray  # (L,) bool


def encode_dialogs(examples: list[dict], fmt, max_len: int) -> tuple[list[Dialog], int]:
    """ChatFormat-encode examples' messages; returns (dialogs that fit in max_len tokens, number dropped)."""
    out, dropped = [], 0
    for ex in examples:
        ids, mask = fmt.encode_dialog(ex["messages"], add_generation_prompt=False)
        if len(ids) > max_len or not any(mask):
            dropped += 1
            continue
        out.append(Dialog(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    return out, dropped


class ChatPacker:
    """Packs randomly drawn dialogs into rows of seq_len+1 tokens; loss only on assistant tokens, never across dialogs."""

    def __init__(self, dialogs: list[Dialog], pad_id: int, seed: int):
        if not dialogs:
            raise ValueError("no dialogs to train on")
        self.dialogs, self.pad_id, self.seed = dialogs, pad_id, seed

    def _row(self, rng: np.random.Generator, width: int):
        toks, train, doc, used, d = [], [], [], 0, 0
        for _ in range(8):  # a few draws to fill the row; a dialog that does not fit is skipped
            dlg = self.dialogs[int(rng.integers(len(self.dialogs)))]
            if used + len(dlg.ids) > width:
                if used == 0:
                    dlg = Dialog(dlg.ids[:width], dlg.train[:width])
                else:
                    continue
            toks.append(dlg.ids)
            train.append(dlg.train)
            doc.append(np.full(len(dlg.ids), d))
            used += len(dlg.ids)
            d += 1
        pad = width - used
        toks.append(np.full(pad, self.pad_id))
        train.append(np.zeros(pad, dtype=bool))
        doc.append(np.full(pad, d))  # padding is a document of its own
        return np.concatenate(toks), np.concatenate(train), np.concatenate(doc)

    def batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """tokens / labels / doc_ids, each (batch_size, seq_len)."""
        rng = np.random.default_rng([self.seed, step, micro])
        rows = [self._row(rng, seq_len + 1) for _ in range(batch_size)]
        toks = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, T+1)
        train = torch.from_numpy(np.stack([r[1] for r in rows]))
        doc = torch.from_numpy(np.stack([r[2] for r in rows]))
        labels = toks[:, 1:].clone()
        labels[~train[:, 1:] | (doc[:, 1:] != doc[:, :-1])] = IGNORE
        return {"tokens": toks[:, :-1].contiguous(), "labels": labels, "doc_ids": doc[:, :-1].contiguous()}


@dataclass
class Pair:
    """A preference pair over the same prompt: encoded chosen and rejected dialogs."""

    chosen: Dialog
    rejected: Dialog


def pair_half(examples: list[dict], half: int) -> list[dict]:
    """The preference examples of one half (0 or 1), split by item (crc32 of item_id, else of the prompt), so every pair
    of an item lands in the same half: a reward model trained on one half has seen none of the other's items."""
    if half not in (0, 1):
        raise ValueError(f"pref_half must be 0, 1 or null, got {half!r}")

    def key(ex: dict) -> bytes:  # a chat example's final assistant turn is its answer, not part of the prompt
        msgs = ex["messages"][:-1] if ex["messages"] and ex["messages"][-1]["role"] == "assistant" else ex["messages"]
        return str(ex.get("item_id") or json.dumps(msgs, sort_keys=True)).encode()

    return [ex for ex in examples if zlib.crc32(key(ex)) % 2 == half]


def encode_pairs(examples: list[dict], fmt, max_len: int) -> tuple[list[Pair], int]:
    """Encode {messages (prompt), chosen, rejected} examples as two full dialogs each; returns (pairs, dropped)."""
    pairs, dropped = [], 0
    for ex in examples:
        sides = []
        for answer in (ex["chosen"], ex["rejected"]):
            msgs = list(ex["messages"]) + [{"role": "assistant", "content": answer}]
            ids, mask = fmt.encode_dialog(msgs, add_generation_prompt=False)
            sides.append(Dialog(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        if max(len(s.ids) for s in sides) > max_len:
            dropped += 1
            continue
        pairs.append(Pair(*sides))
    return pairs, dropped


def pad_dialogs(dialogs: list[Dialog], pad_id: int, special_ids: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad dialogs: tokens (N, L), `resp` (N, L) bool = trained positions (minus special/formatting ids if
    given), and `last` (N,) index of each dialog's final token."""
    L = max(len(d.ids) for d in dialogs)
    toks = np.full((len(dialogs), L), pad_id, dtype=np.int64)
    resp = np.zeros((len(dialogs), L), dtype=bool)
    for i, d in enumerate(dialogs):
        toks[i, :len(d.ids)] = d.ids
        resp[i, :len(d.ids)] = d.train
    if special_ids:
        resp &= ~np.isin(toks, list(special_ids))
    last = np.array([len(d.ids) - 1 for d in dialogs])
    return {"tokens": torch.from_numpy(toks), "resp": torch.from_numpy(resp), "last": torch.from_numpy(last)}


class PairSampler:
    """Draws batches of preference pairs deterministically per step: chosen rows first, then rejected rows."""

    def __init__(self, pairs: list[Pair], pad_id: int, seed: int, special_ids: set[int] | None = None):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.pairs, self.pad_id, self.seed, self.special = pairs, pad_id, seed, special_ids

    def batch(self, step: int, micro: int, batch_size: int, part: slice = slice(None)) -> dict[str, torch.Tensor]:
        """The global batch's pairs (this rank's `part` of them): rows [chosen..., rejected...]."""
        rng = np.random.default_rng([self.seed, step, micro])
        picked = [self.pairs[int(i)] for i in rng.integers(len(self.pairs), size=batch_size)][part]
        return pad_dialogs([p.chosen for p in picked] + [p.rejected for p in picked], self.pad_id, self.special)
