"""The composed model (PAPER.md: the Llama 3 herd; DESIGN.md invariants 1-6): ONE frozen Llama and any set of media
streams (mm.model.streams: image, video, speech), without changing the Llama.

`ComposedLM` registers the LM's own modules under their own attribute names, so the LM's state-dict keys appear
unchanged inside it ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", ...); stream tensors live under
"image.*", "video.*" and "speech.*". Forward: the tokens' embeddings (with the streams' trainable marker rows), the
"embeds" joins written over their placeholders (speech; an image design such as mlp_concat), then the LM's layers
with each "xattn" stream's gated block before its layers (video before image at a shared layer). Without media it
IS the bare LM's forward, so text-only logits are bitwise those of the LM whatever the streams hold.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from adapters.masks import media_attention_mask
from adapters.speech import mask_speech_labels
from llm.loss import linear_cross_entropy
from llm.model import Llama, document_mask, rope_tables
from mm.model.checkpoint import load_into, load_tensors
from mm.model.streams import (Audio, Frames, ImageStream, MediaKV, Pixels, SpeechEmbeds, SpeechStream, VideoStream,
                              valid_mask)

STREAMS = ("image", "video", "speech")  # registration (and key) order


def param_counts(module: nn.Module) -> dict[str, int]:
    """{"trainable": n, "frozen": n} parameters of a module by requires_grad (each shared tensor once)."""
    counts = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


class ComposedLM(nn.Module):
    """A frozen Llama plus optional `image`, `video` and `speech` streams (None when absent; video needs image).

    forward(tokens (B, T), image=..., video=..., speech=...) -> logits (B, T, V), the final-norm hidden states
    (return_hidden) or the mean next-token loss (labels (B, T); speech positions ignored). Each medium is given raw
    (Pixels / Frames / Audio), encoded (image features (B, M, N, D_media); video frame features (B, M, F, N, D_media);
    SpeechEmbeds) or, for cross-attention streams, as its MediaKV computed once (generation)."""

    def __init__(self, lm: Llama, image: ImageStream | None = None, video: VideoStream | None = None,
                 speech: SpeechStream | None = None):
        super().__init__()
        object.__setattr__(self, "lm", lm)  # a plain reference: its modules are registered below under their names
        self.cfg = lm.cfg
        self.tok_embeddings, self.layers, self.norm, self.output = lm.tok_embeddings, lm.layers, lm.norm, lm.output
        self.image = self.video = self.speech = None
        for stream in (image, video, speech):
            if stream is not None:
                self.attach(stream)

    # ---- streams and parameters -----------------------------------------------------------------------------------
    def attach(self, stream: nn.Module) -> nn.Module:
        """Add a stream (its `name` says which); ValueError when that stream exists or video comes without image."""
        name = stream.name
        if getattr(self, name) is not None:
            raise ValueError(f"this model already has a {name} stream")
        if name == "video" and self.image is None:
            raise ValueError("a video stream reads frames through the image stream's encoder: attach image first")
        if name == "speech" and stream.adapter.cfg.out_dim != self.cfg.dim:
            raise ValueError(f"speech adapter output {stream.adapter.cfg.out_dim} does not fit LM width {self.cfg.dim}")
        setattr(self, name, stream)
        return stream

    def streams(self) -> dict[str, nn.Module]:
        """{name: stream} of the streams present, in STREAMS order."""
        return {n: getattr(self, n) for n in STREAMS if getattr(self, n) is not None}

    def require(self, name: str, where: str | Path = "this model") -> nn.Module:
        """The stream `name`; ValueError naming `where` (e.g. the run) and the streams there are when it is absent."""
        if getattr(self, name, None) is None:
            raise ValueError(f"{where} has no {name} stream (streams: {', '.join(self.streams()) or 'none'})")
        return getattr(self, name)

    def _lm_names(self) -> set[str]:
        return {n for n, _ in self.lm.named_parameters()}

    def train_only(self, *names: str) -> dict[str, int]:
        """DESIGN.md invariant 4: requires_grad on every parameter of the named streams (as they declare them: all
        they register), off everywhere else (the LM, other streams); {"trainable": n, "frozen": n}."""
        keep = {id(p) for n in names for p in self.require(n).parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return param_counts(self)

    def stream_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor but the LM's, under the composed model's keys (what a saved run holds)."""
        lm_keys = set(self.lm.state_dict())
        return {k: v for k, v in self.state_dict().items() if k not in lm_keys}

    def load_lm_weights(self, state: dict[str, torch.Tensor] | str | Path) -> None:
        """Hot-swap the LM (invariant 6): load an LM state dict (or a model folder / run directory) into the LM's
        modules, strict on exactly the LM's keys and shapes; stream tensors are not touched."""
        source: str | Path = "<state dict>"
        if not isinstance(state, dict):
            from mm.model.runs import model_dir

            source = model_dir(state) / "model.safetensors"
            state = load_tensors(source)
        load_into(self.lm, state, source, strict=True)

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D), the streams' trainable marker rows in place of the LM's."""
        h = self.tok_embeddings(tokens)
        for s in (self.image, self.video):
            if s is not None and s.token.present(tokens):
                h = s.token(tokens, h)
        return h

    def image_media(self, image) -> torch.Tensor | MediaKV:
        """Pixels -> features (B, 1, N, D_media); features and MediaKV pass through."""
        return self.require("image").features(image) if isinstance(image, Pixels) else image

    def video_kv(self, video, video_mask: torch.Tensor | None = None) -> MediaKV:
        """Frames or frame features (B, M, F, N, D_media) -> the video stream's MediaKV (aggregator and projection
        run once); a MediaKV passes through."""
        self.require("video")
        if isinstance(video, MediaKV):
            return video
        if isinstance(video, Frames):
            video = self.video.features(self.image.encoder, video)
        return self.video.kv(self.video.aggregate(video), video_mask)

    def speech_embeds(self, speech) -> SpeechEmbeds:
        """Audio -> SpeechEmbeds (SpeechEmbeds pass through)."""
        return self.require("speech").embeds(speech) if isinstance(speech, Audio) else speech

    def splice(self, tokens: torch.Tensor, h: torch.Tensor | None, image=None, image_mask=None,
               speech=None) -> torch.Tensor | None:
        """The "embeds" joins over h (B, T, D) (None: the tokens' embeddings): the speech runs, and the image runs
        of an embedding image design; None when there is nothing to write."""
        if speech is not None:
            h = self.speech.splice(tokens, self.embed(tokens) if h is None else h, self.speech_embeds(speech))
        if image is not None and self.image.join == "embeds":
            h = self.image.splice(tokens, self.embed(tokens) if h is None else h, self.image_media(image), image_mask)
        return h

    def _check_markers(self, tokens: torch.Tensor, valid: torch.Tensor, token_id: int) -> None:
        if torch.compiler.is_compiling():
            return
        markers = (tokens == token_id).sum(1)  # (B,)
        items = valid.any(-1).sum(1).to(markers.device)  # (B,) from valid (B, M, N)
        bad = (markers > items).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"sample {b} has {int(markers[b])} media markers (id {token_id}) "
                             f"but only {int(items[b])} valid media items")

    def _cross_mask(self, tokens: torch.Tensor, kv: MediaKV, stream, xattn_mask: torch.Tensor | None,
                    doc_ids: torch.Tensor | None, start_pos: int) -> torch.Tensor:
        """(B, T, M*N) which media tokens each row sees: from the markers (or xattn_mask (B, T, M)) and validity."""
        if xattn_mask is None:
            if start_pos > 0:
                raise ValueError("a decoding step (start_pos > 0) needs xattn_mask computed from the whole sequence")
            self._check_markers(tokens, kv.valid, stream.token_id)
            xattn_mask = media_attention_mask(tokens, stream.token_id, kv.n_media, stream.attend, doc_ids)
        return (xattn_mask[..., None] & kv.valid[:, None]).flatten(2)  # (B, T, M, N) -> (B, T, M*N)

    def cross_masks(self, seq: torch.Tensor, image_kv: MediaKV | None, video_kv: MediaKV | None,
                    start: int) -> dict[str, torch.Tensor | None]:
        """The (1, T - start, M) text-to-item masks of a decoding step, from the whole sequence seq (1, T)."""
        return {f"{n}_xattn_mask": None if kv is None else media_attention_mask(
            seq, s.token_id, kv.n_media, s.attend)[:, start:] for n, s, kv in (("image", self.image, image_kv),
                                                                               ("video", self.video, video_kv))}

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, *, image=None, image_mask: torch.Tensor | None = None, video=None,
                video_mask: torch.Tensor | None = None, speech=None, image_xattn_mask: torch.Tensor | None = None,
                video_xattn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, start_pos: int = 0, return_hidden: bool = False,
                ignore_index: int = -100, embeds: torch.Tensor | None = None):
        """tokens (B, T); image / video / speech as the class doc says (image_mask (B, M) or (B, M, N), video_mask
        (B, M): valid items; default all). *_xattn_mask (B, T, M) override the masks derived from the markers in
        tokens (needed when tokens is a decoding step, start_pos > 0). embeds (B, T, D): input embeddings used
        instead of the tokens' own (e.g. a prompt with its media spliced in once); tokens still place the markers."""
        if embeds is not None and embeds.shape[:2] != tokens.shape:
            raise ValueError(f"embeds {tuple(embeds.shape)} do not match tokens {tuple(tokens.shape)}")
        if labels is not None and speech is not None:
            labels = mask_speech_labels(tokens, labels, self.require("speech").ids, ignore_index)
        kw = dict(doc_ids=doc_ids, start_pos=start_pos, return_hidden=return_hidden, labels=labels,
                  ignore_index=ignore_index)
        embeds = self.splice(tokens, embeds, image, image_mask, speech)
        if image is not None and self.image.join == "embeds":
            image = None
        if image is None and video is None:
            if embeds is not None:
                return self.lm(embeds=embeds, **kw)
            if not any(s.token.present(tokens) for s in (self.image, self.video) if s is not None):
                return self.lm(tokens, **kw)
            return self.lm(embeds=self.embed(tokens), **kw)
        xattn = []  # (blocks, MediaKV, (B, T, M*N) mask); video first: its blocks run before the image ones
        if video is not None:
            vkv = self.video_kv(video, video_mask)
            xattn.append((self.video.blocks, vkv, self._cross_mask(tokens, vkv, self.video, video_xattn_mask, doc_ids,
                                                                   start_pos)))
        if image is not None:
            media = self.image_media(image)
            kv = media if isinstance(media, MediaKV) else self.image.kv(media, image_mask)
            xattn.append((self.image.blocks, kv, self._cross_mask(tokens, kv, self.image, image_xattn_mask, doc_ids,
                                                                  start_pos)))
        h = self.embed(tokens) if embeds is None else embeds  # (B, T, D)
        # from here on the same steps as Llama.forward, with a block before each fused layer
        T = h.shape[1]
        pos = torch.arange(start_pos, start_pos + T, device=h.device)
        cos, sin = rope_tables(self.cfg.head_dim, pos, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        caches, mask = self.lm.caches, None
        if doc_ids is not None:
            if caches is not None:
                raise ValueError("doc_ids (packed training) cannot be combined with a generation KV cache")
            mask = document_mask(doc_ids)
        elif caches is not None and T > 1:
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=h.device).tril(start_pos)
        for i, layer in enumerate(self.layers):
            for blocks, kv, xmask in xattn:
                if i in kv.kv:
                    h = blocks[str(i)](h, kv.kv[i], xmask)
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None, start_pos)
        h = self.norm(h)
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels, ignore_index)
        return h if return_hidden else self.output(h)


__all__ = ["ComposedLM", "STREAMS", "param_counts", "valid_mask"]
