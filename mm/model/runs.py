"""Run directories: where a stage's final model lives, and loading/saving a language model with its tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.model import Llama, LlamaConfig
from llm.tokenizer import Tokenizer
from mm.model.checkpoint import CheckpointError, list_checkpoints, load_into, load_meta, load_tensors, save_weights

FINAL = "final"


def model_dir(ckpt: str | Path) -> Path:
    """A run directory's final model, or a step checkpoint / final folder given directly."""
    p = Path(ckpt)
    if (p / "meta.json").exists() and (p / "model.safetensors").exists():
        return p
    if (p / FINAL / "meta.json").exists():
        return p / FINAL
    steps = list_checkpoints(p / "checkpoints")
    if steps:
        return steps[-1]
    raise CheckpointError(f"{p}: no model here (expected {p / FINAL} or checkpoints/step_*)")


def lm_dir(ckpt) -> Path:
    """The absolute model folder of an LM run."""
    return model_dir(ckpt).resolve()


def _find_tokenizer(d: Path) -> Path:
    for cand in (d / "tokenizer.json", d.parent / "tokenizer.json", d.parent.parent / "tokenizer.json"):
        if cand.exists():
            return cand
    raise CheckpointError(f"{d}: no tokenizer.json next to the model or in its run directory")


def save_lm(directory: Path, state: dict[str, torch.Tensor], cfg: LlamaConfig, tok: Tokenizer, meta: dict) -> Path:
    """Write a loadable LM folder: model.safetensors, meta.json (with the model config) and tokenizer.json."""
    directory = Path(directory)
    out = save_weights(directory, {"model": state}, {**meta, "model_config": cfg.to_dict()})
    tok.save(out / "tokenizer.json")
    return out


def load_lm(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer, dict]:
    """Load (model in eval mode, tokenizer, meta) from a run directory or a model folder."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    cfg_dict = meta.get("model_config")
    if cfg_dict is None:  # step checkpoints record the config in the run's meta
        run_meta = Path(d).parent.parent / "model_config.json"
        if not run_meta.exists():
            raise CheckpointError(f"{d / 'meta.json'}: no model_config and no {run_meta}")
        cfg_dict = json.loads(run_meta.read_text())
    cfg = LlamaConfig(**cfg_dict)
    tok = Tokenizer.load(_find_tokenizer(d))
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{d}: tokenizer has {tok.vocab_size} ids but the model expects {cfg.vocab_size}")
    model = Llama(cfg)
    load_into(model, load_tensors(d / "model.safetensors"), d / "model.safetensors")
    return model.to(device).eval(), tok, meta


def save_reward_model(directory: Path, state: dict[str, torch.Tensor], cfg: LlamaConfig, tok: Tokenizer,
                      meta: dict) -> Path:
    """A reward model folder: the trunk + head weights, meta.json marking kind=reward_model, tokenizer.json."""
    return save_lm(directory, state, cfg, tok, {**meta, "kind": "reward_model"})


def load_reward_model(ckpt: str | Path, device: str | torch.device = "cpu"):
    """Load (RewardModel in eval mode, tokenizer, meta) from a reward-model run or folder."""
    from llm.reward import RewardModel

    d = model_dir(ckpt)
    meta = load_meta(d)
    if meta.get("kind") != "reward_model":
        raise CheckpointError(f"{d / 'meta.json'}: not a reward model (kind={meta.get('kind')!r})")
    cfg = LlamaConfig(**meta["model_config"])
    tok = Tokenizer.load(_find_tokenizer(d))
    rm = RewardModel(Llama(cfg))
    load_into(rm, load_tensors(d / "model.safetensors"), d / "model.safetensors")
    return rm.to(device).eval(), tok, meta


# ---- CLIP (clip_pretrain) ----------------------------------------------------------------------------------------

def load_clip(ckpt: str | Path, device: str | torch.device = "cpu"):
    """Load (ClipModel in eval mode, tokenizer, meta) from a clip_pretrain run directory, final or step folder."""
    from encoders.clip import ClipModel, TextConfig
    from encoders.vision import VisionConfig

    d = model_dir(ckpt)
    meta = load_meta(d)
    kw = dict(meta.get("clip_config") or {})
    if not kw or "vision_config" not in meta:
        raise CheckpointError(f"{d / 'meta.json'}: no clip_config (not a clip_pretrain model)")
    model = ClipModel(VisionConfig(**meta["vision_config"]), TextConfig(**kw.pop("text")), **kw)
    load_into(model, load_tensors(d / "model.safetensors"), d / "model.safetensors")
    return model.to(device).eval(), Tokenizer.load(_find_tokenizer(d)), meta
