"""Text metrics: held-out bits per byte of an LM, and of a unigram baseline fitted on the training split; the in-context
copy score (does the LM use a span it has just read?)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from data.token_stream import IGNORE, eval_windows
from mm.eval.stats import paired_bootstrap

LN2 = math.log(2.0)


@torch.no_grad()
def lm_doc_bits(model: torch.nn.Module, doc_tokens: list[list[int]], seq_len: int, pad_id: int,
                batch_size: int = 16, device: torch.device | str = "cpu") -> list[float]:
    """Bits the model spends predicting every token after BOS of each document ([BOS]+doc+[EOS] lists), per
    document (eval_windows cuts each document into its own windows, in order)."""
    model.eval()
    w = eval_windows(doc_tokens, seq_len, pad_id)
    per_window = []
    for i in range(0, len(w["tokens"]), batch_size):
        x = w["tokens"][i:i + batch_size].to(device)
        y = w["labels"][i:i + batch_size].to(device)
        logits = model(x).float()  # (b, seq_len, V)
        nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # (b, seq_len)
        per_window += nll.sum(1).tolist()
    out, k = [], 0
    for ids in doc_tokens:
        n = -(-(len(ids) - 1) // seq_len)  # windows of this document
        out.append(sum(per_window[k:k + n]) / LN2)
        k += n
    return out


def lm_bits(model: torch.nn.Module, doc_tokens: list[list[int]], seq_len: int, pad_id: int, **kw) -> float:
    """Total bits the model spends predicting every token after BOS of each document ([BOS]+doc+[EOS] lists)."""
    return sum(lm_doc_bits(model, doc_tokens, seq_len, pad_id, **kw))


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

    def doc_bits(self, doc_tokens: list[list[int]]) -> list[float]:
        """Bits for every token after BOS of each document, as lm_doc_bits counts them."""
        return [float(-self.logp2[np.asarray(ids[1:], dtype=np.int64)].sum()) for ids in doc_tokens]

    def bits(self, doc_tokens: list[list[int]]) -> float:
        """Bits for every token after BOS, as lm_bits counts them."""
        return float(sum(self.doc_bits(doc_tokens)))


def unigram_bits_per_byte(train_tokens: np.ndarray, vocab_size: int, tok, texts: list[str]) -> float:
    """Held-out bits per byte of the unigram baseline fitted on training tokens."""
    docs = [tok.encode(t, bos=True, eos=True) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return UnigramLM(train_tokens, vocab_size).bits(docs) / n_bytes


@torch.no_grad()
def copy_score(model: torch.nn.Module, doc_tokens: list[list[int]], span: int = 24, max_spans: int = 256,
               batch_size: int = 32, device: torch.device | str = "cpu") -> dict:
    """In-context copying (induction) on held-out text: spans of `span` tokens (one per 4 * span tokens of each
    document, up to max_spans), each fed twice in a row. An LM that copies predicts the second reading far better
    than the first. -> {"spans", "first_loss", "second_loss" (nats per token, the span's tokens after its first),
    "drop" (first - second) and its paired bootstrap "drop_ci95" over spans, "first_top1", "second_top1"}."""
    rows = [ids[i:i + span] for ids in doc_tokens for i in range(0, len(ids) - span + 1, 4 * span)][:max_spans]
    if not rows:
        raise ValueError(f"copy_score: no held-out document has {span} tokens")
    model.eval()
    first, second, top1, top2 = [], [], [], []
    for i in range(0, len(rows), batch_size):
        x = torch.tensor(rows[i:i + batch_size], device=device)
        seq = torch.cat([x, x], 1)  # (b, 2 * span)
        logits = model(seq).float()  # (b, 2 * span, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), seq[:, 1:], reduction="none")  # (b, 2 * span - 1)
        hit = (logits[:, :-1].argmax(-1) == seq[:, 1:]).float()
        first += nll[:, :span - 1].mean(1).tolist()  # predicting tokens 2..span of the first reading
        second += nll[:, span:].mean(1).tolist()  # the same tokens in the second reading
        top1 += hit[:, :span - 1].mean(1).tolist()
        top2 += hit[:, span:].mean(1).tolist()
    d = paired_bootstrap(first, second)
    return {"spans": len(rows), "span": span, "first_loss": d["a"], "second_loss": d["b"], "drop": d["delta"],
            "drop_ci95": d["ci95"], "first_top1": float(np.mean(top1)), "second_top1": float(np.mean(top2))}
