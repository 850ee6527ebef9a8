"""Paired bootstrap over held-out items: the one interval behind every comparison of two systems (or a system and
its control) on the same items, for every modality (accuracy: a mean of per-item scores; WER: word errors over
reference words). Hand-written: scipy's bootstrap resamples one statistic of one sample, not a paired ratio of sums.
"""
from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, weights=None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-item scores a, b (N,) of two systems on the same items; the statistic is sum(a) / sum(weights) (weights
    default 1: the mean; e.g. word errors over reference words) -> {"a", "b", "delta" (a - b), "ci95": [lo, hi] of
    the delta over n_boot resamples of the items, "p_lower" / "p_higher" (share of resamples where a's statistic is
    below / above b's), "n"}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if a.shape != b.shape or a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: per-item arrays differ in shape: {a.shape}, {b.shape}, {w.shape}")
    if len(a) == 0 or not w.any():
        raise ValueError("paired_bootstrap: no items (or all weights 0)")
    idx = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))  # (n_boot, N) resampled items
    den = w[idx].sum(1).clip(min=1e-12)
    deltas = (a[idx].sum(1) - b[idx].sum(1)) / den
    total = w.sum()
    sa, sb = a.sum() / total, b.sum() / total
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return {"a": float(sa), "b": float(sb), "delta": float(sa - sb), "ci95": [float(lo), float(hi)],
            "p_lower": float((deltas < 0).mean()), "p_higher": float((deltas > 0).mean()), "n": int(len(a))}


def bootstrap_ci(a, weights=None, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of sum(a) / sum(weights) over resampled items (one system's accuracy or WER)."""
    return paired_bootstrap(a, np.zeros(len(a)), weights, n_boot, seed)["ci95"]
