"""The composed model: a frozen Llama plus image cross-attention adapters and an optional video adapter, without
changing the Llama (DESIGN.md invariants 1-3 and 6), and generation that computes the media keys/values once.

`FusedLM` registers the LM's own modules under their own attribute names, so the LM's state-dict keys appear
unchanged inside it ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", ...); adapter tensors live under
"image_adapter." (projection + one block per fused layer) and "new_tokens." (trainable rows for new special tokens,
used instead of the frozen vocabulary's rows, the torchtune FusionEmbedding idea). Without media the forward pass
is the bare LM's own forward, so text-only logits are bitwise those of the LM whatever the adapters hold.
The video adapter (PAPER.md §5; `FusedLM.add_video`) lives under "video_adapter.": a perceiver temporal aggregator
(adapters/temporal.py), its own CrossAttentionAdapter whose blocks run right BEFORE every `video_every`-th image block
(same LM layer, video first), and the trainable `<|video|>` row. Without video the forward does exactly what the
image-only model does (bitwise).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import registry
from adapters.cross_attention import CrossAttentionAdapter, fusion_schedule
from adapters.masks import media_attention_mask
from llm.generate import _pick
from llm.loss import linear_cross_entropy
from llm.model import Llama, document_mask, rope_tables
from mm.model.checkpoint import load_into, load_tensors


def _valid_mask(media: torch.Tensor, media_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, M, N) bool from media (B, M, N, Dm) and an optional (B, M) or (B, M, N) validity mask."""
    B, M, N, _ = media.shape
    valid = torch.ones(B, M, N, dtype=torch.bool, device=media.device)
    if media_mask is None:
        return valid
    return valid & (media_mask[..., None] if media_mask.dim() == 2 else media_mask).to(valid.device)


class NewTokenEmbedding(nn.Module):
    """Trainable embedding rows for new special tokens (e.g. `<|image|>`), used in place of the LM's frozen rows.

    Initialised as copies of those frozen rows, so the fused model starts out identical to the LM on them too.
    """

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


@dataclass
class MediaKV:
    """Cross-attention keys/values of one media batch for every fused layer, computed once and reused.

    kv: {LM layer index: (k, v)}, each (B, n_kv_heads, M*N, head_dim); valid: (B, M, N) bool (False = padding).
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor

    @property
    def n_media(self) -> int:
        return self.valid.shape[1]


class VideoAdapter(nn.Module):
    """Video adapter (PAPER.md §5): perceiver aggregator (frames -> effective frames), gated video cross-attention
    blocks before LM layers `layer_ids`, and the trainable `<|video|>` embedding row."""

    def __init__(self, lm: Llama, media_dim: int, video_token_id: int, layer_ids: list[int], spec, every: int,
                 init_std: float | None = None):
        super().__init__()
        self.every, self.token_id = int(every), int(video_token_id)
        self.aggregator = registry.build("video", spec, media_dim=media_dim)  # a video design (adapters.registry)
        self.cfg = self.aggregator.cfg
        xcfg = dataclasses.replace(lm.cfg, init_std=init_std) if init_std else lm.cfg  # gates stay 0 either way
        self.xattn = CrossAttentionAdapter(xcfg, self.aggregator.width, layer_ids)
        self.token = NewTokenEmbedding(lm.tok_embeddings, (video_token_id,))

    def media(self, video: torch.Tensor) -> torch.Tensor:
        """Frame features (B, M, F, N, media_dim) -> aggregated tokens (B, M, F/factor * N * n_latents, width)."""
        B, M = video.shape[:2]
        agg = self.aggregator(video.flatten(0, 1))  # (B*M, E, L, W)
        return agg.reshape(B, M, -1, agg.shape[-1])


class FusedLM(nn.Module):
    """A Llama with an image adapter design (adapters.registry, "image") and optionally a video adapter; the Llama
    itself is unchanged.

    lm: the language model (its modules are shared, not copied); media_dim: the encoder's feature width;
    media_token_id: the `<|image|>` id; adapter: the image design's spec ({kind, **config} or a saved {kind, config};
    None: `gated_xattn` with every / schedule / n_xattn / attend); new_token_ids: ids whose embedding rows train
    (default: just media_token_id). An "xattn" design runs gated blocks before its layers; an "embeds" design writes
    its outputs over a run of `image_run` `<|image|>` placeholders per image.
    """

    def __init__(self, lm: Llama, media_dim: int, media_token_id: int, *, adapter: dict | None = None,
                 every: int = 4, schedule: str | list[int] = "from_top", n_xattn: int | None = None,
                 attend: str = "last", new_token_ids=None):
        super().__init__()
        object.__setattr__(self, "lm", lm)  # a plain reference: its modules are registered below under their names
        self.cfg = lm.cfg
        self.tok_embeddings, self.layers, self.norm, self.output = lm.tok_embeddings, lm.layers, lm.norm, lm.output
        self.media_token_id = int(media_token_id)
        self.new_tokens = NewTokenEmbedding(lm.tok_embeddings, new_token_ids or (media_token_id,))
        spec = adapter or {"kind": "gated_xattn", "every": every, "schedule": schedule, "n_xattn": n_xattn,
                           "attend": attend}
        w = lm.output.weight
        self.image_adapter = registry.build("image", spec, lm_cfg=lm.cfg, media_dim=media_dim).to(
            device=w.device, dtype=w.dtype)
        self.video_adapter: VideoAdapter | None = None

    @property
    def attend(self) -> str:
        """Which images a text token cross-attends to ("last" / "all_previous"; adapters.masks)."""
        return getattr(self.image_adapter, "attend", "last")

    @property
    def joins_by_embeds(self) -> bool:
        """Does the image design write embeddings into the input (True) or cross-attend (False)?"""
        return self.image_adapter.join == "embeds"

    @property
    def image_run(self) -> int:
        """`<|image|>` placeholders per image in a prompt (1 for cross-attention designs)."""
        return self.image_adapter.tokens_per_item() if self.joins_by_embeds else 1

    def add_video(self, media_dim: int, video_token_id: int, spec, every: int = 4,
                  init_std: float | None = None) -> VideoAdapter:
        """Attach a freshly initialised video adapter: the video design `spec` (adapters.registry, "video": a spec
        dict, a saved {kind, config} or a design's Config) and blocks before every `every`-th image block, counted
        from the top (fusion_schedule over the image blocks: 8 image blocks, every 4 -> before the 4th and 8th).
        init_std: std of the video cross-attention matrices (None: the LM's init_std); its gates start at 0."""
        if self.video_adapter is not None:
            raise ValueError("this FusedLM already has a video adapter")
        if self.joins_by_embeds:
            raise ValueError(f"video blocks are placed among the image cross-attention blocks; the image design "
                             f"{self.image_adapter.kind!r} has none")
        img = self.image_adapter.layer_ids
        ids = [img[j] for j in fusion_schedule(len(img), every, "from_top")]
        w = self.output.weight
        self.video_adapter = VideoAdapter(self.lm, media_dim, video_token_id, ids, spec, every, init_std).to(
            device=w.device, dtype=w.dtype)
        return self.video_adapter

    @property
    def video_token_id(self) -> int | None:
        """The `<|video|>` id, or None without a video adapter."""
        return None if self.video_adapter is None else self.video_adapter.token_id

    # ---- parameter groups and weights -------------------------------------------------------------------------
    def _lm_names(self) -> set[str]:
        return {n for n, _ in self.lm.named_parameters()}

    def lm_parameters(self) -> list[nn.Parameter]:
        """The language model's parameters (frozen in every multimodal stage)."""
        names = self._lm_names()
        return [p for n, p in self.named_parameters() if n in names]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Everything that is not the LM: image adapter (projection, blocks), new token rows, video adapter."""
        names = self._lm_names()
        return [p for n, p in self.named_parameters() if n not in names]

    def freeze_lm(self) -> "FusedLM":
        """Set requires_grad False on every LM parameter (adapters keep theirs); returns self."""
        for p in self.lm_parameters():
            p.requires_grad_(False)
        return self

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors only, under their fused-model keys (for trainable-only checkpoints)."""
        lm_keys = set(self.lm.state_dict())
        return {k: v for k, v in self.state_dict().items() if k not in lm_keys}

    def load_lm_weights(self, state: dict[str, torch.Tensor] | str | Path) -> None:
        """Hot-swap the LM (invariant 6): load an LM state dict (or a model folder / run directory) into the LM's
        modules, strict on exactly the LM's keys and shapes; adapter tensors are not touched."""
        source: str | Path = "<state dict>"
        if not isinstance(state, dict):
            from mm.model.runs import model_dir

            source = model_dir(state) / "model.safetensors"
            state = load_tensors(source)
        load_into(self.lm, state, source, strict=True)

    # ---- forward ----------------------------------------------------------------------------------------------
    def media_kv(self, media: torch.Tensor, media_mask: torch.Tensor | None = None) -> MediaKV:
        """Encoder features (B, M, N, media_dim) -> MediaKV for every block. media_mask: (B, M) valid items or
        (B, M, N) valid tokens (padding False); default all valid."""
        if self.joins_by_embeds:
            raise ValueError(f"the image design {self.image_adapter.kind!r} joins by input embeddings: it has no "
                             "keys/values (pass the features as media)")
        media = media.to(self.output.weight.dtype)
        return MediaKV(self.image_adapter.media_kv(media),
                       self.image_adapter.valid_after(_valid_mask(media, media_mask)))

    def video_kv(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> MediaKV:
        """Frame features (B, M, F, N, media_dim) of M videos per sample -> MediaKV of the aggregated tokens for every
        video block (aggregator + projection run once). video_mask: (B, M) valid videos; default all valid."""
        if self.video_adapter is None:
            raise ValueError("video input needs a video adapter (FusedLM.add_video)")
        if video.dim() != 5:
            raise ValueError(f"video features must be (B, M, F, N, D), got shape {tuple(video.shape)}")
        return self.aggregated_kv(self.aggregate(video), video_mask)

    def aggregate(self, video: torch.Tensor) -> torch.Tensor:
        """Frame features (B, M, F, N, media_dim) -> the aggregator's tokens (B, M, E*L, W), in the adapter's dtype."""
        va = self.video_adapter
        return va.media(video.to(va.xattn.projection.weight.dtype))

    def splice_images(self, tokens: torch.Tensor, h: torch.Tensor, media: torch.Tensor,
                      media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An "embeds" design's join: the embeddings h (B, T, D) with each run of `image_run` `<|image|>` positions
        of tokens (B, T) replaced by its image's projected tokens; media (B, M, N, Dm), one valid item per run in
        order (media_mask (B, M) or (B, M, N)); ValueError when a row's placeholders do not match its items."""
        e = self.image_adapter.embed(media.to(self.output.weight.dtype))  # (B, M, n, D)
        items = _valid_mask(media, media_mask).any(-1)  # (B, M)
        ph = tokens == self.media_token_id  # (B, T)
        want, have = items.sum(1).to(ph.device) * e.shape[2], ph.sum(1)
        if not torch.equal(want, have):
            b = int((want != have).nonzero()[0])
            raise ValueError(f"sample {b} has {int(have[b])} <|image|> placeholders for {int(items[b].sum())} images "
                             f"of {e.shape[2]} tokens each")
        return h.masked_scatter(ph[..., None], e[items.to(e.device)].to(h.dtype))

    def aggregated_kv(self, agg: torch.Tensor, video_mask: torch.Tensor | None = None) -> MediaKV:
        """The aggregator's output (B, M, E*L, W) -> MediaKV for every video block (video_kv's second half)."""
        return MediaKV(self.video_adapter.xattn.media_kv(agg), _valid_mask(agg, video_mask))

    def _token_tables(self) -> list[NewTokenEmbedding]:
        return [self.new_tokens] + ([self.video_adapter.token] if self.video_adapter is not None else [])

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for table in self._token_tables():
            if table.present(tokens):
                h = table(tokens, h)
        return h

    def _check_markers(self, tokens: torch.Tensor, valid: torch.Tensor, token_id: int | None = None) -> None:
        if torch.compiler.is_compiling():
            return
        token_id = self.media_token_id if token_id is None else token_id
        markers = (tokens == token_id).sum(1)  # (B,)
        items = valid.any(-1).sum(1).to(markers.device)  # (B,) from valid (B, M, N)
        bad = (markers > items).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"sample {b} has {int(markers[b])} media markers (id {token_id}) "
                             f"but only {int(items[b])} valid media items")

    def _cross_mask(self, tokens: torch.Tensor, kv: MediaKV, token_id: int, xattn_mask: torch.Tensor | None,
                    doc_ids: torch.Tensor | None, start_pos: int) -> torch.Tensor:
        """(B, T, M*N) which media tokens each row sees: from the markers (or xattn_mask (B, T, M)) and validity."""
        if xattn_mask is None:
            if start_pos > 0:
                raise ValueError("a decoding step (start_pos > 0) needs xattn_mask computed from the whole sequence")
            self._check_markers(tokens, kv.valid, token_id)
            xattn_mask = media_attention_mask(tokens, token_id, kv.n_media, self.attend, doc_ids)
        return (xattn_mask[..., None] & kv.valid[:, None]).flatten(2)  # (B, T, M, N) -> (B, T, M*N)

    def forward(self, tokens: torch.Tensor, media: torch.Tensor | MediaKV | None = None, *,
                media_mask: torch.Tensor | None = None, xattn_mask: torch.Tensor | None = None,
                video: torch.Tensor | MediaKV | None = None, video_mask: torch.Tensor | None = None,
                video_xattn_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, start_pos: int = 0,
                return_hidden: bool = False, ignore_index: int = -100, embeds: torch.Tensor | None = None):
        """tokens (B, T); media: image features (B, M, N, media_dim), a precomputed MediaKV, or None; video: frame
        features (B, M, F, N, media_dim), a MediaKV from video_kv, or None. With neither: exactly the bare LM,
        adapters untouched. xattn_mask / video_xattn_mask (B, T, M) override the masks derived from the markers in
        tokens (needed when tokens is a decoding step, start_pos > 0). embeds (B, T, D): input embeddings used
        instead of the tokens' own (e.g. speech spliced in by mm.herd); tokens still place the media markers.
        Returns logits (B, T, V), the final-norm hidden states with return_hidden, or the mean next-token loss with
        labels (B, T)."""
        kw = dict(doc_ids=doc_ids, start_pos=start_pos, return_hidden=return_hidden, labels=labels,
                  ignore_index=ignore_index)
        if embeds is not None and embeds.shape[:2] != tokens.shape:
            raise ValueError(f"embeds {tuple(embeds.shape)} do not match tokens {tuple(tokens.shape)}")
        if media is not None and self.joins_by_embeds:
            h = self._embed(tokens) if embeds is None else embeds
            embeds, media = self.splice_images(tokens, h, media, media_mask), None
        if media is None and video is None:
            if embeds is not None:
                return self.lm(embeds=embeds, **kw)
            if not any(t.present(tokens) for t in self._token_tables()):
                return self.lm(tokens, **kw)
            return self.lm(embeds=self._embed(tokens), **kw)
        streams = []  # (blocks, MediaKV, (B, T, M*N) mask); video first: its blocks run before the image ones
        if video is not None:
            vkv = video if isinstance(video, MediaKV) else self.video_kv(video, video_mask)
            streams.append((self.video_adapter.xattn.blocks, vkv, self._cross_mask(
                tokens, vkv, self.video_adapter.token_id, video_xattn_mask, doc_ids, start_pos)))
        if media is not None:
            kv = media if isinstance(media, MediaKV) else self.media_kv(media, media_mask)
            streams.append((self.image_adapter.blocks, kv, self._cross_mask(
                tokens, kv, self.media_token_id, xattn_mask, doc_ids, start_pos)))
        h = self._embed(tokens) if embeds is None else embeds  # (B, T, D)
        # from here on the same steps as Llama.forward, with a block before each fused layer
        B, T, _ = h.shape
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
            for blocks, kv, xmask in streams:
                if i in kv.kv:
                    h = blocks[str(i)](h, kv.kv[i], xmask)
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None, start_pos)
        h = self.norm(h)
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels, ignore_index)
        return h if return_hidden else self.output(h)


@torch.no_grad()
def generate_fused(fused: FusedLM, prompt: list[int], media: torch.Tensor | None, max_new_tokens: int, *,
                   media_mask: torch.Tensor | None = None, video: torch.Tensor | MediaKV | None = None,
                   video_mask: torch.Tensor | None = None, greedy: bool = True, temperature: float = 0.8,
                   top_p: float = 0.95, stop_ids: tuple[int, ...] = (), seed: int | None = None,
                   use_cache: bool = True, cache_media: bool = True,
                   prompt_embeds: torch.Tensor | None = None) -> list[int]:
    """Continue one prompt (with `<|image|>` / `<|video|>` markers) given its images (M, N, media_dim) or
    (1, M, N, media_dim) with an optional validity mask shaped like them without the feature dim (or without N), and
    its videos: frame features (M, F, N, media_dim) or (1, M, F, N, media_dim) (mask (M,) or (1, M)), or a MediaKV
    from fused.video_kv (e.g. one clip asked several questions).

    use_cache: text self-attention through the LM's KV cache; cache_media: compute every block's media keys/values
    (and the video aggregator) once before decoding and reuse them each step (False recomputes them per step, for
    comparison). prompt_embeds (1, len(prompt), D): the prompt's input embeddings, used instead of its token
    embeddings (speech spliced in once, mm.herd); generated tokens are embedded as usual. Stops after any of stop_ids
    (not returned).
    """
    fused.eval()
    device = fused.output.weight.device
    if len(prompt) >= fused.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {fused.cfg.max_seq_len}")
    if media is not None:
        if media.dim() == 3:  # (M, N, Dm): add the batch dim, to the mask too
            media, media_mask = media[None], (media_mask[None] if media_mask is not None else None)
        media = media.to(device)
        if fused.joins_by_embeds:  # the images become part of the prompt's input embeddings, spliced once
            ids = torch.tensor([prompt], device=device)
            base = fused._embed(ids) if prompt_embeds is None else prompt_embeds.to(device)
            prompt_embeds, media = fused.splice_images(ids, base, media, media_mask), None
    if video is not None and not isinstance(video, MediaKV):
        if video.dim() == 4:  # (M, F, N, Dm)
            video, video_mask = video[None], (video_mask[None] if video_mask is not None else None)
        video = video.to(device)
    budget = min(max_new_tokens, fused.cfg.max_seq_len - len(prompt))
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None

    def kvs() -> tuple[MediaKV | None, MediaKV | None]:
        return (None if media is None else fused.media_kv(media, media_mask),
                video if video is None or isinstance(video, MediaKV) else fused.video_kv(video, video_mask))

    cached = kvs() if cache_media else None
    ids0 = torch.tensor([prompt], device=device)  # markers checked on the prompt only: emitted ones see no item
    if media is not None:
        fused._check_markers(ids0, _valid_mask(media, media_mask))
    if video is not None:
        fused._check_markers(ids0, (cached or kvs())[1].valid, fused.video_token_id)

    if prompt_embeds is not None and tuple(prompt_embeds.shape[:2]) != (1, len(prompt)):
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} do not match a prompt of {len(prompt)} tokens")

    def embeds(ids: list[int], start: int) -> torch.Tensor | None:  # (1, len(ids) - start, D) or None
        if prompt_embeds is None:
            return None
        P = len(prompt)
        parts = [prompt_embeds[:, start:].to(device)] if start < P else []
        if len(ids) > max(start, P):
            parts.append(fused._embed(torch.tensor([ids[max(start, P):]], device=device)))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def step(ids: list[int], start: int):
        if media is None and video is None:
            return fused(torch.tensor([ids[start:]], device=device), start_pos=start,
                         embeds=embeds(ids, start))[0, -1]
        ikv, vkv = cached if cached is not None else kvs()
        full = torch.tensor([ids], device=device)

        def xm(kv: MediaKV | None, token_id: int | None):  # (1, T, M) for the positions being run
            return None if kv is None else media_attention_mask(full, token_id, kv.n_media, fused.attend)[:, start:]

        return fused(full[:, start:], ikv, xattn_mask=xm(ikv, fused.media_token_id), video=vkv,
                     video_xattn_mask=xm(vkv, fused.video_token_id), start_pos=start,
                     embeds=embeds(ids, start))[0, -1]

    seq, out = list(prompt), []
    try:
        if use_cache:
            fused.lm.setup_cache(1, len(prompt) + budget)
            logits = step(seq, 0)
        for _ in range(budget):
            if not use_cache:
                logits = step(seq, 0)
            nxt = _pick(logits.float().cpu(), greedy, temperature, top_p, gen)
            if nxt in stop_ids:
                break
            out.append(nxt)
            seq.append(nxt)
            if use_cache and len(out) < budget:
                logits = step(seq, len(seq) - 1)
    finally:
        fused.lm.clear_cache()
    return out
