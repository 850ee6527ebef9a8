"""Text metrics: held-out bits per byte of an LM, and of a unigram baseline fitted on the training split."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from data.token_stream import IGNORE, eval_windows

LN2 = math.log(2.0)


@torch.no_grad()
def lm_bits(model: torch.nn.Module, doc_tokens: list[list[int]], seq_len: int, pad_id: int,
            batch_size: int = 16, device: torch.device | str = "cpu") -> float:
    """Total bits the model spends predicting every token after BOS of each document ([BOS]+doc+[EOS] lists)."""
    model.eval()
    w = eval_windows(doc_tokens, seq_len, pad_id)
    nats = 0.0
    for i in range(0, len(w["tokens"]), batch_size):
        x = w["tokens"][i:i + batch_size].to(device)
        y = w["labels"][i:i + batch_size].to(device)
        logits = model(x).float()
        nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
    return nats / LN2


def bits_per_byte(model: torch.nn.Module, tok, texts: list[str], seq_len: int, **kw) -> float:
    """Held-out bits per byte: model bits over the UTF-8 bytes of the texts (EOS included as the end-of-doc cost)."""
    docs = [tok.encode(t, bos=True, eos=True) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return lm_bits(model, docs, seq_len, tok.pad_id, **kw) / n_bytes


class UnigramLM:
    """Token unigram model with add-one smoothing over the whole vocabulary (the baseline any LM must beat)."""

    def __init__(self, token_ids: np.ndarray, vocab_size: int):
        counts = np.bincount(np.asarray(token_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
        self.logp2 = np.log2(counts / counts.sum())

    def bits(self, doc_tokens: list[list[int]]) -> float:
        """Bits for every token after BOS, as lm_bits counts them."""
        return float(-sum(self.logp2[np.asarray(ids[1:], dtype=np.int64)].sum() for ids in doc_tokens))


def unigram_bits_per_byte(train_tokens: np.ndarray, vocab_size: int, tok, texts: list[str]) -> float:
    """Held-out bits per byte of the unigram baseline fitted on training tokens."""
    docs = [tok.encode(t, bos=True, eos=True) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return UnigramLM(train_tokens, vocab_size).bits(docs) / n_bytes
