"""Reward model and preference objectives (PAPER.md §1.5): pairwise RM loss without margin, DPO with an NLL term."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model import Llama


class RewardModel(nn.Module):
    """The LM trunk plus a scalar head on the final hidden state of each sequence's last token."""

    def __init__(self, lm: Llama):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.cfg.dim, 1)
        nn.init.normal_(self.head.weight, std=lm.cfg.dim ** -0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor, labels: torch.Tensor | None = None):
        """Rewards (N,); with `labels` (M, L) for the first M rows, also their mean next-token loss (the trunk's
        auxiliary LM objective, which keeps the reward features tied to what the answer says)."""
        h = self.lm(tokens, return_hidden=True)  # (N, L, D)
        r = self.head(h[torch.arange(len(last), device=h.device), last]).squeeze(-1).float()  # (N,)
        return r if labels is None else (r, self.lm.hidden_loss(h[:len(labels)], labels))


def answer_labels(tokens: torch.Tensor, resp: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels (N, L) that train only on response positions: label t is token t+1 where that is a response
    token, else ignore_index (the last position never has a target)."""
    labels = torch.full_like(tokens, ignore_index)
    labels[:, :-1] = torch.where(resp[:, 1:], tokens[:, 1:], ignore_index)
    return labels


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_c - r_r), averaged (the Llama 2 objective without the margin term)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def sequence_logps(model: nn.Module, tokens: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over response positions, and their count, per row: both (N,)."""
    logits = model(tokens[:, :-1]).float()  # (N, L-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (N, L-1)
    mask = resp[:, 1:].to(logp.dtype)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair; also returns the reward margin."""
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    return -F.logsigmoid(margin), margin
