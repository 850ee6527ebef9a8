"""Autoregressive generation with a per-layer KV cache (or without, for checking)."""
from __future__ import annotations

from typing import Callable

import torch

from llm.model import Llama


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Next token from (vocab,) logits: argmax, or nucleus sampling at a temperature."""
    if greedy or temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(idx[choice])


def decode(model: Llama, step: Callable[[list[int], int], torch.Tensor], prompt: list[int], budget: int, *,
           greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95, stop_ids: tuple[int, ...] = (),
           seed: int | None = None, use_cache: bool = True) -> list[int]:
    """The one decode loop (every single-sequence generator runs it): up to `budget` ids after `prompt`, stopping
    after any of stop_ids (not returned). step(seq, start) -> (vocab,) logits of the last position, running seq[start:]
    at positions start.. (with use_cache the LM's KV cache holds seq[:start]; without it start is always 0)."""
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    seq, out = list(prompt), []
    if budget <= 0:
        return out
    try:
        if use_cache:
            model.setup_cache(1, len(prompt) + budget)
            logits = step(seq, 0)
        for _ in range(budget):
            if not use_cache:
                logits = step(seq, 0)
            nxt = _pick(logits.float().cpu(), greedy, temperature, top_p, gen)
            if nxt in stop_ids:
                break
            out.append(nxt)
            seq.append(nxt)
            if use_cache and len(out) < budget:
                logits = step(seq, len(seq) - 1)
    finally:
        model.clear_cache()
    return out


@torch.no_grad()
def generate(model: Llama, prompt: list[int], max_new_tokens: int, *, greedy: bool = True, temperature: float = 0.8,
             top_p: float = 0.95, stop_ids: tuple[int, ...] = (), seed: int | None = None,
             use_cache: bool = True) -> list[int]:
    """Continue `prompt` by up to max_new_tokens ids (stopping after any of stop_ids, which is not returned); a prompt
    longer than the context keeps its last max_seq_len - 1 ids."""
    model.eval()
    device = model.output.weight.device
    max_len = model.cfg.max_seq_len
    prompt = prompt[-(max_len - 1):] if len(prompt) >= max_len else list(prompt)

    def step(seq: list[int], start: int) -> torch.Tensor:
        return model(torch.tensor([seq[start:]], device=device), start_pos=start)[0, -1]

    return decode(model, step, prompt, min(max_new_tokens, max_len - len(prompt)), greedy=greedy,
                  temperature=temperature, top_p=top_p, stop_ids=stop_ids, seed=seed, use_cache=use_cache)


def decode_rows(model: Llama, step: Callable[[torch.Tensor | None, int], torch.Tensor], n: int, prompt_len: int,
                budget: int, *, greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95,
                stop_ids: tuple[int, ...] = (), seed: int | None = None) -> list[list[int]]:
    """The batched decode loop: n rows continuing one prompt_len-token prompt together through the LM's KV cache,
    each up to `budget` ids, a row stopping after any of stop_ids (not returned). step(None, 0) -> (n, vocab) logits
    of the prompt's last position (the prefill); step(ids (n, 1), pos) -> (n, vocab) logits after ids at pos."""
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    outs: list[list[int]] = [[] for _ in range(n)]
    if budget <= 0:
        return outs
    done = [False] * n
    try:
        model.setup_cache(n, prompt_len + budget)
        logits = step(None, 0)  # (n, V)
        pos = prompt_len
        for _ in range(budget):
            nxt = [_pick(row, greedy, temperature, top_p, gen) for row in logits.float().cpu()]
            for i, t in enumerate(nxt):
                if not done[i]:
                    if t in stop_ids:
                        done[i] = True
                    else:
                        outs[i].append(t)
            if all(done) or pos + 1 > prompt_len + budget - 1:
                break
            logits = step(torch.tensor(nxt)[:, None], pos)
            pos += 1
    finally:
        model.clear_cache()
    return outs


@torch.no_grad()
def sample_n(model: Llama, prompt: list[int], n: int, max_new_tokens: int, *, temperature: float = 0.9,
             top_p: float = 0.95, greedy: bool = False, stop_ids: tuple[int, ...] = (),
             seed: int | None = None) -> list[list[int]]:
    """n continuations of one prompt decoded together in one batch (rejection sampling, win rates)."""
    model.eval()
    device = model.output.weight.device
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))

    def step(ids: torch.Tensor | None, pos: int) -> torch.Tensor:  # (n, V)
        x = torch.tensor([prompt] * n, device=device) if ids is None else ids.to(device)
        return model(x, start_pos=pos)[:, -1]

    return decode_rows(model, step, n, len(prompt), budget, greedy=greedy, temperature=temperature, top_p=top_p,
                       stop_ids=stop_ids, seed=seed)
