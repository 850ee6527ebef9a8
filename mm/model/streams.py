"""Media streams: how one modality joins the frozen LM (PAPER.md §4, §5, §9; DESIGN.md "Adapter designs are
plug-ins"). A stream is an encoder, an adapter design (adapters.registry) and its join: gated cross-attention blocks
before scheduled LM layers ("xattn"), embeddings written over placeholder positions of the input ("embeds").

- `ImageStream`: ViT -> an image design (xattn or embeds) + the trainable `<|image|>` row.
- `VideoStream`: the image stream's ViT (frozen, shared) -> a video design (temporal aggregator) -> gated video
  cross-attention blocks before every `every`-th image block + the trainable `<|video|>` row.
- `SpeechStream`: log-mel -> Conformer -> a speech design -> embeddings over `<|speech|>` runs.

Every parameter a stream registers trains when a stage trains that stream (`ComposedLM.train_only`); the video
stream reaches the image encoder through the composed model and does not register it. `record()` is the stream's
save format: {"encoder": {kind, config}?, "adapter": {kind, config}, ...} (mm.model.store).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import registry
from adapters.cross_attention import CrossAttentionAdapter, fusion_schedule
from adapters.speech import SpeechTokens, splice_speech
from encoders.speech import ConformerEncoder, frames_for
from encoders.vision import VisionEncoder
from llm.model import Llama


class Pixels(NamedTuple):
    """One image per sample: normalised tiles (B, n_tiles, 3, t, t) and aspect-ratio ids (B,) (mm.model.media)."""

    pixels: torch.Tensor
    aspect: torch.Tensor


class Frames(NamedTuple):
    """One clip per sample: normalised frame tiles (B, F, n, 3, t, t) and aspect ids (B, F) (mm.model.media)."""

    pixels: torch.Tensor
    aspect: torch.Tensor


class Audio(NamedTuple):
    """One utterance per `<|speech|>` run, in row-major order: log-mel (R, F, 80) and valid frames (R,)."""

    feats: torch.Tensor
    lens: torch.Tensor


class SpeechEmbeds(NamedTuple):
    """The speech adapter's outputs (R, N, D_lm) and their counts (R,), ready to splice."""

    embeds: torch.Tensor
    lens: torch.Tensor


def to_device(x, device: torch.device | str):
    """A medium as forward takes it (tensor, Pixels / Frames / Audio / SpeechEmbeds, MediaKV, None) on `device`
    (a MediaKV stays where it was computed)."""
    if x is None or isinstance(x, MediaKV):
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return type(x)(*(t.to(device) for t in x))


@dataclass
class MediaKV:
    """Cross-attention keys/values of one media batch for every block of a stream, computed once and reused.

    kv: {LM layer index: (k, v)}, each (B, n_kv_heads, M*N, head_dim); valid: (B, M, N) bool (False = padding)."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor

    @property
    def n_media(self) -> int:
        return self.valid.shape[1]


def valid_mask(media: torch.Tensor, media_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, M, N) bool from media (B, M, N, ...) and an optional (B, M) or (B, M, N) validity mask."""
    B, M, N = media.shape[:3]
    valid = torch.ones(B, M, N, dtype=torch.bool, device=media.device)
    if media_mask is None:
        return valid
    return valid & (media_mask[..., None] if media_mask.dim() == 2 else media_mask).to(valid.device)


class NewTokenEmbedding(nn.Module):
    """Trainable embedding rows for new special tokens (e.g. `<|image|>`), used in place of the LM's frozen rows.

    Initialised as copies of those frozen rows, so the composed model starts out identical to the LM on them too."""

    def __init__(self, base: nn.Embedding, token_ids):
        super().__init__()
        ids = sorted({int(i) for i in token_ids})
        if not ids or ids[0] < 0 or ids[-1] >= base.num_embeddings:
            raise ValueError(f"new token ids {ids} must be non-empty and in the vocabulary [0, {base.num_embeddings})")
        self.token_ids = ids
        self.weight = nn.Parameter(base.weight.detach()[ids].clone())  # (K, D)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=base.weight.device)
        slot[ids] = torch.arange(len(ids), device=slot.device)
        self.register_buffer("slot", slot, persistent=False)  # vocab id -> row of `weight`, or -1

    def present(self, tokens: torch.Tensor) -> bool:
        """Does any of the new tokens occur in `tokens`?"""
        return bool((self.slot[tokens] >= 0).any())

    def forward(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings h (B, T, D) of new-token positions in tokens (B, T) by the trainable rows."""
        slot = self.slot[tokens]  # (B, T)
        rows = F.embedding(slot.clamp(min=0), self.weight).to(h.dtype)  # (B, T, D)
        return torch.where((slot >= 0)[..., None], rows, h)


def _gates(adapter: nn.Module, prefix: str) -> dict[str, float]:
    fn = getattr(adapter, "gate_values", None)
    return fn(prefix) if fn is not None else {}


class ImageStream(nn.Module):
    """ViT `encoder` + image design `adapter` + the `<|image|>` row `token` (keys "encoder.*", "token.*",
    "adapter.*"). join "xattn": blocks before the design's layers read `kv`; "embeds": `splice` writes the design's
    outputs over a run of `tokens_per_item()` `<|image|>` placeholders per image."""

    name = "image"

    def __init__(self, encoder: VisionEncoder, token: NewTokenEmbedding, adapter: nn.Module):
        super().__init__()
        self.encoder, self.token, self.adapter = encoder, token, adapter

    @classmethod
    def build(cls, lm: Llama, token_id: int, encoder: VisionEncoder, spec: dict | None) -> "ImageStream":
        """A fresh stream over `lm`: the design `spec` (a YAML spec or a saved {kind, config}; None: the default)
        initialised now (the caller seeds), the `<|image|>` row copied from the LM."""
        token = NewTokenEmbedding(lm.tok_embeddings, (token_id,))
        w = lm.output.weight
        adapter = registry.build("image", spec or {}, lm_cfg=lm.cfg, media_dim=encoder.cfg.out_dim).to(
            device=w.device, dtype=w.dtype)
        return cls(encoder, token, adapter)

    @property
    def join(self) -> str:
        return self.adapter.join

    @property
    def attend(self) -> str:
        """Which images a text token cross-attends to ("last" / "all_previous"; adapters.masks)."""
        return getattr(self.adapter, "attend", "last")

    @property
    def token_id(self) -> int:
        return self.token.token_ids[0]

    @property
    def blocks(self) -> nn.ModuleDict | None:
        """{str(layer): block} of an "xattn" design (None for "embeds")."""
        return self.adapter.blocks if self.join == "xattn" else None

    def tokens_per_item(self) -> int:
        """`<|image|>` ids per image in a prompt (1 for cross-attention designs)."""
        return self.adapter.tokens_per_item() if self.join == "embeds" else 1

    def placeholder_ids(self, n_images: int = 1) -> list[int]:
        """The prompt ids of n_images images."""
        return [self.token_id] * (self.tokens_per_item() * int(n_images))

    def features(self, px: Pixels) -> torch.Tensor:
        """Normalised tiles -> media (B, 1, n_tiles*(P+1), D_media): one item per image."""
        return self.encoder(px.pixels, px.aspect)[:, None]

    def kv(self, media: torch.Tensor, media_mask: torch.Tensor | None = None) -> MediaKV:
        """Features (B, M, N, D_media) -> MediaKV for every block (media_mask (B, M) or (B, M, N); default all
        valid)."""
        if self.join != "xattn":
            raise ValueError(f"the image design {self.adapter.kind!r} joins by input embeddings: it has no keys/values")
        media = media.to(self.adapter_dtype)
        return MediaKV(self.adapter.media_kv(media), self.adapter.valid_after(valid_mask(media, media_mask)))

    def splice(self, tokens: torch.Tensor, h: torch.Tensor, media: torch.Tensor,
               media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An "embeds" design's join: h (B, T, D) with each run of `<|image|>` placeholders of tokens (B, T) replaced
        by its image's projected tokens; media (B, M, N, D_media), one valid item per run in order; ValueError when a
        row's placeholders do not match its items."""
        e = self.adapter.embed(media.to(self.adapter_dtype))  # (B, M, n, D)
        items = valid_mask(media, media_mask).any(-1)  # (B, M)
        ph = tokens == self.token_id  # (B, T)
        want, have = items.sum(1).to(ph.device) * e.shape[2], ph.sum(1)
        if not torch.equal(want, have):
            b = int((want != have).nonzero()[0])
            raise ValueError(f"sample {b} has {int(have[b])} <|image|> placeholders for {int(items[b].sum())} images "
                             f"of {e.shape[2]} tokens each")
        return h.masked_scatter(ph[..., None], e[items.to(e.device)].to(h.dtype))

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(self.adapter.parameters()).dtype

    def gate_values(self, prefix: str = "gate_image") -> dict[str, float]:
        """tanh of the design's gates (xattn designs; {} otherwise), for logging."""
        return _gates(self.adapter, prefix)

    def record(self) -> dict:
        return {"encoder": {"kind": "vit", "config": self.encoder.cfg.to_dict()},
                "adapter": registry.spec_of(self.adapter)}


class VideoStream(nn.Module):
    """Video design `aggregator` (frames -> effective frames) + gated video cross-attention `xattn` whose blocks run
    right before every `every`-th image block (same LM layer, video first) + the `<|video|>` row `token` (keys
    "aggregator.*", "xattn.*", "token.*"). Frames go through the image stream's encoder, frozen."""

    name = "video"

    def __init__(self, aggregator: nn.Module, xattn: CrossAttentionAdapter, token: NewTokenEmbedding, every: int,
                 num_frames: int):
        super().__init__()
        self.aggregator, self.xattn, self.token = aggregator, xattn, token
        self.every, self.num_frames = int(every), int(num_frames)

    @classmethod
    def build(cls, lm: Llama, token_id: int, image: ImageStream, spec: dict, every: int = 4, num_frames: int = 16,
              init_std: float | None = None, gate_init: float = 0.0) -> "VideoStream":
        """A fresh stream: the video design `spec` (a spec dict, a saved {kind, config} or a design's Config) and
        blocks before every `every`-th image block counted from the top (8 image blocks, every 4 -> before the 4th
        and 8th); init_std: std of the video cross-attention matrices (None: the LM's); gate_init: the attention
        gates' start (pre-tanh; 0, the paper's, makes a video change nothing at step 0); the FFN gates start at 0."""
        if image.blocks is None:
            raise ValueError(f"video blocks are placed among the image cross-attention blocks; the image design "
                             f"{image.adapter.kind!r} has none")
        layer_ids = image.adapter.layer_ids
        chosen = [layer_ids[i] for i in fusion_schedule(len(layer_ids), every, "from_top")]
        aggregator = registry.build("video", spec, media_dim=image.encoder.cfg.out_dim)
        xcfg = dataclasses.replace(lm.cfg, init_std=init_std) if init_std else lm.cfg  # the blocks' gates start at 0
        xattn = CrossAttentionAdapter(xcfg, aggregator.width, chosen)
        with torch.no_grad():  # then the attention gates at gate_init
            for blk in xattn.blocks.values():
                blk.gate_attn.fill_(gate_init)
        token = NewTokenEmbedding(lm.tok_embeddings, (token_id,))
        w = lm.output.weight
        return cls(aggregator, xattn, token, every, num_frames).to(device=w.device, dtype=w.dtype)

    @property
    def token_id(self) -> int:
        return self.token.token_ids[0]

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.xattn.blocks

    attend = "last"

    def placeholder_ids(self) -> list[int]:
        return [self.token_id]

    @torch.no_grad()
    def features(self, encoder: VisionEncoder, fr: Frames) -> torch.Tensor:
        """Frame tiles -> frame features (B, 1, F, n*(P+1), D_media): one clip per sample, every frame through the
        frozen image encoder without a graph (it never trains in the video stages)."""
        B, Fr = fr.pixels.shape[:2]
        feats = encoder(fr.pixels.flatten(0, 1), fr.aspect.flatten())  # (B*F, n*(P+1), D)
        return feats.view(B, 1, Fr, *feats.shape[1:])

    def aggregate(self, video: torch.Tensor) -> torch.Tensor:
        """Frame features (B, M, F, N, D_media) -> the aggregator's tokens (B, M, E*L, W)."""
        if video.dim() != 5:
            raise ValueError(f"video features must be (B, M, F, N, D), got shape {tuple(video.shape)}")
        B, M = video.shape[:2]
        agg = self.aggregator(video.to(self.xattn.projection.weight.dtype).flatten(0, 1))  # (B*M, E, L, W)
        return agg.reshape(B, M, -1, agg.shape[-1])

    def kv(self, agg: torch.Tensor, video_mask: torch.Tensor | None = None) -> MediaKV:
        """The aggregator's tokens (B, M, E*L, W) -> MediaKV for every video block; video_mask (B, M)."""
        return MediaKV(self.xattn.media_kv(agg), valid_mask(agg, video_mask))

    def gate_values(self, prefix: str = "gate_video") -> dict[str, float]:
        return self.xattn.gate_values(prefix)

    def record(self) -> dict:
        return {"adapter": registry.spec_of(self.aggregator), "every": self.every, "num_frames": self.num_frames}


class SpeechStream(nn.Module):
    """Conformer `encoder` + speech design `adapter` (keys "encoder.*", "adapter.*"): the adapter's embeddings are
    written over the `<|speech|>` runs of the input (adapters.speech.splice_speech; the design's learned markers over
    `<|speech_start|>` / `<|speech_end|>`)."""

    name = "speech"
    join = "embeds"

    def __init__(self, encoder: ConformerEncoder, adapter: nn.Module, ids: SpeechTokens):
        super().__init__()
        if adapter.cfg.in_dim != encoder.cfg.dim:
            raise ValueError(f"speech adapter input {adapter.cfg.in_dim} does not fit encoder width {encoder.cfg.dim}")
        self.encoder, self.adapter, self.ids = encoder, adapter, ids

    def embeds(self, audio: Audio) -> SpeechEmbeds:
        """log-mel (R, F, 80), (R,) -> adapter embeddings (R, N, D_lm) and their counts (R,)."""
        enc, n = self.encoder(audio.feats, audio.lens)  # (R, F', D_enc), 40 ms frames
        return SpeechEmbeds(*self.adapter(enc, n))

    def splice(self, tokens: torch.Tensor, h: torch.Tensor, sp: SpeechEmbeds) -> torch.Tensor:
        """h (B, T, D) with the placeholder runs of tokens (B, T) replaced by the items (a count that differs from a
        run is an error, DESIGN.md invariant 5)."""
        return splice_speech(h, tokens, sp.embeds, sp.lens, self.ids, getattr(self.adapter, "markers", None))

    def n_tokens(self, n_samples: int) -> int:
        """Adapter embeddings (= `<|speech|>` placeholders) for an utterance of n_samples at 16 kHz."""
        return int(self.adapter.n_out(self.encoder.cfg.out_frames(frames_for(int(n_samples)))))

    def n_tokens_of(self, audio: Audio) -> list[int]:
        """The placeholder count of every utterance of a featurised batch (its valid log-mel frames)."""
        return [int(self.adapter.n_out(self.encoder.cfg.out_frames(int(n)))) for n in audio.lens]

    def placeholder_ids(self, n: int) -> list[int]:
        """`<|speech_start|>` + n placeholders + `<|speech_end|>`."""
        return self.ids.run(n)

    def record(self) -> dict:
        return {"encoder": {"kind": "conformer", "config": self.encoder.cfg.to_dict()},
                "adapter": registry.spec_of(self.adapter)}
