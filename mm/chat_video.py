"""`mm chat --video` on a video-stage run: one MP4 file decoded by the project's decoder (decord, PyAV fallback;
frame and pixel caps, DESIGN.md invariant 8), num_frames sampled uniformly, encoded and aggregated ONCE into the
video keys/values, and a Llama 3 chat reply generated with them cached. The user turn is `<|video|>` + the prompt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.decode import decode_video
from data.shards import BadSample
from llm.tokenizer import ChatFormat
from mm.chat_image import chat_prompt_ids
from mm.eval.video import clip_kv
from mm.fused import generate_fused

DESCRIBE = "Describe the video."


def read_video_file(path: str | Path, num_frames: int, size: int | None = None, backend: str = "auto") -> np.ndarray:
    """An MP4 file -> (num_frames, 3, H, W) uint8 sampled uniformly (data.decode.decode_video; size x size when
    given). FileNotFoundError / ValueError naming the file for a missing or undecodable one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such video file")
    try:
        frames = decode_video(p.read_bytes(), num_frames, size, backend)["frames"]  # (N, H, W, 3)
    except BadSample as e:
        raise ValueError(f"{p}: not a readable MP4 video ({e})") from None
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def video_prompt_ids(fmt: ChatFormat, text: str, system: str | None = None,
                     history: list[dict] | None = None) -> list[int]:
    """chat_prompt_ids with `<|video|>` opening the last user turn."""
    ids = chat_prompt_ids(fmt, text, False, system, history)
    at = len(ids) - len(fmt.tok.encode(text.strip())) - 1 - len(fmt.encode_header("assistant"))  # after the header
    return ids[:at] + [fmt.tok.special_id("<|video|>")] + ids[at:]


@torch.no_grad()
def chat_about_video(fused, vision, tok, path: str | Path, text: str | None = None, *, num_frames: int = 16,
                     system: str | None = None, max_new_tokens: int = 64, greedy: bool = False,
                     temperature: float = 0.8, seed: int | None = 0) -> str:
    """Decode the clip, encode + aggregate it once, and answer `<|video|>` + text (default "Describe the video.")."""
    vision.eval()
    frames = read_video_file(path, num_frames, vision.cfg.image_size)
    kv = clip_kv(fused, vision, frames, fused.output.weight.device)
    fmt = ChatFormat(tok)
    ids = video_prompt_ids(fmt, text if text is not None else DESCRIBE, system)
    out = generate_fused(fused, ids, None, max_new_tokens, video=kv, greedy=greedy, temperature=temperature,
                         seed=seed, stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    return fmt.decode_reply(out).strip()
