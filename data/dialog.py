"""The one dialog builder (Llama 3 chat format) for every stage, eval and chat, text-only or with media, and the
collation of dialogs into training batches."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.token_stream import IGNORE
from llm.tokenizer import ChatFormat


def dialog(fmt: ChatFormat, text: str, answer: str | None = None, *, media: Sequence[int] = (),
           system: str | None = None, history: Sequence[dict] = (),
           follow: Sequence[tuple[str, str]] = ()) -> tuple[list[int], list[bool]]:
    """BOS [+ system turn] [+ history turns] + ONE user turn (`media`: the media marker / placeholder ids, first;
    then the text) + the assistant header [+ answer + <|eot_id|>] [+ `follow`: (question, answer) turns after it,
    text only, so they see the media of the first turn].

    Returns (ids, mask): mask is True on assistant content and its <|eot_id|> (the answer, the assistant turns of
    the history and of `follow`). answer None ends with the assistant header: a generation prompt."""
    tok = fmt.tok
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history)
    ids, mask = fmt.encode_dialog(msgs, add_generation_prompt=False)
    user = fmt.encode_header("user") + [int(i) for i in media] + tok.encode(text.strip())
    head = user + [tok.eot_id] + fmt.encode_header("assistant")
    ids, mask = ids + head, mask + [False] * len(head)
    if answer is not None:
        body = tok.encode(str(answer).strip()) + [tok.eot_id]
        ids, mask = ids + body, mask + [True] * len(body)
    if follow:
        if answer is None:
            raise ValueError("dialog: follow-up turns need the first turn's answer")
        more, more_mask = fmt.encode_dialog([{"role": r, "content": c} for q, a in follow
                                             for r, c in (("user", q), ("assistant", a))], add_generation_prompt=False)
        ids, mask = ids + more[1:], mask + more_mask[1:]  # [1:]: without encode_dialog's BOS
    return ids, mask


def collate_dialogs(dialogs: list[tuple[list[int], list[bool]]], pad_id: int, max_len: int) -> dict:
    """Right-padded tokens (B, T) and shifted labels (B, T) (IGNORE outside assistant tokens), cut to max_len."""
    T = min(max_len, max(len(d[0]) for d in dialogs)) + 1
    toks = np.full((len(dialogs), T), pad_id, dtype=np.int64)
    train = np.zeros((len(dialogs), T), dtype=bool)
    for i, (ids, mask) in enumerate(dialogs):
        n = min(len(ids), T)
        toks[i, :n], train[i, :n] = ids[:n], mask[:n]
    toks_t = torch.from_numpy(toks)
    labels = toks_t[:, 1:].clone()
    labels[~torch.from_numpy(train[:, 1:])] = IGNORE
    return {"tokens": toks_t[:, :-1].contiguous(), "labels": labels}
