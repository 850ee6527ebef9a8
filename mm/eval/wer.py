"""Word error rate as the speech benchmarks score it (PAPER.md §10.3): Whisper's English normaliser on both sides
(the `whisper-normalizer` package: the same code and english.json as openai-whisper, without its torch/numba/tiktoken
dependencies), jiwer's alignment, corpus WER per group, and the paired bootstrap between two systems on the same
utterances."""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import jiwer
import numpy as np

from mm.eval.stats import paired_bootstrap


@lru_cache(maxsize=1)
def _normaliser():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalise_text(s: str) -> str:
    """Whisper English normalisation (lowercase, no punctuation, spelled numbers as digits, US spelling, ...)."""
    return _normaliser()(str(s))


def utterance_errors(refs: list[str], hyps: list[str]) -> list[tuple[int, int]]:
    """(word errors S + D + I, reference words) per pair after normalising both sides (jiwer's alignment); a
    reference that normalises to nothing gives (0, 0)."""
    out = []
    for r, h in zip(refs, hyps):
        r, h = normalise_text(r), normalise_text(h)
        if not r.strip():
            out.append((0, 0))
            continue
        m = jiwer.process_words(r, h)
        out.append((m.substitutions + m.deletions + m.insertions, m.substitutions + m.deletions + m.hits))
    return out


def corpus_wer(refs: list[str], hyps: list[str]) -> float | None:
    """Corpus WER = sum(S + D + I) / sum(N_ref) over utterance_errors (pairs whose reference normalises to nothing
    count nothing); None when no reference word is left."""
    counts = utterance_errors(refs, hyps)
    words = sum(n for _, n in counts)
    return sum(e for e, _ in counts) / words if words else None


def grouped_wer(refs: list[str], hyps: list[str], groups: list) -> dict[str, float | None]:
    """Corpus WER per group name, sorted: groups[i] names the groups utterance i belongs to (any number of them)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, names in enumerate(groups):
        for g in names:
            members[g].append(i)
    return {g: corpus_wer([refs[i] for i in ix], [hyps[i] for i in ix]) for g, ix in sorted(members.items())}


def item_tags(meta: dict) -> tuple[str, ...]:
    """The subsets an audio item's json names in "tags" (a list of strings); anything else names none."""
    tags = (meta or {}).get("tags")
    return tuple(str(t) for t in tags) if isinstance(tags, list) else ()


def paired_wer_delta(refs: list[str], hyps_a: list[str], hyps_b: list[str], n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """Corpus WER of system a minus that of b on the same utterances, with a paired bootstrap over utterances
    (Bisani & Ney 2004): {"wer_a", "wer_b", "delta", "ci95": [lo, hi], "p_a_better" (share of resamples where a's
    WER is lower), "n"}; the resampling is mm.eval.stats.paired_bootstrap."""
    ea = np.array(utterance_errors(refs, hyps_a), dtype=np.float64).reshape(-1, 2)  # (N, 2): errors, words
    eb = np.array(utterance_errors(refs, hyps_b), dtype=np.float64).reshape(-1, 2)
    if len(ea) == 0 or not ea[:, 1].any():
        raise ValueError("paired_wer_delta: no utterance with reference words")
    d = paired_bootstrap(ea[:, 0], eb[:, 0], ea[:, 1], n_boot, seed)  # the same references on both sides
    return {"wer_a": d["a"], "wer_b": d["b"], "delta": d["delta"], "ci95": d["ci95"], "p_a_better": d["p_lower"],
            "n": d["n"]}
