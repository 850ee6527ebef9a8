"""Probes of where a label survives along a model's path: a softmax-regression linear probe and a small
softmax attention read with learned queries, each fitted on training items' features and scored on held-out ones
(benchmarks/video_probe.py, benchmarks/image_probe.py). Hand-written: no scikit-learn here, and it has no attention
read."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 weight_decay: float = 1e-3, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> dict:
    """Softmax regression on standardised features (N, D) -> {"val_acc", "train_acc"}."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd
    k = int(max(y_train.max(), y_val.max())) + 1
    w = (0.01 * torch.randn(xt.shape[1], k, generator=g)).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(xt @ w + b, y_train) + weight_decay * (w ** 2).sum()).backward()
        opt.step()
    return accuracies(lambda x: x @ w + b, xv, y_val, xt, y_train)


@torch.no_grad()
def accuracies(logits_of, x_val: torch.Tensor, y_val: torch.Tensor, x_train: torch.Tensor,
               y_train: torch.Tensor) -> dict:
    """{"val_acc", "train_acc"} of a fitted classifier `logits_of(x) -> (n, k)`."""
    return {s: float((logits_of(x).argmax(1) == y).float().mean()) for s, x, y in
            (("val_acc", x_val, y_val), ("train_acc", x_train, y_train))}


class AttentionRead(torch.nn.Module):
    """`heads` learned queries attend over tokens (n, T, W) (per-head keys / values of width hd; with `positions`, a
    learned (T, heads*hd) table added to both), the heads' reads concatenated -> logits (n, k)."""

    def __init__(self, tokens: int, width: int, k: int, positions: bool, heads: int = 4, hd: int = 16):
        super().__init__()
        self.heads, self.hd = heads, hd
        self.q = torch.nn.Parameter(torch.randn(heads, hd))
        self.kv = torch.nn.Linear(width, 2 * heads * hd, bias=False)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, heads * hd)) if positions else None
        self.out = torch.nn.Linear(heads * hd, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, T, _ = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)  # (n, T, heads*hd) each
        if self.pos is not None:
            k, v = k + self.pos, v + self.pos
        k, v = (t.view(n, T, self.heads, self.hd) for t in (k, v))
        att = torch.einsum("hd,nthd->nht", self.q, k).div(self.hd ** 0.5).softmax(-1)  # (n, heads, T)
        return self.out(torch.einsum("nht,nthd->nhd", att, v).reshape(n, -1))


def attention_read_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                         positions: bool, epochs: int = 150, seed: int = 0) -> dict:
    """Fit an AttentionRead on token sets (n, T, W) (AdamW, batches of 64) -> {"val_acc", "train_acc"}."""
    torch.manual_seed(seed)
    k = int(max(y_train.max(), y_val.max())) + 1
    m = AttentionRead(x_train.shape[1], x_train.shape[2], k, positions)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train))
        for i in range(0, len(perm), 64):
            j = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(m(x_train[j]), y_train[j]).backward()
            opt.step()
    return accuracies(m, x_val, y_val, x_train, y_train)
