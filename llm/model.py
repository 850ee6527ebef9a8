"""The Llama 3 decoder (PAPER.md §1.1): pre-norm RMSNorm, RoPE theta 5e5, GQA, SwiGLU, untied output, document mask."""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.loss import linear_cross_entropy
from llm.shapes import shape_overrides


@dataclass
class LlamaConfig:
    """Shape of a Llama 3 decoder; `ffn_dim` follows the released sizing rule (PAPER.md §1.1)."""

    vocab_size: int = 4096
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 512
    init_std: float = 0.02
    # what checkpoints from elsewhere (mm import hf) carry; the defaults are this repo's own Llama 3 shapes
    rope_scaling: dict | None = None  # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_...}
    tie_embeddings: bool = False  # the output projection is the token embedding (Llama 3.2 1B / 3B)
    explicit_ffn_dim: int | None = None  # None: the sizing rule below
    explicit_head_dim: int | None = None  # None: dim // n_heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.explicit_ffn_dim:
            return self.explicit_ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)


# Named shapes. The paper's three (Table 3) use the released multipliers; 1b is Llama 3.2 1B's trunk, untied.
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512),
    "small": dict(vocab_size=8192, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, multiple_of=64, max_seq_len=1024),
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
               multiple_of=256, max_seq_len=8192),
    "8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
               multiple_of=1024, max_seq_len=8192),
    "70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                multiple_of=4096, max_seq_len=8192),
    "405b": dict(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                 multiple_of=4096, max_seq_len=8192),
}


def shape_config(name: str, **overrides) -> LlamaConfig:
    """A named shape, with field overrides (e.g. vocab_size from the trained tokenizer)."""
    if name not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    return LlamaConfig(**{**SHAPES[name], **overrides})


# a stage YAML's `model:` block: {shape, any LlamaConfig field}; vocab_size comes from the tokenizer
LlamaShape = shape_overrides(LlamaConfig, shape_config, "LlamaShape", exclude=("vocab_size",))


def llama3_scaled(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's RoPE frequency rescaling: long wavelengths divided by `factor`, short ones kept, a smooth blend
    between (the rule of Meta's reference code and transformers' "llama3" rope_type)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, out)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) in the half-split layout transformers' Llama uses (so export needs no permute);
    `scaling` {"rope_type": "llama3", ...} rescales the frequencies as Llama 3.1 / 3.2 do."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    if scaling:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"rope_scaling type {scaling.get('rope_type')!r} is not supported (llama3 only)")
        inv = llama3_scaled(inv, scaling)
    ang = positions.float()[:, None] * inv[None, :]  # (T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, hd)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the tables (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal and within the same document only."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device))

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention with one fused QKV projection (one matmul instead of three)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, Hkv, start_pos+T, hd)
        if mask is None and cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.hidden = cfg.ffn_dim
        self.w13 = nn.Linear(cfg.dim, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The decoder. forward(tokens | embeds, doc_ids?) -> logits (B, T, vocab); `return_hidden` gives the final norm
    output; with `labels` (B, T) it returns the mean cross-entropy over labels != ignore_index (fused, chunked)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one parameter, two state-dict keys
        self.caches: list[KVCache] | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            p.copy_(torch.randn(p.shape, generator=gen) * s)

    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None) -> None:
        """Allocate per-layer KV caches for generation."""
        p = self.output.weight
        self.caches = [KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype or p.dtype,
                               device or p.device) for _ in self.layers]

    def clear_cache(self) -> None:
        self.caches = None

    def forward(self, tokens: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, start_pos: int = 0, return_hidden: bool = False,
                labels: torch.Tensor | None = None, ignore_index: int = -100):
        h = self.tok_embeddings(tokens) if embeds is None else embeds  # (B, T, D)
        B, T, _ = h.shape
        pos = torch.arange(start_pos, start_pos + T, device=h.device)
        cos, sin = rope_tables(self.cfg.head_dim, pos, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask = None
        if doc_ids is not None:
            if self.caches is not None:
                raise ValueError("doc_ids (packed training) cannot be combined with a generation KV cache")
            mask = document_mask(doc_ids)
        elif self.caches is not None and T > 1:  # prefill / multi-token step: causal over the whole cache
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=h.device).tril(start_pos)
        for i, layer in enumerate(self.layers):
            cache = self.caches[i] if self.caches is not None else None
            h = layer(h, cos, sin, mask, cache, start_pos)
        h = self.norm(h)
        if labels is not None:  # training: mean next-token loss
            return self.hidden_loss(h, labels, ignore_index)
        return h if return_hidden else self.output(h)

    def hidden_loss(self, h: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of final hidden states h (B, T, D) against labels (B, T)."""
        if h.is_cuda:  # one large matmul + cuDNN-fused CE is faster on GPUs (benchmarks/speed_lm.py, H100)
            return F.cross_entropy(self.output(h).float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
        return linear_cross_entropy(h, self.output.weight, labels, ignore_index)  # CPU: no full logits tensor


def count_params(cfg: LlamaConfig) -> dict[str, int]:
    """Parameter counts of a shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llama(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (params doing matmuls) + 6 * layers * dim * seq_len for causal attention."""
    n = count_params(cfg)["non_embedding"]
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len
