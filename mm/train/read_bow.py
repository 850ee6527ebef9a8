"""The caption bag-of-words aid on cross-attention reads (beyond the paper): a linear head on the blocks' pre-gate
attention outputs, averaged over the text rows that see the media, predicts the caption's tokens. It reaches the
read's weights and the encoder directly, while the tanh gates that scale the read into the LM are still near 0. Used
by the image and video stages (`bow_weight`); the head is a training aid, never saved."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from llm.tokenizer import Tokenizer


def caption_bow(tok: Tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, V): each caption's distinct token ids, uniform (the bag-of-words target)."""
    out = torch.zeros(len(captions), tok.vocab_size)
    for i, c in enumerate(captions):
        ids = sorted(set(tok.encode(c.strip())))
        if ids:
            out[i, ids] = 1.0 / len(ids)
    return out


@contextmanager
def kept_reads(blocks: list[nn.Module]):
    """Inside: the gated cross-attention blocks keep their pre-gate outputs; yields a function returning their mean
    over blocks, pooled over the rows that see media: (B, D). The blocks forget them on exit."""
    for blk in blocks:
        blk.keep_read = True

    def pooled() -> torch.Tensor:
        read = sum(blk.read[0] for blk in blocks) / len(blocks)  # (B, T, D)
        rows = blocks[0].read[1]  # (B, T, 1)
        return (read * rows).sum(1) / rows.sum(1).clamp(min=1)  # (B, D)

    try:
        yield pooled
    finally:
        for blk in blocks:
            blk.keep_read, blk.read = False, None


def bow_loss(head: nn.Module, pooled: torch.Tensor, bow: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's token distribution on pooled (B, W) against the bag-of-words targets (B, V)."""
    logp = head(pooled).float().log_softmax(-1)  # (B, V)
    return -(bow * logp).sum(-1).mean()


def with_read_bow(head: nn.Module, blocks: list[nn.Module], forward: Callable[[], torch.Tensor],
                  bow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward()'s output, the bag-of-words loss of `head` on the blocks' reads pooled during that forward)."""
    with kept_reads(blocks) as reads:
        out = forward()
        pooled = reads()  # (B, D)
    return out, bow_loss(head, pooled, bow)
