"""Post-training metrics: exact match per task family, RM preference accuracy, implicit-reward accuracy, RM win rate."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from data.chat_stream import Pair, pad_dialogs
from llm.generate import generate, sample_n
from llm.reward import sequence_logps
from llm.tokenizer import ChatFormat


def prompt_messages(ex: dict) -> list[dict]:
    """The messages up to (not including) the final assistant answer."""
    msgs = list(ex["messages"])
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def prompt_ids(fmt: ChatFormat, ex: dict, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + prompt_messages(ex)
    return fmt.encode_dialog(msgs, add_generation_prompt=True)[0]


def answers(model, tok, examples: list[dict], max_new_tokens: int = 32) -> list[str]:
    """Greedy replies of a chat model to each example's prompt."""
    fmt = ChatFormat(tok)
    stops = (tok.eot_id, tok.eom_id, tok.eos_id)
    return [tok.decode(generate(model, prompt_ids(fmt, ex), max_new_tokens, greedy=True, stop_ids=stops))
            for ex in examples]


def exact_match_items(model, tok, examples: list[dict], max_new_tokens: int = 32) -> list[float]:
    """Held-out exact match (normalised answers) of each item, 1.0 or 0.0, in item order (paired comparisons)."""
    from data.chat_tasks import exact_match

    return [float(exact_match(p, ex["answer"])) for ex, p in zip(examples, answers(model, tok, examples,
                                                                                     max_new_tokens))]


def exact_match_by_family(model, tok, examples: list[dict], max_new_tokens: int = 32,
                          items: list[float] | None = None) -> dict[str, float]:
    """Held-out exact match (normalised answers) per task family, plus "overall" over all items; items: the
    per-item scores when already computed (exact_match_items)."""
    items = exact_match_items(model, tok, examples, max_new_tokens) if items is None else items
    hits = defaultdict(list)
    for ex, ok in zip(examples, items):
        hits[ex.get("family") or ex.get("source") or "other"].append(ok)
        hits["overall"].append(ok)
    return {fam: float(np.mean(v)) for fam, v in sorted(hits.items())}


def answer_accuracy(model, tok, examples: list[dict]) -> float:
    """Overall exact match (0 when there is nothing with a gold answer)."""
    return exact_match_by_family(model, tok, examples)["overall"] if examples else 0.0


@torch.no_grad()
def _batched(fn, pairs: list[Pair], batch: int = 32) -> np.ndarray:
    out = [fn(pairs[i:i + batch]) for i in range(0, len(pairs), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def preference_accuracy(rm, tok, pairs: list[Pair]) -> float:
    """Fraction of held-out pairs where the reward model scores chosen above rejected."""
    rm.eval()
    dev = next(rm.parameters()).device

    def score(chunk):
        b = pad_dialogs([p.chosen for p in chunk] + [p.rejected for p in chunk], tok.pad_id)
        r = rm(b["tokens"].to(dev), b["last"].to(dev)).cpu().numpy()
        return r[:len(chunk)] > r[len(chunk):]

    acc = float(_batched(score, pairs).mean()) if pairs else 0.0
    rm.train()
    return acc


def implicit_reward_accuracy(policy, reference, tok, pairs: list[Pair]) -> float:
    """Fraction of pairs where the policy's implicit reward log pi/pi_ref prefers chosen (formatting tokens masked)."""
    wins = implicit_reward_wins(policy, reference, tok, pairs)
    return float(wins.mean()) if len(wins) else 0.0


def implicit_reward_wins(policy, reference, tok, pairs: list[Pair]) -> np.ndarray:
    """(N,) bool per pair: the policy's implicit reward log pi/pi_ref prefers chosen (formatting tokens masked)."""
    policy.eval()
    dev = next(policy.parameters()).device
    reference = reference.to(dev)
    fmt_ids = set(tok.special_ids)

    def score(chunk):
        b = pad_dialogs([p.chosen for p in chunk] + [p.rejected for p in chunk], tok.pad_id, fmt_ids)
        t, r = b["tokens"].to(dev), b["resp"].to(dev)
        margin = (sequence_logps(policy, t, r)[0] - sequence_logps(reference, t, r)[0]).cpu().numpy()
        return margin[:len(chunk)] > margin[len(chunk):]

    wins = _batched(score, pairs).astype(bool)
    policy.train()
    return wins


@torch.no_grad()
def rm_scores(rm, tok, ex: dict, replies: list[list[int]]) -> np.ndarray:
    """Reward of each reply (token ids, no end-of-turn) to the example's prompt."""
    fmt = ChatFormat(tok)
    dev = next(rm.parameters()).device
    base = prompt_ids(fmt, ex)
    seqs = [base + r + [tok.eot_id] for r in replies]
    L = max(map(len, seqs))
    toks = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])
    return rm(toks.to(dev), last.to(dev)).cpu().numpy()


def rm_wins(rm, tok, policy_a, policy_b, examples: list[dict], seed: int = 0, max_new_tokens: int = 32,
            temperature: float = 0.7) -> np.ndarray:
    """(N,) per prompt: 1 when the RM scores policy_a's sampled reply above policy_b's, 0.5 on a tie, else 0."""
    fmt = ChatFormat(tok)
    stops = (tok.eot_id, tok.eom_id, tok.eos_id)
    rm.eval()
    wins = []
    for i, ex in enumerate(examples):
        ids = prompt_ids(fmt, ex)
        a = sample_n(policy_a, ids, 1, max_new_tokens, temperature=temperature, stop_ids=stops, seed=seed + i)[0]
        b = sample_n(policy_b, ids, 1, max_new_tokens, temperature=temperature, stop_ids=stops, seed=seed + i)[0]
        ra, rb = rm_scores(rm, tok, ex, [a, b])
        wins.append(1.0 if ra > rb else 0.5 if ra == rb else 0.0)
    return np.asarray(wins, dtype=float)
