"""Which media item(s) each text position may cross-attend to, from the `<|image|>` markers in the token ids.

The rule is the released Llama 3.2 Vision one (PAPER.md §4.1), computed with an open_flamingo-style cumsum over
the markers: the m-th marker (0-based, in text order) belongs to the m-th media item, and a position sees item m
from that marker onwards until the next run of markers begins. Adjacent markers form one run, so text after
`<|image|><|image|>` sees both images. Positions before the first marker see nothing.
"""
from __future__ import annotations

import torch

ATTEND_MODES = ("last", "all_previous")


def media_attention_mask(tokens: torch.Tensor, media_token_id: int, n_media: int, attend: str = "last",
                         doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T, n_media) bool: may position t attend to media item m?

    attend="last": only the most recent run of adjacent markers (released rule); "all_previous": every item whose
    marker is at or before t. With `doc_ids` (B, T) (packed rows), an item is visible only inside its marker's
    document. Markers beyond n_media point at no item and make nothing visible.
    """
    if attend not in ATTEND_MODES:
        raise ValueError(f"attend must be one of {ATTEND_MODES}, got {attend!r}")
    B, T = tokens.shape
    is_marker = tokens == media_token_id  # (B, T)
    count = is_marker.long().cumsum(1)  # (B, T): markers at or before t
    m = torch.arange(n_media, device=tokens.device)
    mask = count[:, :, None] > m[None, None, :]  # (B, T, M): item m's marker is at or before t
    # per-item attribute read at its marker: index m = count - 1 at marker positions; others go to a dump slot M
    slot = torch.where(is_marker & (count <= n_media), count - 1, torch.full_like(count, n_media))  # (B, T)

    def at_marker(values: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, M)
        out = torch.zeros(B, n_media + 1, dtype=values.dtype, device=values.device)
        return out.scatter(1, slot, values)[:, :n_media]

    if attend == "last":
        prev = torch.cat([torch.zeros_like(is_marker[:, :1]), is_marker[:, :-1]], dim=1)
        run = (is_marker & ~prev).long().cumsum(1)  # (B, T): index of the latest run of adjacent markers
        mask &= run[:, :, None] == at_marker(run)[:, None, :]
    if doc_ids is not None:
        mask &= doc_ids[:, :, None] == at_marker(doc_ids)[:, None, :]
    return mask
