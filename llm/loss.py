"""Fused output projection + cross-entropy, computed in row chunks.

The full (tokens x vocab) logits are never materialised: each chunk's logits, loss and gradients (w.r.t. the hidden
states and the output matrix) are computed in the forward pass and the gradients kept for backward. Same FLOPs as
the plain path, far less memory traffic (our own because torch has no fused linear+CE op).
"""
from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk: int):
        # h (N, D), weight (V, D), labels (N,) -> mean loss over labels != ignore_index
        valid = labels != ignore_index
        n_valid = valid.sum().clamp(min=1).float()
        safe = labels.clamp(min=0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        w = weight.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, lc, vc = h[s:s + chunk], safe[s:s + chunk], valid[s:s + chunk]
            logits = (hc @ w.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            tgt = logits.gather(1, lc[:, None]).squeeze(1)
            total += ((lse - tgt) * vc).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(len(lc), device=g.device), lc] -= 1.0
                g.mul_((vc.float() / n_valid)[:, None])
                g = g.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad_out if ctx.has[0] else None  # a 0-dim factor keeps h's dtype
        gw = (saved.pop(0) * grad_out).to(ctx.w_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk: int = 1024) -> torch.Tensor:
    """mean CE(h @ weight.T, labels) over labels != ignore_index; h (..., D), labels (...)."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index, chunk)
