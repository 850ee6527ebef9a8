"""Generation with the composed model: the media are prepared ONCE (speech and embedding image designs spliced into
the prompt's input embeddings, cross-attention keys/values computed for every block) and the text is decoded with
the LM's KV cache through the project's decode loops: llm.generate.decode for one sequence (generate), decode_rows for
rows of one prompt that differ only in their images (generate_rows, the batched image eval)."""
from __future__ import annotations

import torch

from llm.generate import decode, decode_rows
from mm.model.composed import ComposedLM
from mm.model.streams import MediaKV, Pixels, to_device


def _joined(model: ComposedLM, ids0: torch.Tensor, image, image_mask, speech) -> tuple:
    """(prompt embeddings (B, P, D) with the "embeds" joins written, or None; the image media left for
    cross-attention, or None), the media prepared once."""
    if image is not None:
        image = model.image_media(image)
    pe = model.splice(ids0, None, image, image_mask, speech)
    return pe, None if image is not None and model.image.join == "embeds" else image


@torch.no_grad()
def generate(model: ComposedLM, prompt: list[int], max_new_tokens: int, *, image=None,
             image_mask: torch.Tensor | None = None, video=None, video_mask: torch.Tensor | None = None,
             speech=None, greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95,
             stop_ids: tuple[int, ...] = (), seed: int | None = None, use_cache: bool = True,
             cache_media: bool = True) -> list[int]:
    """Continue one prompt (with its media markers / placeholder runs) given its media, each as ComposedLM.forward
    takes it for a batch of one; image features / frame features may also come without the batch dim ((M, N, D),
    (M, F, N, D), the masks likewise). use_cache: text self-attention through the LM's KV cache; cache_media:
    compute the media keys/values once before decoding (False recomputes them every step, for comparison). Stops
    after any of stop_ids (not returned)."""
    model.eval()
    device = model.output.weight.device
    if len(prompt) >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {model.cfg.max_seq_len}")
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))
    if isinstance(image, torch.Tensor) and image.dim() == 3:  # (M, N, D): add the batch dim, to the mask too
        image, image_mask = image[None], (image_mask[None] if image_mask is not None else None)
    if isinstance(video, torch.Tensor) and video.dim() == 4:  # (M, F, N, D)
        video, video_mask = video[None], (video_mask[None] if video_mask is not None else None)
    image, video, speech = (to_device(x, device) for x in (image, video, speech))
    ids0 = torch.tensor([prompt], device=device)
    pe, image = _joined(model, ids0, image, image_mask, speech)  # pe (1, P, D) or None

    def kvs() -> tuple[MediaKV | None, MediaKV | None]:
        ikv = None if image is None else image if isinstance(image, MediaKV) else model.image.kv(image, image_mask)
        return ikv, None if video is None else model.video_kv(video, video_mask)

    kept = kvs()  # the prefill's keys/values; with cache_media every later step's too
    # markers are checked on the prompt only: emitted ones see no item
    for stream, kv in zip((model.image, model.video), kept):
        if kv is not None:
            model._check_markers(ids0, kv.valid, stream.token_id)

    def embeds(seq: list[int], start: int) -> torch.Tensor | None:  # (1, len(seq) - start, D) or None
        if pe is None:
            return None
        P = len(prompt)
        parts = [pe[:, start:]] if start < P else []
        if len(seq) > max(start, P):
            parts.append(model.embed(torch.tensor([seq[max(start, P):]], device=device)))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def step(seq: list[int], start: int) -> torch.Tensor:
        nonlocal kept
        ids = torch.tensor([seq], device=device)
        if image is None and video is None:
            return model(ids[:, start:], start_pos=start, embeds=embeds(seq, start))[0, -1]
        ikv, vkv = kept if kept is not None else kvs()
        if not cache_media:
            kept = None  # later steps recompute them (the uncached comparison)
        return model(ids[:, start:], image=ikv, video=vkv, start_pos=start, embeds=embeds(seq, start),
                     **model.cross_masks(ids, ikv, vkv, start))[0, -1]

    return decode(model.lm, step, prompt, budget, greedy=greedy, temperature=temperature, top_p=top_p,
                  stop_ids=stop_ids, seed=seed, use_cache=use_cache)


@torch.no_grad()
def generate_rows(model: ComposedLM, prompt: list[int], max_new_tokens: int, *, image,
                  image_mask: torch.Tensor | None = None, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy continuations of one prompt (with its image placeholders), one per row of image: features (B, M, N, D)
    (image_mask (B, M)) or Pixels of B images, decoded together as one batch (llm.generate.decode_rows; the media
    keys/values computed once). Row r is generate(model, prompt, image=image[r:r+1]) up to the float reassociation of
    batched matmuls."""
    model.eval()
    device = model.output.weight.device
    if len(prompt) >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {model.cfg.max_seq_len}")
    image = to_device(image, device)
    n = image.pixels.shape[0] if isinstance(image, Pixels) else image.shape[0]
    seq = torch.tensor([prompt] * n, device=device)  # (n, P), grows by a column per step
    pe, image = _joined(model, seq, image, image_mask, None)
    ikv = None if image is None else model.image.kv(image, image_mask)
    if ikv is not None:
        model._check_markers(seq, ikv.valid, model.image.token_id)

    def step(ids: torch.Tensor | None, pos: int) -> torch.Tensor:  # (n, V)
        nonlocal seq
        if ids is not None:
            seq = torch.cat([seq, ids.to(device)], 1)
        x = seq[:, pos:]
        e = pe if ids is None else (None if pe is None else model.embed(x))
        if ikv is None:
            return model(x, start_pos=pos, embeds=e)[:, -1]
        return model(x, image=ikv, start_pos=pos, embeds=e, **model.cross_masks(seq, ikv, None, pos))[:, -1]

    return decode_rows(model.lm, step, n, len(prompt), min(max_new_tokens, model.cfg.max_seq_len - len(prompt)),
                       stop_ids=stop_ids)
