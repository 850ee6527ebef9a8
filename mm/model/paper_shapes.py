"""Paper-shaped herds (PAPER.md §1-9) built on the meta device: parameter counts of every part, no memory used.

A `HerdShape` names the LM shape, the image encoder shape, the cross-attention schedule, the video aggregator and the
speech encoder / adapter widths; experiments/paper/herd_{8b,70b,405b}.yaml hold the three paper sizes (with the
torchrun + FSDP2 settings their stages run with) and `count_herd` builds each part with the same classes the tiny
runs train, so the counts are the code's, not a formula's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters import registry
from adapters.cross_attention import CrossAttentionAdapter, fusion_schedule
from adapters.temporal import AggregatorConfig, PerceiverResampler
from encoders.speech import ConformerEncoder, speech_shape
from encoders.vision import VisionEncoder, vision_config
from llm.model import SHAPES, Llama, LlamaConfig


@dataclass
class VideoShape:
    """The perceiver aggregator (adapters/temporal.py) and the video cross-attention schedule."""

    width: int = 2560
    depth: int = 2
    heads: int = 20
    n_latents: int = 1  # latents per token position of an effective frame (adapters.temporal)
    factor: int = 32
    max_frames: int = 64
    every: int = 4  # a video block before every 4th image block


@dataclass
class SpeechShape:
    """Speech encoder shape name (encoders/speech.py) and adapter widths (PAPER.md §9.5: 3072 / FFN 4096)."""

    encoder: str = "1b"
    adapter_dim: int = 3072
    adapter_ffn: int = 4096
    adapter_heads: int = 24


@dataclass
class Launch:
    """How the paper-scale stages are launched: torchrun over nodes x GPUs, FSDP2 per block."""

    nnodes: int = 1
    nproc_per_node: int = 8
    parallel: str = "fsdp"
    dtype: str = "bf16"


@dataclass
class HerdShape:
    """One paper-sized herd: LM shape, image encoder shape + cross-attention every `image_every` layers, video and
    speech parts, and its launch settings."""

    name: str = "herd_8b"
    lm: str = "8b"
    vision: str = "paper"
    image_every: int = 4
    video: VideoShape = field(default_factory=VideoShape)
    speech: SpeechShape = field(default_factory=SpeechShape)
    launch: Launch = field(default_factory=Launch)


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_herd(shape: HerdShape) -> dict[str, int]:
    """Parameters of each part, built on the meta device: lm, image_encoder, image_adapter (projection + blocks),
    video_adapter (aggregator + projection + blocks), speech_encoder, speech_adapter; plus the block counts."""
    lcfg = LlamaConfig(**SHAPES[shape.lm])
    vcfg = vision_config(shape.vision)
    v = shape.video
    with torch.device("meta"):
        lm = Llama(lcfg)
        image_ids = fusion_schedule(lcfg.n_layers, shape.image_every)
        video_ids = [image_ids[j] for j in fusion_schedule(len(image_ids), v.every)]
        agg = AggregatorConfig(factor=v.factor, width=v.width, n_latents=v.n_latents, depth=v.depth, heads=v.heads,
                               max_frames=v.max_frames)
        video = _n(PerceiverResampler(agg, vcfg.out_dim)) + _n(CrossAttentionAdapter(lcfg, v.width, video_ids))
        scfg = speech_shape(shape.speech.encoder)
        speech = registry.build("speech", {"kind": "conv_rotary", "in_dim": scfg.dim, "dim": shape.speech.adapter_dim,
                                           "heads": shape.speech.adapter_heads, "ffn_dim": shape.speech.adapter_ffn,
                                           "out_dim": lcfg.dim})
        return {"lm": _n(lm), "image_encoder": _n(VisionEncoder(vcfg)),
                "image_adapter": _n(CrossAttentionAdapter(lcfg, vcfg.out_dim, image_ids)), "image_blocks": len(image_ids),
                "video_adapter": video, "video_blocks": len(video_ids),
                "speech_encoder": _n(ConformerEncoder(scfg)), "speech_adapter": _n(speech)}


def load_herd_shape(path: str) -> HerdShape:
    """A herd YAML (experiments/paper/herd_*.yaml) as a typed HerdShape; unknown keys are an error naming them."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HerdShape), OmegaConf.load(path)))
    except Exception as e:  # noqa: BLE001  (OmegaConf / YAML errors -> one line naming the file)
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
