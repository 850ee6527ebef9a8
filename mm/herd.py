"""The herd (PAPER.md: "The Llama 3 Herd of Models"): ONE frozen Llama carrying the image and video adapters of a
video (or image) run and the speech encoder + adapter of a speech_sft run at once (DESIGN.md invariants 1, 5, 7).

`HerdLM` = `fused` (mm.fused.FusedLM: the LM under its own keys, image cross-attention, optional video adapter) +
`vision` (the image encoder) + `speech_encoder` / `speech_adapter`. Forward: the tokens' embeddings (FusedLM's own,
new-token rows included) with the speech adapter's outputs spliced over the `<|speech|>` runs
(adapters.speech.splice_speech), then FusedLM's layers with cross-attention to the image and video media. Without
audio it IS the FusedLM's forward, without any media the bare LM's; with audio only it equals SpeechLM's.
Generation reuses mm.fused.generate_fused: the speech is encoded and spliced once into the prompt embeddings, the
image / video keys/values are computed once.

`mm compose (--video RUN | --image RUN) --speech RUN --out HERD` checks that both runs were trained on the same LM
(a sha256 over the LM state dict, not the paths) and writes HERD/final/: model.safetensors ("vision.*",
"fused.*" adapter tensors, "speech_encoder.*", "speech_adapter.*"; no LM weights), meta.json (kind "herd", the
shapes, the LM folder and its sha256, checked again on load) and tokenizer.json. `load_herd(HERD)` rebuilds it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from adapters import registry
from adapters.speech import SpeechAdapter, SpeechTokens, mask_speech_labels, splice_speech
from encoders.speech import ConformerEncoder
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.checkpoint import CheckpointError, load_into, load_meta, load_tensors, save_weights
from mm.fused import FusedLM, MediaKV, generate_fused
from mm.model.runs import model_dir

KIND = "herd"


def lm_fingerprint(lm: nn.Module) -> str:
    """sha256 over an LM's state dict (sorted keys, dtype, shape and bytes of every tensor): equal iff the weights
    are bitwise equal (whatever folder they were read from)."""
    h = hashlib.sha256()
    for k, t in sorted(lm.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class HerdLM(nn.Module):
    """fused (FusedLM: LM + image adapter [+ video adapter]) + vision encoder + speech encoder + speech adapter, over
    the one LM held by `fused`. forward(tokens (B, T), media, video=..., speech (R, F, 80), speech_lens (R,)):
    one speech item per `<|speech|>` run, in row-major order; media / video as FusedLM.forward takes them."""

    def __init__(self, fused: FusedLM, vision: nn.Module, speech_encoder: ConformerEncoder,
                 speech_adapter: SpeechAdapter, speech_ids: SpeechTokens):
        super().__init__()
        if speech_adapter.cfg.in_dim != speech_encoder.cfg.dim or speech_adapter.cfg.out_dim != fused.cfg.dim:
            raise ValueError(f"speech adapter {speech_adapter.cfg.in_dim}->{speech_adapter.cfg.out_dim} does not join "
                             f"encoder width {speech_encoder.cfg.dim} to LM width {fused.cfg.dim}")
        self.fused, self.vision = fused, vision
        self.speech_encoder, self.speech_adapter, self.speech_ids = speech_encoder, speech_adapter, speech_ids

    @property
    def lm(self):
        """The one language model (shared by every adapter; registered under "fused.")."""
        return self.fused.lm

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the LM's tensors, under the herd's keys (what a herd checkpoint holds)."""
        lm_keys = {f"fused.{k}" for k in self.lm.state_dict()}
        return {k: v for k, v in self.state_dict().items() if k not in lm_keys}

    def speech_embeds(self, speech: torch.Tensor, speech_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log-mel (R, F, 80), (R,) -> adapter embeddings (R, N, D_lm) and their counts (R,)."""
        enc, n = self.speech_encoder(speech, speech_lens)
        return self.speech_adapter(enc, n)

    def embed(self, tokens: torch.Tensor, speech: torch.Tensor, speech_lens: torch.Tensor) -> torch.Tensor:
        """The fused model's token embeddings (B, T, D) with the speech spliced over the placeholder runs (a count
        that differs from the adapter's outputs is an error, DESIGN.md invariant 5)."""
        sp, n = self.speech_embeds(speech, speech_lens)
        return splice_speech(self.fused._embed(tokens), tokens, sp, n, self.speech_ids, self.speech_adapter.markers)

    def forward(self, tokens: torch.Tensor, media: torch.Tensor | MediaKV | None = None, *,
                video: torch.Tensor | MediaKV | None = None, speech: torch.Tensor | None = None,
                speech_lens: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kw):
        """Logits (B, T, V) (or the mean loss with labels, speech positions ignored); kw go to FusedLM.forward."""
        if speech is None:
            return self.fused(tokens, media, video=video, labels=labels, **kw)
        if speech_lens is None:
            raise ValueError("speech features need their lengths (speech_lens)")
        if labels is not None:
            labels = mask_speech_labels(tokens, labels, self.speech_ids)
        return self.fused(tokens, media, video=video, labels=labels, embeds=self.embed(tokens, speech, speech_lens),
                          **kw)


@torch.no_grad()
def generate_herd(herd: HerdLM, prompt: list[int], media: torch.Tensor | None, max_new_tokens: int, *,
                  video: torch.Tensor | MediaKV | None = None, speech: torch.Tensor | None = None,
                  speech_lens: torch.Tensor | None = None, **kw) -> list[int]:
    """generate_fused on the herd: the prompt's speech runs are filled from speech (R, F, 80) / speech_lens (R,) once
    (prompt embeddings), the image (media) / video keys/values computed once; kw as generate_fused."""
    herd.eval()
    pe = None
    if speech is not None:
        dev = herd.lm.output.weight.device
        pe = herd.embed(torch.tensor([prompt], device=dev), speech.to(dev), speech_lens.to(dev))
    return generate_fused(herd.fused, prompt, media, max_new_tokens, video=video, prompt_embeds=pe, **kw)


# ---- dialogs and chat -----------------------------------------------------------------------------------------------

def herd_prompt_ids(fmt: ChatFormat, ids: SpeechTokens, text: str, *, image: int = 0, video: bool = False,
                    n_speech: int = 0, system: str | None = None) -> list[int]:
    """BOS [+ system] + ONE user turn (`image` x `<|image|>` (FusedLM.image_run), `<|video|>`, the speech span of n_speech placeholders, then the
    text; each only when given) + the assistant header: the Llama 3 dialog format of the single-media chats."""
    tok = fmt.tok
    pre, _ = fmt.encode_dialog([{"role": "system", "content": system}] if system else [], add_generation_prompt=False)
    user = (fmt.encode_header("user") + [tok.special_id("<|image|>")] * int(image)
            + ([tok.special_id("<|video|>")] if video else []) + (ids.run(n_speech) if n_speech else [])
            + (tok.encode(text.strip()) if text.strip() else []))
    return pre + user + [tok.eot_id] + fmt.encode_header("assistant")


def default_text(image: bool, video: bool, audio: bool) -> str:
    """The user text when none is given: describe the visual media; with audio alone, none (a spoken question)."""
    if image or video:
        return "Describe the " + " and the ".join(n for n, on in (("image", image), ("video", video)) if on) + "."
    return ""


@torch.no_grad()
def chat_herd(herd: HerdLM, tok: Tokenizer, text: str | None = None, *, image: str | Path | None = None,
              video: str | Path | None = None, audio: str | Path | None = None, num_frames: int = 16,
              system: str | None = None, max_new_tokens: int = 64, greedy: bool = False, temperature: float = 0.8,
              seed: int | None = 0) -> str:
    """One reply to a user turn holding every given medium: the image file encoded once, the clip's frames encoded
    and aggregated once, the audio file's speech spliced in once (each file read by the project's decoders)."""
    from mm.chat_image import decode_size, read_image_file
    from mm.chat_speech import read_audio_file
    from mm.chat_video import read_video_file
    from mm.eval.image import image_media
    from mm.eval.video import clip_kv
    from mm.speech import Featurizer, n_speech_tokens

    if video is not None and herd.fused.video_adapter is None:
        raise ValueError("--video: this herd has no video adapter (it was composed from an image run)")
    herd.eval()
    dev = herd.lm.output.weight.device
    media = None if image is None else image_media(
        herd.vision, read_image_file(image, size=decode_size(herd.vision)), dev)
    kv = None if video is None else clip_kv(
        herd.fused, herd.vision, read_video_file(video, num_frames, herd.vision.cfg.image_size), dev)
    feats = lens = None
    n = 0
    if audio is not None:
        wave = read_audio_file(audio)
        n = n_speech_tokens(len(wave), herd.speech_encoder.cfg, herd.speech_adapter)
        feats, lens = Featurizer()([wave])
    if text is None:
        text = default_text(image is not None, video is not None, audio is not None)
    fmt = ChatFormat(tok)
    ids = herd_prompt_ids(fmt, herd.speech_ids, text, image=herd.fused.image_run if media is not None else 0,
                          video=kv is not None, n_speech=n,
                          system=system)
    out = generate_herd(herd, ids, media, max_new_tokens, video=kv, speech=feats, speech_lens=lens, greedy=greedy,
                        temperature=temperature, seed=seed, stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    return fmt.decode_reply(out).strip()


# ---- compose / save / load ------------------------------------------------------------------------------------------

def _lm_file(meta: dict) -> Path:
    return model_dir(meta["lm"]).resolve() / "model.safetensors"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Identical tokenizers: the same serialized vocabulary, merges and special tokens."""
    return a.hf.to_str() == b.hf.to_str()


def save_herd(directory: Path, herd: HerdLM, tok: Tokenizer, meta: dict, num_frames: int | None = None) -> Path:
    """A herd model folder (see the module doc); meta must name the LM folder ("lm")."""
    f = herd.fused
    va = f.video_adapter
    meta = {**meta, "kind": KIND, "lm_sha256": lm_fingerprint(herd.lm), "lm_config": f.cfg.to_dict(),
            "vision_config": herd.vision.cfg.to_dict(), "media_dim": herd.vision.cfg.out_dim,
            "image_adapter": registry.spec_of(f.image_adapter),
            "video": None if va is None else {"aggregator": registry.spec_of(va.aggregator), "every": va.every,
                                              "num_frames": int(num_frames or 16)},
            "encoder_config": herd.speech_encoder.cfg.to_dict(), "speech_adapter": registry.spec_of(herd.speech_adapter)}
    out = save_weights(Path(directory), {"model": herd.adapter_state_dict()}, meta)
    tok.save(out / "tokenizer.json")
    return out


def compose(speech: str | Path, out: str | Path, *, video: str | Path | None = None,
            image: str | Path | None = None) -> dict:
    """`mm compose`: the video (or image) run's FusedLM + vision encoder and the speech run's encoder + adapter over
    one LM, written to out/final. ValueError naming both LM files when the runs' LM weights differ."""
    from mm.speech import load_speech_model
    from mm.stages.image_pretrain import load_fused
    from mm.stages.video import load_video

    if (video is None) == (image is None):
        raise ValueError("mm compose needs exactly one of --video RUN / --image RUN (a video run holds the image "
                         "adapter too)")
    vdir, sdir = model_dir(video or image).resolve(), model_dir(speech).resolve()
    vmeta, smeta = load_meta(vdir), load_meta(sdir)
    if smeta.get("kind") != "speech":
        raise CheckpointError(f"{sdir / 'meta.json'}: not a speech_sft model (kind={smeta.get('kind')!r})")
    fused, vision, tok = load_video(vdir) if video is not None else load_fused(vdir)
    sp, stok = load_speech_model(sdir)
    a, b = lm_fingerprint(fused.lm), lm_fingerprint(sp.lm)
    if a != b:
        raise ValueError(f"cannot compose: the LMs differ: {_lm_file(vmeta)} (sha256 {a[:12]}, LM of {vdir}) vs "
                         f"{_lm_file(smeta)} (sha256 {b[:12]}, LM of {sdir}); both runs must be on one frozen LM")
    if not same_tokenizer(tok, stok):
        raise ValueError(f"cannot compose: {vdir / 'tokenizer.json'} and {sdir / 'tokenizer.json'} differ")
    herd = HerdLM(fused, vision, sp.encoder, sp.adapter, sp.ids).eval()
    frames = (vmeta.get("video") or {}).get("num_frames")
    meta = {"stage": "compose", "lm": str(model_dir(vmeta["lm"]).resolve()),
            "sources": {"video" if video is not None else "image": str(vdir), "speech": str(sdir)}}
    final = save_herd(Path(out) / "final", herd, tok, meta, frames)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in (
        ("lm", herd.lm), ("vision", vision), ("speech", nn.ModuleList([sp.encoder, sp.adapter])))}
    n["fused_adapters"] = sum(p.numel() for p in fused.adapter_parameters())
    return {"out": str(final), "lm": meta["lm"], "lm_sha256": a, "video": fused.video_adapter is not None,
            "params": n}


def run_compose(cfg, run_dir: Path, resume: bool = False) -> dict:
    """Stage `compose` (mm.config.ComposeConfig): compose(...) into run_dir, so a pipeline can chain it."""
    return {"stage": "compose", **compose(cfg.speech, run_dir, video=cfg.video or None, image=cfg.image or None)}


def load_herd(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[HerdLM, Tokenizer, dict]:
    """(HerdLM in eval mode, tokenizer, meta) from a `mm compose` run; CheckpointError when the LM folder's weights
    are no longer those the herd was composed on, or the tensors do not fit."""
    from encoders.speech import ConformerConfig
    from encoders.vision import VisionConfig, VisionEncoder
    from mm.model.runs import load_lm
    from mm.speech import speech_adapter_from_meta
    from mm.stages.image_pretrain import build_fused
    from mm.stages.video import video_spec

    d = model_dir(ckpt)
    meta = load_meta(d)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{d / 'meta.json'}: not a composed herd model (kind={meta.get('kind')!r}); "
                              "make one with mm compose")
    lm, _, _ = load_lm(meta["lm"])
    fp = lm_fingerprint(lm)
    if fp != meta["lm_sha256"]:
        raise CheckpointError(f"{_lm_file(meta)}: its weights (sha256 {fp[:12]}) are not the LM this herd was "
                              f"composed on ({d / 'meta.json'}: lm_sha256 {meta['lm_sha256'][:12]})")
    tok = Tokenizer.load(d / "tokenizer.json")
    image = meta.get("image_adapter") or {"kind": "gated_xattn", "config": {  # a herd composed before plug-ins
        "every": 1, "schedule": meta["image_layers"], "attend": meta["attend"], "n_xattn": None}}
    fused = build_fused(lm, tok, meta["media_dim"], image)
    if meta.get("video"):
        v = meta["video"]
        fused.add_video(meta["media_dim"], tok.special_id("<|video|>"), video_spec(v["aggregator"]), v["every"])
    herd = HerdLM(fused, VisionEncoder(VisionConfig(**meta["vision_config"])),
                  ConformerEncoder(ConformerConfig(**meta["encoder_config"])),
                  speech_adapter_from_meta(meta, d / "meta.json"), SpeechTokens.of(tok))
    path = d / "model.safetensors"
    sd = load_tensors(path)
    want = set(herd.adapter_state_dict())
    if set(sd) != want:
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CheckpointError(f"{path}: does not fit the herd: {what}")
    load_into(herd, sd, path, strict=False)
    return herd.to(device).eval(), tok, meta
