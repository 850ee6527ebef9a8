"""The speech encoder (PAPER.md §9.3): 80-bin log-mel front end (25 ms window, 10 ms hop, per-utterance
normalisation, SpecAugment in supervised stages), stride-4 frame stacking + linear projection (40 ms frames), then
Conformer blocks with macaron FFNs, rotary self-attention and a padding-masked depthwise convolution.

Our own Conformer because torchaudio's has no positions and lets padding leak through its conv (notes §A.1). Every
step after the front end is per frame or masked, so an utterance's outputs do not depend on how much the batch pads
it: attention masks padded keys, the depthwise conv sees zeros on padded frames (as at the sequence end), and the
norms are per frame (LayerNorm, no BatchNorm).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.transforms as T

from llm.model import Attention, LlamaConfig, rope_tables
from llm.shapes import shape_overrides

SAMPLE_RATE = 16000
N_MELS = 80
WIN = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms


# ---- front end ------------------------------------------------------------------------------------------------------

class LogMel(nn.Module):
    """Waveform (N,) at 16 kHz -> normalised log-mel (T, 80), T = 1 + N // 160; each mel bin has zero mean and unit
    variance over the utterance (BEST-RQ's random quantiser needs this, notes §A.2)."""

    def __init__(self, n_mels: int = N_MELS):
        super().__init__()
        self.mel = T.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=WIN, win_length=WIN, hop_length=HOP, n_mels=n_mels,
                                    f_min=0.0, f_max=SAMPLE_RATE / 2, power=2.0, center=True, pad_mode="reflect",
                                    norm="slaney", mel_scale="slaney")

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = (self.mel(wave.float()) + 1e-6).log().T  # (T, n_mels)
        return (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)


def frames_for(n_samples: int) -> int:
    """Mel frames of an utterance of n_samples (center=True framing)."""
    return 1 + n_samples // HOP


@dataclass
class SpecAugmentConfig:
    """SpecAugment masks: counts and sizes (0 masks turn a kind off)."""

    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_ratio: float = 0.05


class SpecAugment(nn.Module):
    """SpecAugment masks (torchaudio FrequencyMasking / TimeMasking) on one normalised utterance (T, 80); the mask
    value 0 is the utterance mean. Time masks are at most time_ratio of the utterance long."""

    def __init__(self, cfg: SpecAugmentConfig | None = None):
        super().__init__()
        cfg = cfg or SpecAugmentConfig()
        self.freq = nn.ModuleList(T.FrequencyMasking(cfg.freq_width) for _ in range(cfg.freq_masks))
        self.n_time, self.time_ratio = cfg.time_masks, cfg.time_ratio

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.T[None]  # (1, 80, T)
        for m in self.freq:
            x = m(x)
        width = int(self.time_ratio * x.shape[-1])
        if width > 0:
            for _ in range(self.n_time):
                x = T.TimeMasking(width)(x)
        return x[0].T


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, F)] -> zero-padded (B, T_max, F), lengths (B,)."""
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


def length_mask(lengths: torch.Tensor, T_max: int) -> torch.Tensor:
    """(B,) lengths -> (B, T_max) bool, True on valid frames."""
    return torch.arange(T_max, device=lengths.device)[None] < lengths[:, None]


# ---- the Conformer --------------------------------------------------------------------------------------------------

@dataclass
class ConformerConfig:
    """Shape of the speech encoder; `stack` mel frames per encoder frame (4 x 10 ms = 40 ms)."""

    n_mels: int = N_MELS
    stack: int = 4
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 128
    kernel: int = 7
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)

    def out_frames(self, mel_frames: torch.Tensor | int):
        """Encoder frames for a number of mel frames (the last, partial stack is zero-filled)."""
        return (mel_frames + self.stack - 1) // self.stack


# Named shapes; "1b" is the paper's (PAPER.md §9.3): 24 layers, width 1536, FFN 4096, kernel 7, 24 heads.
SPEECH_SHAPES: dict[str, dict] = {
    "tiny": dict(dim=96, layers=4, heads=4, ffn_dim=256, kernel=7),
    "small": dict(dim=256, layers=8, heads=4, ffn_dim=1024, kernel=7),
    "1b": dict(dim=1536, layers=24, heads=24, ffn_dim=4096, kernel=7),
}


def speech_shape(name: str, **overrides) -> ConformerConfig:
    """A named encoder shape with field overrides (None values keep the shape's)."""
    if name not in SPEECH_SHAPES:
        raise KeyError(f"unknown speech encoder shape {name!r}; known: {sorted(SPEECH_SHAPES)}")
    return ConformerConfig(**{**SPEECH_SHAPES[name], **{k: v for k, v in overrides.items() if v is not None}})


# a stage YAML's `encoder:` block: {shape, any ConformerConfig field}
ConformerShape = shape_overrides(ConformerConfig, speech_shape, "ConformerShape")


def rotary_attention(dim: int, heads: int) -> Attention:
    """Bidirectional rotary multi-head self-attention: llm.model.Attention (fused QKV, RoPE) with as many KV heads as
    heads; called with a key-padding mask (B, 1, 1, T) it attends both ways."""
    return Attention(LlamaConfig(dim=dim, n_heads=heads, n_kv_heads=heads))


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) valid frames -> (B, 1, 1, T) attention mask (every query sees every valid key)."""
    return valid[:, None, None, :]


class MacaronFFN(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear (one half-step FFN of the macaron pair)."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(self.norm(x))))


class ConvModule(nn.Module):
    """LayerNorm -> pointwise (2C) -> GLU -> padded frames zeroed -> depthwise conv (k, 'same') -> LayerNorm -> SiLU
    -> pointwise. Zeroing before the depthwise conv makes a padded batch look like the utterance alone."""

    def __init__(self, dim: int, kernel: int, eps: float):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd ('same' padding), got {kernel}")
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.dw_norm = nn.LayerNorm(dim, eps=eps)
        self.pw2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pw1(self.norm(x)), dim=-1) * valid[..., None]  # (B, T, C), zeros on padding
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.pw2(F.silu(self.dw_norm(h)))


class ConformerBlock(nn.Module):
    """x + FFN/2, + rotary MHSA, + conv, + FFN/2, then LayerNorm (Gulati et al. 2020)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        eps = cfg.norm_eps
        self.ffn1 = MacaronFFN(cfg.dim, cfg.ffn_dim, eps)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=eps)
        self.attn = rotary_attention(cfg.dim, cfg.heads)
        self.conv = ConvModule(cfg.dim, cfg.kernel, eps)
        self.ffn2 = MacaronFFN(cfg.dim, cfg.ffn_dim, eps)
        self.norm = nn.LayerNorm(cfg.dim, eps=eps)

    def forward(self, x, cos, sin, mask, valid):
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """forward(feats (B, T, n_mels) normalised, lengths (B,)) -> (B, T', dim), lengths' (B,), T' = ceil(T / stack);
    outputs on padded frames are zero."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        if cfg.dim % cfg.heads or (cfg.dim // cfg.heads) % 2:
            raise ValueError(f"speech encoder: dim {cfg.dim} / heads {cfg.heads} must give an even head_dim (RoPE)")
        self.cfg = cfg
        self.proj = nn.Linear(cfg.stack * cfg.n_mels, cfg.dim)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.layers))

    def stack_frames(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) -> (B, ceil(T/s), s*F) with padded mel frames zeroed first, and the stacked lengths."""
        B, T_, Fm = feats.shape
        s = self.cfg.stack
        x = feats * length_mask(lengths, T_)[..., None].to(feats.dtype)
        x = F.pad(x, (0, 0, 0, (-T_) % s))
        return x.reshape(B, -1, s * Fm), self.cfg.out_frames(lengths)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, out_len = self.stack_frames(feats, lengths)
        x = self.proj(x)  # (B, T', D)
        valid = length_mask(out_len, x.shape[1])
        cos, sin = rope_tables(self.cfg.dim // self.cfg.heads, torch.arange(x.shape[1], device=x.device),
                               self.cfg.rope_theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = key_padding_mask(valid)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, valid)
        return x * valid[..., None], out_len


def count_speech_params(cfg: ConformerConfig) -> int:
    """Parameters of an encoder shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in ConformerEncoder(cfg).parameters())
