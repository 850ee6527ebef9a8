"""Export to a Hugging Face Llama checkpoint (config.json, model.safetensors, tokenizer files).

Our RoPE already uses the half-split layout of transformers' Llama, so the export only renames keys and splits the
fused QKV and gate/up matrices; no permutation is needed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm.model import LlamaConfig
from llm.tokenizer import Tokenizer, hf_tokenizer_config


def hf_config(cfg: LlamaConfig, tok: Tokenizer | None = None) -> dict:
    """transformers LlamaConfig fields for our shape (special token ids only when a tokenizer is given)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=[tok.eos_id, tok.eom_id, tok.eot_id], pad_token_id=tok.pad_id)
    return out


def to_hf_state(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Rename our keys to transformers' and split the fused projections."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:  # tied: transformers re-ties lm_head to the embedding on load
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attention.wqkv.weight"].split([q_out, kv_out, kv_out], dim=0)
        gate, up = sd[src + "feed_forward.w13.weight"].chunk(2, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "attention.wo.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "feed_forward.w2.weight"],
            dst + "input_layernorm.weight": sd[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "ffn_norm.weight"],
        })
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def export_hf(model, tok: Tokenizer, out_dir: Path) -> dict:
    """Write the HF folder; returns a summary (files, parameter count)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: LlamaConfig = model.cfg
    state = to_hf_state(model.state_dict(), cfg)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.eom_id, tok.eot_id], "pad_token_id": tok.pad_id}, indent=1))
    tok.save(out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(tok, cfg.max_seq_len), indent=1))
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir()),
            "params": sum(v.numel() for v in state.values())}
