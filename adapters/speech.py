"""The speech adapter and the splice into the LM input (PAPER.md §9.5, §9.1; DESIGN.md invariant 5).

Adapter: Conv1d (k=3, s=2: 40 ms -> 80 ms frames; `stride` s > 2 takes k = 2s - 1) -> one rotary Transformer layer
-> Linear to the LM width. Its outputs enter the frozen LM as input embeddings: a dialog holds `<|speech_start|>` +
N x `<|speech|>` + `<|speech_end|>` and `splice_speech` writes the N adapter embeddings over the N placeholder
positions (a count that differs is an error). `mask_speech_labels` makes the loss ignore speech positions. Both are
plain functions so any composed model (e.g. mm.fused) can call them on its own token embeddings.

Tiny-scale aids beyond the paper (all optional): `out_rms` ends the adapter with an RMSNorm whose gain starts at
the RMS of the LM's token embeddings; `token_ctc_loss` is an auxiliary CTC from the adapter outputs onto the
transcript's LM token ids, scored against the frozen token-embedding matrix; `stride` > 2 gives fewer, longer speech
embeddings; `learn_markers` gives the adapter its own two vectors written over `<|speech_start|>` / `<|speech_end|>`
(a frozen LM never trained those two rows of its embedding table).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.speech import MacaronFFN, key_padding_mask, length_mask, rotary_attention
from llm.model import rope_tables

SPEECH_START, SPEECH, SPEECH_END = "<|speech_start|>", "<|speech|>", "<|speech_end|>"


@dataclass
class SpeechAdapterConfig:
    """Adapter shape: conv/Transformer width `dim` (paper 3072), FFN `ffn_dim` (paper 4096), output `out_dim` = the LM
    width (set from the LM); `out_rms` > 0 adds a final RMSNorm with that initial gain (0: the paper's plain Linear)."""

    in_dim: int = 96
    dim: int = 128
    heads: int = 4
    ffn_dim: int = 256
    out_dim: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    out_rms: float = 0.0
    stride: int = 2  # encoder frames per output (2: the paper's 80 ms)
    learn_markers: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def adapter_frames(enc_frames: torch.Tensor | int, stride: int = 2):
    """Adapter outputs for a number of encoder frames: ceil(n / stride) (kernel 2 stride - 1, padding stride - 1)."""
    return (enc_frames + stride - 1) // stride


class SpeechAdapter(nn.Module):
    """The paper's design, registry kind "conv_rotary" (adapters.registry): forward(enc (B, T', in_dim), lengths (B,))
    -> (B, ceil(T'/stride), out_dim), lengths (B,); padded frames are zeroed before the conv and masked in attention,
    so outputs do not depend on batch padding."""

    Config = SpeechAdapterConfig
    kind = "conv_rotary"  # registry.build sets it too; the class default lets a directly built adapter be saved

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stride < 1:
            raise ValueError(f"adapter stride must be >= 1, got {cfg.stride}")
        self.conv = nn.Conv1d(cfg.in_dim, cfg.dim, kernel_size=2 * cfg.stride - 1, stride=cfg.stride,
                              padding=cfg.stride - 1)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = rotary_attention(cfg.dim, cfg.heads)
        self.ffn = MacaronFFN(cfg.dim, cfg.ffn_dim, cfg.norm_eps)
        self.out = nn.Linear(cfg.dim, cfg.out_dim)
        # a frozen LM only reads inputs on its embedding scale (an unnormalised Linear started ~7x larger at tiny scale)
        self.out_norm = nn.RMSNorm(cfg.out_dim, eps=cfg.norm_eps) if cfg.out_rms > 0 else None
        if self.out_norm is not None:
            nn.init.constant_(self.out_norm.weight, cfg.out_rms)
        # (2, out_dim): the embeddings of <|speech_start|> and <|speech_end|> (set from the LM by the stage at init)
        self.markers = nn.Parameter(torch.zeros(2, cfg.out_dim)) if cfg.learn_markers else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * length_mask(lengths, x.shape[1])[..., None].to(x.dtype)
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, N, dim)
        n = self.n_out(lengths)
        valid = length_mask(n, h.shape[1])
        cos, sin = rope_tables(self.cfg.dim // self.cfg.heads, torch.arange(h.shape[1], device=h.device),
                               self.cfg.rope_theta)
        h = h + self.attn(self.attn_norm(h), cos.to(h.dtype), sin.to(h.dtype), key_padding_mask(valid))
        h = h + self.ffn(h)
        y = self.out(h)  # (B, N, out_dim)
        if self.out_norm is not None:
            y = self.out_norm(y)
        return y * valid[..., None].to(h.dtype), n

    def n_out(self, enc_frames: torch.Tensor | int):
        """Adapter outputs for enc_frames encoder frames (int or tensor): ceil(n / stride)."""
        return adapter_frames(enc_frames, self.cfg.stride)


def embedding_rms(weight: torch.Tensor) -> float:
    """RMS of a token-embedding matrix (V, D): the per-coordinate scale the LM's first layer is used to."""
    return float(weight.detach().float().pow(2).mean().sqrt())


def token_ctc_loss(speech: torch.Tensor, speech_lens: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor,
                   target_lens: torch.Tensor, blank: int, temperature: float = 0.1) -> torch.Tensor:
    """Auxiliary CTC (beyond the paper): speech (B, N, D) scored against the LM's token embeddings emb (V, D) by cosine
    / temperature -> (B, N, V) logits, aligned to the transcript's token ids targets (B, L) (valid target_lens);
    `blank` is a token id never in a transcript (the `<|speech|>` placeholder). Pulls each adapter output towards the
    direction of the token it carries, a form the frozen LM already reads. Mean over items of the per-token loss."""
    # cosine, not a raw dot product: embeddings of RMS ~0.06 give logits < 0.5, a near-uniform softmax over the vocab
    sim = F.normalize(speech.float(), dim=-1) @ F.normalize(emb.detach().float(), dim=-1).T  # (B, N, V)
    logp = (sim / temperature).log_softmax(-1)
    return F.ctc_loss(logp.transpose(0, 1), targets, speech_lens, target_lens, blank=blank, reduction="mean",
                      zero_infinity=True)


@dataclass(frozen=True)
class SpeechTokens:
    """Ids of the three speech special tokens (llm.tokenizer.SPECIAL_TOKENS)."""

    start: int
    placeholder: int
    end: int

    @classmethod
    def of(cls, tok) -> "SpeechTokens":
        return cls(tok.special_id(SPEECH_START), tok.special_id(SPEECH), tok.special_id(SPEECH_END))

    def run(self, n: int) -> list[int]:
        """`<|speech_start|>` + n placeholders + `<|speech_end|>`."""
        return [self.start] + [self.placeholder] * n + [self.end]


def speech_runs(tokens: torch.Tensor, ids: SpeechTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholder runs of tokens (B, T) in row-major order -> (row (R,), length (R,)); ValueError unless each run is
    enclosed by `<|speech_start|>` ... `<|speech_end|>` and every start/end token encloses a run."""
    ph = tokens == ids.placeholder
    prev = F.pad(ph, (1, 0))[:, :-1]
    nxt = F.pad(ph, (0, 1))[:, 1:]
    first, last = ph & ~prev, ph & ~nxt
    before = F.pad(tokens, (1, 0), value=-1)[:, :-1]
    after = F.pad(tokens, (0, 1), value=-1)[:, 1:]
    if (before[first] != ids.start).any() or (after[last] != ids.end).any():
        raise ValueError("speech placeholders must form runs enclosed by <|speech_start|> ... <|speech_end|>")
    n_start, n_end = int((tokens == ids.start).sum()), int((tokens == ids.end).sum())
    if not n_start == n_end == int(first.sum()):
        raise ValueError(f"{n_start} <|speech_start|> / {n_end} <|speech_end|> tokens for {int(first.sum())} "
                         "placeholder runs (each pair must enclose one non-empty run)")
    run_id = first.flatten().long().cumsum(0) - 1  # (B*T,)
    lengths = torch.bincount(run_id[ph.flatten()], minlength=int(first.sum()))
    rows = first.nonzero()[:, 0]
    return rows, lengths


def splice_speech(h: torch.Tensor, tokens: torch.Tensor, speech: torch.Tensor, speech_lens: torch.Tensor,
                  ids: SpeechTokens, markers: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings h (B, T, D) with the placeholder runs of tokens (B, T) replaced by speech (R, N, D) — one item
    per run, in row-major order, item r valid for speech_lens[r] frames — and, with markers (2, D), the start / end
    tokens' embeddings by markers[0] / markers[1]. Raises ValueError when the number of runs or any run's length
    differs from the items (DESIGN.md invariant 5)."""
    rows, run_lens = speech_runs(tokens, ids)
    if run_lens.shape[0] != speech.shape[0]:
        raise ValueError(f"{run_lens.shape[0]} speech placeholder runs in the tokens but {speech.shape[0]} speech "
                         "items")
    lens = speech_lens.to(run_lens.device)
    if not torch.equal(run_lens, lens):
        r = int((run_lens != lens).nonzero()[0])
        raise ValueError(f"speech item {r}: {int(lens[r])} adapter embeddings for a run of {int(run_lens[r])} "
                         "<|speech|> placeholders")
    valid = length_mask(lens, speech.shape[1]).to(speech.device)
    ph = (tokens == ids.placeholder)[..., None]
    h = h.masked_scatter(ph, speech[valid].to(h.dtype))
    if markers is not None:
        m = markers.to(h.dtype)
        h = torch.where((tokens == ids.start)[..., None], m[0], torch.where((tokens == ids.end)[..., None], m[1], h))
    return h


def mask_speech_labels(tokens: torch.Tensor, labels: torch.Tensor, ids: SpeechTokens,
                       ignore_index: int = -100) -> torch.Tensor:
    """Shifted labels (B, T) with speech positions ignored: targets that are speech tokens and inputs that are
    placeholders."""
    special = (labels == ids.start) | (labels == ids.placeholder) | (labels == ids.end) | (tokens == ids.placeholder)
    return labels.masked_fill(special, ignore_index)
