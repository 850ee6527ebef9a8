"""Import a Hugging Face Llama folder (the inverse of llm/export.py): config.json, safetensors (one file or shards
with model.safetensors.index.json) and tokenizer.json -> our LlamaConfig, state dict and Tokenizer.

Llama 3 / 3.1 / 3.2 text models: GQA, rope_theta, `llama3` rope scaling, tied embeddings, any head_dim and
intermediate_size. Weights are read with safetensors only (a folder with only pickled .bin files is refused).
The tokenizer keeps its ids; the special tokens this stack needs and the vocabulary lacks (media markers, and for
Llama 3.0 the 3.1 names) take reserved ids, highest first, renamed in place, so no embedding row moves.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from llm.model import LlamaConfig
from llm.tokenizer import REQUIRED_SPECIALS, Tokenizer

RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")
LLAMA3_CORE = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class HFImportError(ValueError):
    """A Hugging Face folder this importer cannot take: one line naming the file and the problem."""


def _read_json(path: Path, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path}: missing ({missing})") from None
    except ValueError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None


def _config(d: Path) -> LlamaConfig:
    path = d / "config.json"
    c = _read_json(path, "not a Hugging Face model folder?")
    if c.get("model_type") != "llama":
        raise HFImportError(f"{path}: model_type {c.get('model_type')!r}, only 'llama' is supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in c:
            raise HFImportError(f"{path}: key {key!r} missing")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise HFImportError(f"{path}: {key}=true is not supported (Llama 3 has no biases)")
    if c.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{path}: hidden_act {c['hidden_act']!r}, only 'silu' is supported")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise HFImportError(f"{path}: rope type {kind!r} is not supported (default or llama3)")
    scaling = None
    if kind == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                   "original_max_position_embeddings")}}
    heads = c["num_attention_heads"]
    cfg = LlamaConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                      n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                      norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                      max_seq_len=int(c.get("max_position_embeddings", 8192)), rope_scaling=scaling,
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    # explicit sizes only where they differ from what the sizing rule derives (one spelling per shape)
    if c["intermediate_size"] != cfg.ffn_dim:
        cfg.explicit_ffn_dim = c["intermediate_size"]
    if c.get("head_dim") and c["head_dim"] != cfg.head_dim:
        cfg.explicit_head_dim = c["head_dim"]
    return cfg


def _weights(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise HFImportError(f"{index}: not a safetensors index ({e})") from None
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif list(d.glob("*.bin")):
        raise HFImportError(f"{d}: only pickled .bin weights; convert them to safetensors first (never unpickled)")
    else:
        raise HFImportError(f"{d}: no model.safetensors or model.safetensors.index.json")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            sd.update(load_file(str(d / name)))
        except Exception as e:
            raise HFImportError(f"{d / name}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return {k: v.float() for k, v in sd.items()}


def from_hf_state(hf: dict[str, torch.Tensor], cfg: LlamaConfig, source: Path) -> dict[str, torch.Tensor]:
    """transformers' Llama keys -> ours (q/k/v fused into wqkv, gate/up into w13); the inverse of to_hf_state."""
    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise HFImportError(f"{source}: weight {key!r} missing")
        return hf.pop(key)

    sd = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    head = hf.pop("lm_head.weight", None)
    if head is None and not cfg.tie_embeddings:
        raise HFImportError(f"{source}: weight 'lm_head.weight' missing and tie_word_embeddings is false")
    sd["output.weight"] = sd["tok_embeddings.weight"] if cfg.tie_embeddings else head
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        sd[dst + "attention.wqkv.weight"] = torch.cat([take(src + f"self_attn.{p}_proj.weight") for p in "qkv"])
        sd[dst + "attention.wo.weight"] = take(src + "self_attn.o_proj.weight")
        sd[dst + "feed_forward.w13.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"),
                                                         take(src + "mlp.up_proj.weight")])
        sd[dst + "feed_forward.w2.weight"] = take(src + "mlp.down_proj.weight")
        sd[dst + "attention_norm.weight"] = take(src + "input_layernorm.weight")
        sd[dst + "ffn_norm.weight"] = take(src + "post_attention_layernorm.weight")
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if hf:
        raise HFImportError(f"{source}: unexpected weight {sorted(hf)[0]!r} ({len(hf)} unexpected)")
    return sd


def import_tokenizer(d: Path) -> Tokenizer:
    """tokenizer.json with the Llama 3 specials; missing ones this stack uses are put on reserved ids."""
    path = d / "tokenizer.json"
    raw = _read_json(path, "the fast tokenizer file is needed")
    added = raw.get("added_tokens") or []
    have = {t["content"] for t in added}
    core = [s for s in LLAMA3_CORE if s not in have]
    if core:
        raise HFImportError(f"{path}: no {core[0]!r}: not a Llama 3 tokenizer")
    need = [s for s in REQUIRED_SPECIALS if s not in have]
    reserved = sorted((t for t in added if RESERVED.fullmatch(t["content"])),
                      key=lambda t: -int(RESERVED.fullmatch(t["content"])[1]))
    if len(reserved) < len(need):
        raise HFImportError(f"{path}: {len(need)} special tokens to place ({need[0]!r}, ...) but only "
                           f"{len(reserved)} reserved ones")
    vocab = (raw.get("model") or {}).get("vocab") or {}
    for name, tok in zip(need, reserved):
        if tok["content"] in vocab:
            vocab[name] = vocab.pop(tok["content"])
        tok["content"] = name
    try:
        return Tokenizer(HFTokenizer.from_str(json.dumps(raw)))
    except Exception as e:
        raise HFImportError(f"{path}: {str(e).splitlines()[0]}") from None


def import_hf(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], LlamaConfig, Tokenizer]:
    """(our state dict, LlamaConfig, Tokenizer) of a Hugging Face Llama folder."""
    d = Path(model_dir)
    if not d.is_dir():
        raise HFImportError(f"{d}: no such folder")
    cfg = _config(d)
    tok = import_tokenizer(d)
    if tok.vocab_size != cfg.vocab_size:
        raise HFImportError(f"{d / 'tokenizer.json'}: {tok.vocab_size} ids but config.json says vocab_size "
                            f"{cfg.vocab_size}")
    return from_hf_state(_weights(d), cfg, d), cfg, tok
