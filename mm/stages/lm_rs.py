"""Stage lm_rs (PAPER.md §1.5 rejection sampling): K samples per prompt from the current policy, ranked by exact match
against the gold answer where one exists, then by the reward model (if one is given); the best reply per prompt becomes
SFT data, and with `pairs` the best (or the gold answer) against the worst a preference pair for DPO (on-policy
negatives)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.chat_kit import write_json_shards
from data.chat_stream import pair_half
from data.shards import SkipCounter
from llm.generate import sample_n
from llm.tokenizer import ChatFormat
from mm.config import RejectionSamplingConfig
from mm.eval.chat import prompt_ids, prompt_messages, rm_scores
from mm.model.runs import load_lm, load_reward_model
from mm.stages.lm_post import read_chat


def run(cfg: RejectionSamplingConfig, run_dir: Path, resume: bool = False) -> dict:
    """Write run_dir/shards/train-000000.tar with the selected dialogs; returns selection statistics."""
    from data.chat_tasks import exact_match
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    policy, tok, _ = load_lm(cfg.policy)
    rm = None
    if cfg.reward_model:
        rm, rm_tok, _ = load_reward_model(cfg.reward_model)
        if rm_tok.vocab_size != tok.vocab_size:
            raise ValueError(f"{cfg.reward_model}: tokenizer differs from the policy's "
                             f"({rm_tok.vocab_size} vs {tok.vocab_size})")
    skips = SkipCounter()
    pool = read_chat(cfg.data.shards, cfg.data.build_if_missing, skips)
    if cfg.data.pref_half is not None:
        pool = pair_half(pool, cfg.data.pref_half)
    rng = np.random.default_rng(cfg.seed)
    picked = [pool[int(i)] for i in rng.choice(len(pool), size=min(cfg.prompts, len(pool)), replace=False)]
    fmt = ChatFormat(tok)
    stops = (tok.eot_id, tok.eom_id, tok.eos_id)
    best_rm, mean_rm, best_em, mean_em, selected, pairs = [], [], [], [], [], []
    for i, ex in enumerate(tqdm(picked, desc="lm_rs", leave=False)):
        gold = ex.get("answer")
        if rm is None and not gold:
            continue  # nothing would rank its samples: do not draw them
        samples = sample_n(policy, prompt_ids(fmt, ex), cfg.k, cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, stop_ids=stops, seed=cfg.seed * 100003 + i)
        scores = rm_scores(rm, tok, ex, samples) if rm is not None else np.zeros(len(samples))
        texts = [tok.decode(s) for s in samples]
        strict = ex.get("match") == "strict"  # format items: "word" for "[word]" is the kit's wrong_format reply
        em = np.array([float(exact_match(t, gold, strict)) if gold else 0.0 for t in texts])
        order = np.lexsort((-scores, -em))  # exact match first, then reward
        b, w = int(order[0]), int(order[-1])
        if cfg.pairs and gold and not em[w] and texts[w].strip():
            chosen = texts[b] if em[b] else (gold if isinstance(gold, str) else gold[0])  # gold: one or a list
            pairs.append({"messages": prompt_messages(ex), "chosen": chosen, "rejected": texts[w],
                          "rejection_kind": "on_policy", "source": "rejection_sampling", "family": ex.get("family"),
                          "item_id": ex.get("item_id"), "answer": gold, "match": ex.get("match")})
        best_rm.append(float(scores[b]))
        mean_rm.append(float(scores.mean()))
        if gold:
            best_em.append(em[b])
            mean_em.append(em.mean())
        if not texts[b].strip() or (gold and not em[b]):
            continue  # nothing worth learning from for this prompt
        rec = {"messages": prompt_messages(ex) + [{"role": "assistant", "content": texts[b]}],
               "source": "rejection_sampling", "family": ex.get("family"), "item_id": ex.get("item_id"),
               "answer": gold, "reward": float(scores[b])}
        selected.append({k: v for k, v in rec.items() if v is not None})
    shards = write_json_shards(selected, run_dir / "shards", "train") if selected else []
    pref = write_json_shards([{k: v for k, v in p.items() if v is not None} for p in pairs], run_dir / "pref",
                             "train") if pairs else []
    return {"stage": "lm_rs", "prompts": len(picked), "k": cfg.k, "kept": len(selected), "pairs": len(pairs),
            "pref_shards": [str(p) for p in pref],
            "best_reward": float(np.mean(best_rm)) if rm is not None else None,
            "mean_reward": float(np.mean(mean_rm)) if rm is not None else None,
            "best_exact_match": float(np.mean(best_em)) if best_em else None,
            "mean_exact_match": float(np.mean(mean_em)) if mean_em else None,
            "shards": [str(p) for p in shards], "skipped": skips.as_dict()}
