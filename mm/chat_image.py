"""`mm chat` on an image-stage run: one image file decoded by the project's decoder (pixel cap, DESIGN.md invariant
8), encoded ONCE into one media item, and a Llama 3 chat reply generated with the media keys/values cached
(generate_fused). The user turn is `<|image|>` + the prompt text; without an image the fused model is the bare LM."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.decode import decode_image
from data.shards import BadSample
from llm.tokenizer import ChatFormat
from mm.eval.image import image_media
from mm.fused import generate_fused

DESCRIBE = "Describe the image."


def read_image_file(path: str | Path, max_pixels: int | None = None, size: int | None = None) -> np.ndarray:
    """A PNG/JPEG file -> (3, H, W) uint8 via data.decode.decode_image (resized to size x size when given).
    FileNotFoundError / ValueError, both naming the file, for a missing, unreadable, truncated or non-image file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
    try:
        img = decode_image(p.read_bytes(), max_pixels, size)  # (H, W, 3)
    except BadSample as e:
        why = str(e) if e.reason == "image_too_large" else e.reason  # PIL's detail names a BytesIO, not the file
        raise ValueError(f"{p}: not a readable PNG/JPEG image ({why})") from None
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def decode_size(vision) -> int | None:
    """Decode resolution for one chat image: single-tile encoders see the image squashed to their square tile, as
    in training and benchmarks/image.py; tiled encoders get the native image, tiled with its aspect ratio kept."""
    return vision.cfg.image_size if vision.cfg.max_tiles == 1 else None


def chat_prompt_ids(fmt: ChatFormat, text: str, image: int, system: str | None = None,
                    history: list[dict] | None = None) -> list[int]:
    """BOS [+ system] [+ history] + user turn (`image` x `<|image|>` first: FusedLM.image_run, 0 for none) + the
    assistant header."""
    tok = fmt.tok
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    ids, _ = fmt.encode_dialog(msgs, add_generation_prompt=False)
    user = fmt.encode_header("user") + [tok.special_id("<|image|>")] * int(image) + tok.encode(text.strip())
    return ids + user + [tok.eot_id] + fmt.encode_header("assistant")


@torch.no_grad()
def chat_reply(fused, tok, text: str, media: torch.Tensor | None = None, *, system: str | None = None,
               history: list[dict] | None = None, max_new_tokens: int = 64, greedy: bool = False,
               temperature: float = 0.8, seed: int | None = 0) -> str:
    """One assistant reply of the fused model; media: one encoded image (1, N, D) from image_media, or None."""
    fmt = ChatFormat(tok)
    ids = chat_prompt_ids(fmt, text, fused.image_run if media is not None else 0, system, history)
    out = generate_fused(fused, ids, media, max_new_tokens, greedy=greedy, temperature=temperature, seed=seed,
                         stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    return fmt.decode_reply(out).strip()


def chat_about_image(fused, vision, tok, path: str | Path, text: str | None = None, **kw) -> str:
    """Decode the image file, encode it once, and answer `<|image|>` + text (default "Describe the image.")."""
    vision.eval()
    media = image_media(vision, read_image_file(path, size=decode_size(vision)), fused.output.weight.device)
    return chat_reply(fused, tok, text if text is not None else DESCRIBE, media, **kw)
