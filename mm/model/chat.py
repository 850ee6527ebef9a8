"""`mm chat` on any composed run: one user turn holding every given medium (an image file, a clip, an audio file)
and the text, the media read by the project's decoders (caps), each encoded ONCE, and a Llama 3 chat reply decoded
with the media keys/values cached. The user turn is the image placeholders, `<|video|>`, the speech span, then the
text (data.dialog)."""
from __future__ import annotations

from pathlib import Path

import torch

from data.dialog import dialog
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.media import (Featurizer, decode_size, frames_to_pixels, images_to_pixels, read_audio_file,
                            read_image_file, read_video_file)


def default_text(image: bool, video: bool, audio: bool) -> str:
    """The user text when none is given: describe the visual media; with audio alone, none (a spoken question)."""
    if image or video:
        return "Describe the " + " and the ".join(n for n, on in (("image", image), ("video", video)) if on) + "."
    return ""


@torch.no_grad()
def chat(model: ComposedLM, tok: Tokenizer, text: str | None = None, *, image: str | Path | None = None,
         video: str | Path | None = None, audio: str | Path | None = None, system: str | None = None,
         history: list[dict] | None = None, max_new_tokens: int = 64, greedy: bool = False, temperature: float = 0.8,
         seed: int | None = 0) -> str:
    """One assistant reply (module doc); a medium the model has no stream for is a ValueError naming it."""
    for name, given in (("image", image), ("video", video), ("audio", audio)):
        if given is not None and getattr(model, "speech" if name == "audio" else name) is None:
            raise ValueError(f"--{name}: this model has no {'speech' if name == 'audio' else name} stream "
                             f"(streams: {', '.join(model.streams()) or 'none'})")
    model.eval()
    media: list[int] = []
    kw = {}
    if image is not None:
        vcfg = model.image.encoder.cfg
        kw["image"] = images_to_pixels([torch.as_tensor(read_image_file(image, size=decode_size(vcfg)))],
                                       vcfg.image_size, vcfg.max_tiles)
        media += model.image.placeholder_ids()
    if video is not None:
        vcfg = model.image.encoder.cfg
        frames = read_video_file(video, model.video.num_frames, vcfg.image_size)
        kw["video"] = model.video_kv(frames_to_pixels(torch.as_tensor(frames)[None], vcfg))
        media += model.video.placeholder_ids()
    if audio is not None:
        wave = read_audio_file(audio)
        kw["speech"] = Featurizer()([wave])
        media += model.speech.placeholder_ids(model.speech.n_tokens(len(wave)))
    if text is None:
        text = default_text(image is not None, video is not None, audio is not None)
    fmt = ChatFormat(tok)
    ids, _ = dialog(fmt, text, media=media, system=system, history=history or ())
    out = generate(model, ids, max_new_tokens, greedy=greedy, temperature=temperature, seed=seed,
                   stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id), **kw)
    return fmt.decode_reply(out).strip()
