"""BEST-RQ self-supervised pretraining of the speech encoder (PAPER.md §9.4; Chiu et al. 2022; notes §B).

Targets: the UNMASKED normalised log-mel, stacked 4 frames at a time (the encoder's stride, so one target per encoder
frame), a frozen random projection to code_dim (16), and for each of `codebooks` (16) frozen random codebooks of
`codebook_size` (8192) unit vectors the nearest entry by cosine similarity. Input: spans of `span` (32) mel frames,
each frame starting a span with probability `mask_prob` (2.5%), replaced by N(0, noise_std) noise. Loss: one softmax
per codebook over the encoder's masked frames only (multi-softmax cross-entropy). Projection and codebooks are
buffers: never trained, never in the optimizer. Settings: BestRQConfig.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.speech import ConformerEncoder, length_mask


@dataclass
class BestRQConfig:
    """BEST-RQ quantiser and masking (PAPER.md §9.4); defaults are the paper's."""

    codebooks: int = 16
    codebook_size: int = 8192
    code_dim: int = 16
    mask_prob: float = 0.025  # probability that a mel frame starts a masked span
    span: int = 32  # mel frames per span
    noise_std: float = 0.1  # masked frames are replaced by N(0, noise_std) noise
    min_spans: int = 1  # at least this many spans per utterance


class RandomProjectionQuantizer(nn.Module):
    """Frozen projection (stack*F -> K*d, Xavier) and K frozen codebooks (K, V, d) of unit vectors;
    forward(stacked (B, T', stack*F)) -> codes (B, T', K) by cosine nearest neighbour."""

    def __init__(self, in_dim: int, cfg: BestRQConfig, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = torch.empty(in_dim, cfg.codebooks * cfg.code_dim)
        bound = (6.0 / (in_dim + cfg.codebooks * cfg.code_dim)) ** 0.5
        proj.uniform_(-bound, bound, generator=g)
        books = F.normalize(torch.randn(cfg.codebooks, cfg.codebook_size, cfg.code_dim, generator=g), dim=-1)
        self.register_buffer("proj", proj)
        self.register_buffer("codebooks", books)
        self.K, self.d = cfg.codebooks, cfg.code_dim

    @torch.no_grad()
    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        B, T_, _ = stacked.shape
        z = (stacked.float() @ self.proj).view(B, T_, self.K, self.d)
        z = F.normalize(z, dim=-1)  # last dim (SpeechBrain PR #2822: never over time)
        sims = torch.einsum("btkd,kvd->btkv", z, self.codebooks)  # (B, T', K, V)
        return sims.argmax(-1)


def span_mask(lengths: torch.Tensor, T_max: int, cfg: BestRQConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, T_max) bool: spans of cfg.span frames starting at each valid frame with probability mask_prob (at least
    cfg.min_spans per utterance), clipped to the valid frames."""
    B = lengths.shape[0]
    valid = length_mask(lengths, T_max)
    starts = (torch.rand(B, T_max, generator=gen) < cfg.mask_prob) & valid
    for b in range(B):
        need = cfg.min_spans - int(starts[b].sum())
        if need > 0 and lengths[b] > 0:
            hi = max(1, int(lengths[b]) - cfg.span + 1)
            starts[b, torch.randint(0, hi, (need,), generator=gen)] = True
    # frame t is masked if a span started in (t - span, t]
    csum = F.pad(starts.long().cumsum(1), (cfg.span, 0))  # (B, span + T)
    covered = csum[:, cfg.span:] - csum[:, :T_max]
    return (covered > 0) & valid


class BestRQ(nn.Module):
    """The encoder plus a prediction head (dim -> K*V logits) and the frozen quantiser.
    forward(feats (B, T, F) normalised, lengths, gen) -> (loss, stats)."""

    def __init__(self, encoder: ConformerEncoder, cfg: BestRQConfig, seed: int = 0):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        ec = encoder.cfg
        self.quantizer = RandomProjectionQuantizer(ec.stack * ec.n_mels, cfg, seed)
        self.head = nn.Linear(ec.dim, cfg.codebooks * cfg.codebook_size)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        stacked, out_len = self.encoder.stack_frames(feats, lengths)
        targets = self.quantizer(stacked)  # (B, T', K) from the unmasked features
        mask = span_mask(lengths, feats.shape[1], self.cfg, gen).to(feats.device)  # (B, T)
        noise = torch.randn(feats.shape, generator=gen).to(feats) * self.cfg.noise_std
        masked = torch.where(mask[..., None], noise, feats)
        h, _ = self.encoder(masked, lengths)  # (B, T', D)
        s = self.encoder.cfg.stack
        m = F.pad(mask, (0, (-mask.shape[1]) % s)).view(mask.shape[0], -1, s).any(-1)  # (B, T') any frame masked
        m &= length_mask(out_len, h.shape[1])
        K, V = self.cfg.codebooks, self.cfg.codebook_size
        logits = self.head(h[m]).view(-1, K, V).float()  # (M, K, V): masked frames only
        tgt = targets[m]  # (M, K)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        with torch.no_grad():
            acc = (logits.argmax(-1) == tgt).float().mean()
            stats = {"masked_frames": int(m.sum()), "mask_frac": float(m.sum() / max(1, int(out_len.sum()))),
                     "acc": float(acc), **code_stats(targets[length_mask(out_len, targets.shape[1])], V)}
        return loss, stats


def code_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Usage (share of the codebook's entries hit) and perplexity (exp entropy of the code histogram) of codes (N, K),
    averaged over the K codebooks; collapse onto few codes shows as low values (missing normalisation, notes §B.2)."""
    usage, ppl = [], []
    for k in range(codes.shape[1]):
        p = torch.bincount(codes[:, k], minlength=codebook_size).float()
        usage.append(float((p > 0).float().mean()))
        p = p / p.sum().clamp(min=1)
        ppl.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return {"code_usage": sum(usage) / len(usage), "code_perplexity": sum(ppl) / len(ppl)}
