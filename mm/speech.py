"""The speech model (PAPER.md §9; DESIGN.md invariants 1, 4, 5): Conformer encoder -> speech adapter -> embeddings
spliced over the `<|speech|>` placeholders of a frozen Llama's input. Without audio it IS the bare LM's forward.

Also: speech dialogs (ASR / AST system prompts, spoken questions without one), audio -> padded features, greedy
generation from a spliced prompt, and saving / loading speech runs (final/model.safetensors holds "encoder.*" and
"adapter.*" only; the LM is read from the run named in meta "lm"; the adapter design is meta "speech_adapter", a
registry record {kind, config} (adapters.registry)).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import registry
from adapters.speech import SpeechTokens, mask_speech_labels, splice_speech, token_ctc_loss
from encoders.speech import ConformerConfig, ConformerEncoder, LogMel, SpecAugment, frames_for, pad_features
from llm.generate import _pick
from llm.model import Llama
from llm.tokenizer import ChatFormat, Tokenizer
from mm.model.checkpoint import CheckpointError, load_into, load_meta, load_tensors, save_weights
from mm.model.runs import load_lm, model_dir

ASR_PROMPT = "Repeat after me in {language}:"
AST_PROMPT = "Translate the following sentence into {language}:"
# ISO 639-1 codes of the paper's 34 languages (PAPER.md §9.1) -> the names the prompts use
LANGUAGES = {"ar": "Arabic", "bn": "Bengali", "zh": "Chinese", "cs": "Czech", "nl": "Dutch", "en": "English",
             "fi": "Finnish", "fr": "French", "de": "German", "el": "Greek", "gu": "Gujarati", "hi": "Hindi",
             "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "kn": "Kannada", "ko": "Korean",
             "ml": "Malayalam", "mr": "Marathi", "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
             "ru": "Russian", "es": "Spanish", "sw": "Swahili", "sv": "Swedish", "ta": "Tamil", "te": "Telugu",
             "th": "Thai", "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese"}


def language_name(code: str) -> str:
    """'es' -> 'Spanish' (unknown codes are used as given)."""
    return LANGUAGES.get(code, code)


# ---- the model ------------------------------------------------------------------------------------------------------

CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # the character CTC's symbols; id 0 is the blank, so CHARS[i] has id i + 1


def char_text(text: str) -> str:
    """Transcript -> what the character CTC spells: lower-cased, other characters dropped, runs of spaces collapsed."""
    return " ".join("".join(c for c in text.lower() if c in CHARS).split())


def char_ids(text: str) -> list[int]:
    """Transcript -> character CTC targets (the ids of char_text's characters)."""
    return [CHARS.index(c) + 1 for c in char_text(text)]


def char_ctc_loss(logits: torch.Tensor, lens: torch.Tensor, targets: torch.Tensor, target_lens: torch.Tensor):
    """CTC of encoder-frame character logits (B, F, len(CHARS) + 1) against targets (B, L) (blank 0); mean over items
    of the per-character loss; an utterance with more characters than frames contributes 0 (zero_infinity)."""
    logp = logits.float().log_softmax(-1).transpose(0, 1)  # (F, B, C)
    return F.ctc_loss(logp, targets, lens, target_lens, blank=0, reduction="mean", zero_infinity=True)


class SpeechLM(nn.Module):
    """encoder.* + adapter.* (any speech design of adapters.registry) + lm.* (frozen). forward(tokens (B, T), feats (B, F, 80) | None, feat_lens (B,),
    labels (B, T) | None) -> logits (B, T, V) or the mean loss; one audio item per placeholder run, in order.
    Auxiliary targets (one transcript per audio item): `ctc` = (token ids (B, L), lens (B,)) for the adapter's token
    CTC, `chars` = (char_ids (B, L), lens (B,)) for the character CTC on encoder frames (needs `char_head`); with
    either it returns (loss, {"ctc": ..., "char_ctc": ...})."""

    def __init__(self, encoder: ConformerEncoder, adapter: nn.Module, lm: Llama, ids: SpeechTokens,
                 char_head: nn.Linear | None = None):
        super().__init__()
        if adapter.cfg.in_dim != encoder.cfg.dim or adapter.cfg.out_dim != lm.cfg.dim:
            raise ValueError(f"adapter {adapter.cfg.in_dim}->{adapter.cfg.out_dim} does not join encoder width "
                             f"{encoder.cfg.dim} to LM width {lm.cfg.dim}")
        self.encoder, self.adapter, self.lm, self.ids = encoder, adapter, lm, ids
        self.char_head = char_head  # training aid only: not saved with the model

    def speech_embeds(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, 80), (B,) -> adapter embeddings (B, N, D_lm) and their counts (B,)."""
        enc, enc_lens = self.encoder(feats, feat_lens)
        return self.adapter(enc, enc_lens)

    def embed(self, tokens: torch.Tensor, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D) with the speech spliced in."""
        return splice_speech(self.lm.tok_embeddings(tokens), tokens, *self.speech_embeds(feats, feat_lens), self.ids,
                             self.adapter.markers)

    def char_loss(self, feats: torch.Tensor, feat_lens: torch.Tensor, chars: tuple) -> torch.Tensor:
        """The character CTC of the encoder alone, feats (B, F, 80) -> scalar (no adapter, no LM): the acoustic
        stage's loss (speech_sft acoustic_only)."""
        return self._char_ctc(*self.encoder(feats, feat_lens), chars)  # encoder: (B, F', D_enc), lengths

    def _char_ctc(self, enc: torch.Tensor, enc_lens: torch.Tensor, chars: tuple) -> torch.Tensor:
        if self.char_head is None:
            raise ValueError("character CTC targets given but the model has no char_head")
        return char_ctc_loss(self.char_head(enc), enc_lens, *chars)

    def forward(self, tokens, feats=None, feat_lens=None, labels=None, ctc=None, chars=None):
        if feats is None:  # no audio: the bare LM (DESIGN.md invariant 1)
            return self.lm(tokens, labels=labels)
        if labels is not None:
            labels = mask_speech_labels(tokens, labels, self.ids)
        enc, enc_lens = self.encoder(feats, feat_lens)  # (B, F', D_enc), 40 ms frames
        sp, n = self.adapter(enc, enc_lens)  # (B, N, D_lm), 40 ms x adapter stride
        h = splice_speech(self.lm.tok_embeddings(tokens), tokens, sp, n, self.ids, self.adapter.markers)
        out = self.lm(embeds=h, labels=labels)
        if ctc is None and chars is None:
            return out
        aux = {}
        if ctc is not None:
            aux["ctc"] = token_ctc_loss(sp, n, self.lm.tok_embeddings.weight, *ctc, self.ids.placeholder)
        if chars is not None:
            aux["char_ctc"] = self._char_ctc(enc, enc_lens, chars)
        return out, aux


def n_speech_tokens(n_samples: int, enc_cfg: ConformerConfig, adapter: nn.Module) -> int:
    """Adapter embeddings (= `<|speech|>` placeholders) for an utterance of n_samples at 16 kHz: the speech design's
    `n_out` of the encoder's frames (80 ms each at the paper's adapter stride 2)."""
    return int(adapter.n_out(enc_cfg.out_frames(frames_for(int(n_samples)))))


def freeze_lm(model: SpeechLM, frozen: tuple[str, ...] = ("lm.",)) -> dict[str, int]:
    """requires_grad on everything outside the `frozen` prefixes: encoder.* and adapter.* (and a char_head) by default
    (DESIGN.md invariant 4); {"trainable": n, "frozen": n}."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


# ---- features and dialogs -------------------------------------------------------------------------------------------

class Featurizer:
    """Waveforms -> padded normalised log-mel (B, F, 80) + lengths; optional SpecAugment and a frame crop."""

    def __init__(self, augment: SpecAugment | None = None):
        self.logmel, self.augment = LogMel(), augment

    def __call__(self, waves, max_frames: int = 0, rng: np.random.Generator | None = None):
        feats = []
        for w in waves:
            f = self.logmel(torch.as_tensor(np.asarray(w, dtype=np.float32)))  # (F, 80)
            if max_frames and f.shape[0] > max_frames:  # random crop of long utterances (PAPER.md §9.4)
                s = int((rng or np.random.default_rng(0)).integers(0, f.shape[0] - max_frames + 1))
                f = f[s:s + max_frames]
            feats.append(self.augment(f) if self.augment is not None else f)
        return pad_features(feats)


def speech_dialog(fmt: ChatFormat, ids: SpeechTokens, n_speech: int, system: str | None, answer: str | None,
                  text: str = "") -> tuple[list[int], list[bool]]:
    """BOS [+ system] + user (speech run [+ text]) + assistant header [+ answer + eot]; mask True on the answer and
    its eot (the loss is on the assistant answer only). n_speech 0 gives the blind prompt (no speech run)."""
    tok = fmt.tok
    pre, _ = fmt.encode_dialog([{"role": "system", "content": system}] if system else [], add_generation_prompt=False)
    user = fmt.encode_header("user") + (ids.run(n_speech) if n_speech else []) + (tok.encode(text.strip())
                                                                                   if text.strip() else [])
    out = pre + user + [tok.eot_id] + fmt.encode_header("assistant")
    mask = [False] * len(out)
    if answer is not None:
        body = tok.encode(str(answer).strip()) + [tok.eot_id]
        out, mask = out + body, mask + [True] * len(body)
    return out, mask


def task_choices(text: str, meta: dict) -> dict[str, tuple[str | None, str]]:
    """The tasks one audio sample supports: {"asr": (system, transcript), "ast": (system, translation)?,
    "sqa": (None, answer)?} (spoken questions take no system prompt, PAPER.md §9.1)."""
    lang = (meta or {}).get("language") or "en"
    out = {"asr": (ASR_PROMPT.format(language=language_name(lang)), text)}
    tr = (meta or {}).get("translation")
    if isinstance(tr, dict) and tr.get("text") and tr.get("lang"):
        out["ast"] = (AST_PROMPT.format(language=language_name(tr["lang"])), str(tr["text"]))
    if (meta or {}).get("answer"):
        out["sqa"] = (None, str(meta["answer"]))
    return out


# ---- generation -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_speech(model: SpeechLM, prompt: list[int], feats: torch.Tensor | None, feat_lens: torch.Tensor | None,
                    max_new_tokens: int, *, greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95,
                    stop_ids: tuple[int, ...] = (), seed: int | None = None) -> list[int]:
    """Continue a prompt whose speech runs are filled from feats (1, F, 80) (None: a text-only prompt); the prompt is
    embedded once (prefill), then tokens are decoded with the LM's KV cache."""
    model.eval()
    lm = model.lm
    dev = lm.output.weight.device
    budget = min(max_new_tokens, lm.cfg.max_seq_len - len(prompt))
    if budget <= 0:
        return []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = torch.tensor([prompt], device=dev)
    h = model.embed(seq, feats.to(dev), feat_lens.to(dev)) if feats is not None else lm.tok_embeddings(seq)
    out: list[int] = []
    try:
        lm.setup_cache(1, len(prompt) + budget)
        logits = lm(embeds=h)[0, -1]
        pos = len(prompt)
        for _ in range(budget):
            nxt = _pick(logits.cpu(), greedy, temperature, top_p, gen)
            if nxt in stop_ids:
                break
            out.append(nxt)
            if len(out) < budget:
                logits = lm(torch.tensor([[nxt]], device=dev), start_pos=pos)[0, -1]
                pos += 1
    finally:
        lm.clear_cache()
    return out


# ---- saving / loading -----------------------------------------------------------------------------------------------

def save_speech_model(directory: Path, model: SpeechLM, tok: Tokenizer, meta: dict) -> Path:
    """final/: encoder.* + adapter.* tensors (no LM), meta.json (kind speech, encoder_config, speech_adapter: the
    design's {kind, config}, lm), tokenizer.json."""
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"adapter.{k}": v for k, v in model.adapter.state_dict().items()})
    meta = {**meta, "kind": "speech", "encoder_config": model.encoder.cfg.to_dict(),
            "speech_adapter": registry.spec_of(model.adapter)}
    out = save_weights(Path(directory), {"model": state}, meta)
    tok.save(out / "tokenizer.json")
    return out


def speech_adapter_from_meta(meta: dict, where: Path) -> nn.Module:
    """A fresh (untrained) speech adapter of the design a run's meta records: "speech_adapter" ({kind, config}), or,
    for a run written before designs were plug-ins, "adapter_config" (the paper's conv_rotary); CheckpointError
    naming `where` (the meta file) when neither is there or the record does not build."""
    spec = meta.get("speech_adapter")
    if spec is None and "adapter_config" in meta:
        spec = {"kind": "conv_rotary", "config": meta["adapter_config"]}
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: no speech_adapter record (not a speech run)")
    try:
        return registry.build("speech", spec)
    except registry.DesignError as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_encoder(ckpt: str | Path, prefix: str = "encoder.") -> ConformerEncoder:
    """The Conformer of a speech_pretrain or speech_sft run (meta encoder_config + its encoder.* tensors)."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    if "encoder_config" not in meta:
        raise CheckpointError(f"{d / 'meta.json'}: no encoder_config (not a speech run)")
    enc = ConformerEncoder(ConformerConfig(**meta["encoder_config"]))
    sd = {k[len(prefix):]: v for k, v in load_tensors(d / "model.safetensors").items() if k.startswith(prefix)}
    load_into(enc, sd, d / "model.safetensors")
    return enc


def load_speech_model(ckpt: str | Path, device: str | torch.device = "cpu",
                      lm: str | Path | None = None) -> tuple[SpeechLM, Tokenizer]:
    """Rebuild (SpeechLM in eval mode, tokenizer) from a speech_sft run; the LM is meta "lm" unless `lm` is given."""
    d = model_dir(ckpt)
    meta = load_meta(d)
    if meta.get("kind") != "speech":
        raise CheckpointError(f"{d / 'meta.json'}: not a speech_sft model (kind={meta.get('kind')!r})")
    base, tok, _ = load_lm(lm or meta["lm"], device)
    adapter = speech_adapter_from_meta(meta, d / "meta.json")
    sd = {k[len("adapter."):]: v for k, v in load_tensors(d / "model.safetensors").items() if k.startswith("adapter.")}
    load_into(adapter, sd, d / "model.safetensors")
    model = SpeechLM(load_encoder(d), adapter, base, SpeechTokens.of(tok))
    return model.to(device).eval(), tok
