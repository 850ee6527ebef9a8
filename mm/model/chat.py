"""Chat with a composed model: one user turn holding every given medium and the text (the image placeholders,
`<|video|>`, the speech span, then the text; data.dialog), each medium encoded ONCE, and a Llama 3 reply decoded with
the media keys/values cached. `chat` reads files with the project's decoders (caps); `reply` takes media already
read or encoded (notebooks, multi-turn demos)."""
from __future__ import annotations

from pathlib import Path

import torch

from data.dialog import dialog
from data.speech_tasks import reply_cap
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.media import (Featurizer, decode_size, frames_to_pixels, images_to_pixels, read_audio_file,
                            read_image_file, read_video_file)
from mm.model.streams import Audio


def default_text(image: bool, video: bool, audio: bool) -> str:
    """The user text when none is given: describe the visual media; with audio alone, none (a spoken question)."""
    if image or video:
        return "Describe the " + " and the ".join(n for n, on in (("image", image), ("video", video)) if on) + "."
    return ""


@torch.no_grad()
def reply(model: ComposedLM, tok: Tokenizer, text: str, *, image=None, video=None, speech: Audio | None = None,
          system: str | None = None, history=(), max_new_tokens: int = 64, greedy: bool = False,
          temperature: float = 0.8, seed: int | None = 0) -> str:
    """One assistant reply to a user turn of one image (Pixels, features (1, 1, N, D) or its MediaKV), one clip
    (Frames, frame features or its MediaKV), one utterance (Audio) and the text, after `history` turns."""
    media: list[int] = []
    if image is not None:
        media += model.require("image").placeholder_ids()
    if video is not None:
        media += model.require("video").placeholder_ids()
    if speech is not None:
        media += model.require("speech").placeholder_ids(model.speech.n_tokens_of(speech)[0])
    fmt = ChatFormat(tok)
    ids, _ = dialog(fmt, text, media=media, system=system, history=history)
    out = generate(model, ids, max_new_tokens, image=image, video=video, speech=speech, greedy=greedy,
                   temperature=temperature, seed=seed, stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    return fmt.decode_reply(out).strip()


def chat(model: ComposedLM, tok: Tokenizer, text: str | None = None, *, image: str | Path | None = None,
         video: str | Path | None = None, audio: str | Path | None = None, max_new_tokens: int = 64,
         **kw) -> str:
    """`reply` to media files (module doc); text None: default_text. With audio alone the reply gets at most
    REPLY_TOKENS_PER_S tokens per second of audio (data.speech_tasks.reply_cap), as in the speech eval. A medium the
    model has no stream for is a ValueError naming it."""
    for name, given in (("image", image), ("video", video), ("speech", audio)):
        if given is not None:
            model.require(name)
    model.eval()
    media = {}
    if image is not None:
        vcfg = model.image.encoder.cfg
        img = torch.as_tensor(read_image_file(image, size=decode_size(vcfg)))
        media["image"] = images_to_pixels([img], vcfg)
    if video is not None:
        vcfg = model.image.encoder.cfg
        frames = read_video_file(video, model.video.num_frames, vcfg.image_size)
        media["video"] = frames_to_pixels(torch.as_tensor(frames)[None], vcfg)
    if audio is not None:
        wave = read_audio_file(audio)
        media["speech"] = Featurizer()([wave])
        if image is None and video is None:
            max_new_tokens = reply_cap(len(wave), max_new_tokens)
    if text is None:
        text = default_text(image is not None, video is not None, audio is not None)
    return reply(model, tok, text, max_new_tokens=max_new_tokens, **media, **kw)
