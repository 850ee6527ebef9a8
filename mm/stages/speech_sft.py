"""Stage speech_sft (PAPER.md §9.5; DESIGN.md invariants 1, 4, 5): the Conformer (BEST-RQ-pretrained `encoder_from`,
or random init when null: the ablation) and a fresh speech adapter trained jointly into the frozen LM `lm`.

Each audio sample becomes one Llama 3 dialog for a task it supports, drawn with weights `tasks` (a pure function of
(seed, loader batch, row), so resume is exact): ASR (system "Repeat after me in English:", answer = transcript), AST
(system "Translate the following sentence into {language}:", answer = the shard json's translation) or spoken QA (no
system prompt, answer = json answer). The user turn is `<|speech_start|>` + one `<|speech|>` per adapter embedding +
`<|speech_end|>`; the loss is on the assistant answer only. Dialogs longer than seq_len are skipped and counted
(cutting one would cut its speech run). Features get SpecAugment masks. At the end the model is scored on
`eval_items` held-out items (mm.eval.speech). Optional, beyond the paper: ctc_weight > 0 adds the auxiliary token
CTC of each sample's transcript (annealed linearly to ctc_weight_end); distill_weight > 0 the KL from the frozen LM's
reply distributions with the transcript typed in the user turn (the teacher) to those with the speech (distill_kl);
char_ctc_weight > 0 a character CTC head on the encoder's frames (dropped at save), and acoustic_only trains the
encoder on it alone (an acoustic stage for a later speech_sft's encoder_from). The adapter is any speech design of adapters.registry: the YAML block `adapter:` is
{kind (default conv_rotary, the paper's), the design's Config fields, match_embed_scale}; the stage fills in_dim /
out_dim from the encoder / LM and, with match_embed_scale, a design's out_rms (a final RMSNorm on the LM's embedding
scale); learned speech markers (learn_markers) start as the LM's embedding of '"'. Final: final/{model.safetensors ("encoder.*", "adapter.*"), meta.json,
tokenizer.json}: a composed model folder (mm.model.store).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

import torch.nn.functional as F

from adapters import registry
from adapters.speech import SpeechTokens, embedding_rms, mask_speech_labels, token_ctc_loss
from data.dialog import collate_dialogs, dialog
from data.loader import Loader, StepFeed
from data.speech_tasks import CHARS, char_ids, task_choices
from data.token_stream import IGNORE
from encoders.speech import ConformerEncoder, SpecAugment
from llm.tokenizer import ChatFormat, Tokenizer
from mm.config import SpeechSFTConfig, speech_adapter_spec
from mm.model.composed import ComposedLM, param_counts
from mm.model.media import Featurizer
from mm.model.runs import load_lm, model_dir
from mm.model.store import load_speech_encoder, save_model
from mm.model.streams import SpeechEmbeds, SpeechStream
from mm.stages.speech_pretrain import train_on_audio
from mm.train.distributed import init_distributed, unwrap, wrap_model
from mm.train.trainer import StepOutput


def char_ctc_loss(logits: torch.Tensor, lens: torch.Tensor, targets: torch.Tensor, target_lens: torch.Tensor):
    """CTC of encoder-frame character logits (B, F, len(CHARS) + 1) against targets (B, L) (blank 0); mean over items
    of the per-character loss; an utterance with more characters than frames contributes 0 (zero_infinity)."""
    logp = logits.float().log_softmax(-1).transpose(0, 1)  # (F, B, C)
    return F.ctc_loss(logp, targets, lens, target_lens, blank=0, reduction="mean", zero_infinity=True)


class SpeechModel(nn.Module):
    """The composed model (`model`, with a speech stream) + `char_head`, the optional character CTC head on the
    encoder's frames (a training aid, never saved). forward(tokens (B, T), feats (B, F, 80), feat_lens (B,), labels
    (B, T)) -> the mean loss; with the auxiliary targets (one transcript per audio item) `ctc` = (token ids (B, L),
    lens (B,)) for the adapter's token CTC and / or `chars` = (char ids (B, L), lens (B,)) for the character CTC:
    (loss, {"ctc": ..., "char_ctc": ...})."""

    def __init__(self, model: ComposedLM, char_head: nn.Linear | None = None):
        super().__init__()
        self.model, self.char_head = model, char_head

    def char_loss(self, feats: torch.Tensor, feat_lens: torch.Tensor, chars: tuple) -> torch.Tensor:
        """The character CTC of the encoder alone, feats (B, F, 80) -> scalar (no adapter, no LM): the acoustic
        stage's loss (acoustic_only)."""
        return self._char_ctc(*self.model.speech.encoder(feats, feat_lens), chars)  # (B, F', D_enc), lengths

    def _char_ctc(self, enc: torch.Tensor, enc_lens: torch.Tensor, chars: tuple) -> torch.Tensor:
        if self.char_head is None:
            raise ValueError("character CTC targets given but the model has no char_head")
        return char_ctc_loss(self.char_head(enc), enc_lens, *chars)

    def forward(self, tokens, feats, feat_lens, labels=None, ctc=None, chars=None, teacher=None, temperature=1.0):
        sp = self.model.speech
        enc, enc_lens = sp.encoder(feats, feat_lens)  # (B, F', D_enc), 40 ms frames
        e, n = sp.adapter(enc, enc_lens)  # (B, N, D_lm), 40 ms x adapter stride
        aux = {}
        if teacher is not None:  # (tokens, labels) of the same dialogs with the transcript typed instead
            labels = mask_speech_labels(tokens, labels, sp.ids, IGNORE)
            h = self.model(tokens, speech=SpeechEmbeds(e, n), return_hidden=True)  # (B, T, D)
            out = self.model.lm.hidden_loss(h, labels, IGNORE)
            aux["distill"] = distill_kl(self.model, h, labels, *teacher, temperature)
        else:
            out = self.model(tokens, speech=SpeechEmbeds(e, n), labels=labels)
        if ctc is None and chars is None and not aux:
            return out
        if ctc is not None:
            aux["ctc"] = token_ctc_loss(e, n, self.model.tok_embeddings.weight, *ctc, sp.ids.placeholder)
        if chars is not None:
            aux["char_ctc"] = self._char_ctc(enc, enc_lens, chars)
        return out, aux


def distill_kl(model: ComposedLM, h: torch.Tensor, labels: torch.Tensor, t_tokens: torch.Tensor,
               t_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-reply-token KL(teacher || student) at a temperature (x T^2, Hinton et al.): the student's final hidden
    states h (B, T, D) at its labelled positions against the frozen LM alone on the teacher dialogs t_tokens (B, T2)
    at theirs. Both dialogs hold the same replies, so the labelled positions pair up in order; a count that differs is
    an error."""
    pick = labels != IGNORE  # (B, T)
    t_pick = t_labels != IGNORE  # (B, T2)
    if not torch.equal(pick.sum(1), t_pick.sum(1)):
        raise ValueError(f"distill: reply tokens per row differ: {pick.sum(1).tolist()} vs {t_pick.sum(1).tolist()}")
    with torch.no_grad():
        t_logits = model.output(model(t_tokens, return_hidden=True)[t_pick]).float() / temperature  # (K, V)
    s_logits = model.output(h[pick]).float() / temperature  # (K, V)
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def build_model(cfg: SpeechSFTConfig) -> tuple[SpeechModel, Tokenizer]:
    """Frozen LM + encoder (encoder_from's weights, or a fresh cfg.encoder shape) + a fresh adapter of the design
    cfg.adapter names (seeded; in_dim / out_dim / out_rms filled from the encoder and the LM)."""
    lm, tok, _ = load_lm(cfg.lm)
    torch.manual_seed(cfg.seed)
    if cfg.encoder_from:
        enc = load_speech_encoder(cfg.encoder_from)
    else:
        enc = ConformerEncoder(cfg.encoder.resolve())
    spec, knobs = speech_adapter_spec(cfg.adapter)
    spec.update(in_dim=enc.cfg.dim, out_dim=lm.cfg.dim)
    if "out_rms" in {f.name for f in dataclasses.fields(registry.parse("speech", spec)[0].Config)}:
        spec["out_rms"] = embedding_rms(lm.tok_embeddings.weight) if knobs["match_embed_scale"] else 0.0
    adapter = registry.build("speech", spec)
    if adapter.markers is not None:  # start from how typed text is quoted: the LM's embedding of '"', twice
        with torch.no_grad():
            adapter.markers.copy_(lm.tok_embeddings.weight[tok.encode('"')[0]].expand(2, -1))
    head = nn.Linear(enc.cfg.dim, len(CHARS) + 1) if cfg.char_ctc_weight > 0 else None
    return SpeechModel(ComposedLM(lm, speech=SpeechStream(enc, adapter, SpeechTokens.of(tok))), head), tok


def pick_task(text: str, meta: dict, weights: dict[str, float], rng: random.Random) -> tuple[str, str | None, str]:
    """(task, system prompt, answer) for one sample among the tasks it supports with weight > 0."""
    options = {k: v for k, v in task_choices(text, meta).items() if weights.get(k, 0.0) > 0}
    if not options:
        raise ValueError(f"tasks {dict(weights)} leave no task for a sample (asr needs weight > 0)")
    names = sorted(options)
    task = rng.choices(names, [weights[n] for n in names])[0]
    return (task, *options[task])


def ctc_weight_at(cfg: SpeechSFTConfig, b: int) -> float:
    """The auxiliary CTC weight for loader batch b: ctc_weight -> ctc_weight_end linearly over the run."""
    frac = min(1.0, b / max(1, cfg.steps * cfg.train.grad_accum - 1))
    return cfg.ctc_weight + (cfg.ctc_weight_end - cfg.ctc_weight) * frac


class SpeechFeed(StepFeed):
    """Micro-batches {tokens (B, T), labels (B, T), feats (B, F, 80), feat_lens (B,), n} (see the module doc), plus
    {ctc_targets (B, L), ctc_lens (B,), ctc_w} (transcript token ids) when the auxiliary CTC is on, and
    {char_targets (B, L), char_lens (B,)} (data.speech_tasks.char_ids) when the character CTC is."""

    def __init__(self, loader: Loader, tok: Tokenizer, cfg: SpeechSFTConfig, stream: SpeechStream,
                 device: torch.device):
        super().__init__(loader, cfg.train.grad_accum)
        self.fmt, self.cfg, self.device, self.pad_id, self.tok = ChatFormat(tok), cfg, device, tok.pad_id, tok
        self.stream = stream
        self.featurize = Featurizer(SpecAugment(cfg.spec_augment))
        self.skipped: Counter = Counter()
        self.tasks: Counter = Counter()

    def make(self, b: int, batch: dict) -> dict:
        dialogs, waves, texts, teacher = [], [], [], []  # teacher: the dialogs with the transcript typed (distill)
        for j, (audio, text, meta) in enumerate(zip(batch["audio"], batch["text"], batch["meta"])):
            task, system, answer = pick_task(text, meta, self.cfg.tasks, random.Random(f"{self.cfg.seed}:{b}:{j}"))
            n = self.stream.n_tokens(len(audio))
            ids, mask = dialog(self.fmt, "", answer, media=self.stream.placeholder_ids(n), system=system)
            typed = dialog(self.fmt, text, answer, system=system) if self.cfg.distill_weight > 0 else None
            if len(ids) > self.cfg.seq_len or (typed and len(typed[0]) > self.cfg.seq_len):
                self.skipped["dialog_too_long"] += 1
                continue
            dialogs.append((ids, mask))
            if typed:
                teacher.append(typed)
            waves.append(audio)
            texts.append(text)
            self.tasks[task] += 1
        if not dialogs:
            raise ValueError(f"loader batch {b}: every dialog is longer than seq_len {self.cfg.seq_len}")
        mb = collate_dialogs(dialogs, self.pad_id, self.cfg.seq_len)
        if teacher:
            t = collate_dialogs(teacher, self.pad_id, self.cfg.seq_len)
            mb["t_tokens"], mb["t_labels"] = t["tokens"], t["labels"]
        mb["feats"], mb["feat_lens"] = self.featurize(waves)
        if self.cfg.ctc_weight > 0 or self.cfg.ctc_weight_end > 0:
            ids = [torch.tensor(self.tok.encode(t.strip()), dtype=torch.long) for t in texts]
            mb["ctc_lens"] = torch.tensor([len(i) for i in ids])
            mb["ctc_targets"] = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)  # (B, L)
        if self.cfg.char_ctc_weight > 0:
            ids = [torch.tensor(char_ids(t), dtype=torch.long) for t in texts]
            mb["char_lens"] = torch.tensor([len(i) for i in ids])
            mb["char_targets"] = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)  # (B, L)
        mb = {k: v.to(self.device) for k, v in mb.items()}
        if "ctc_targets" in mb:
            mb["ctc_w"] = ctc_weight_at(self.cfg, b)
        mb["n"] = int((mb["labels"] != IGNORE).sum())
        return mb


def speech_loss(m, mb: dict, char_weight: float = 0.0, acoustic_only: bool = False, distill_weight: float = 0.0,
                temperature: float = 1.0) -> StepOutput:
    """Assistant-token loss of one micro-batch (mean over its labelled tokens), + ctc_w x the auxiliary token CTC,
    char_weight x the character CTC and distill_weight x distill_kl when on (then "lm_loss", "ctc", "char_ctc" and
    "distill" are logged apart); acoustic_only: the character CTC alone."""
    if acoustic_only:
        loss = m.char_loss(mb["feats"], mb["feat_lens"], (mb["char_targets"], mb["char_lens"]))
        return StepOutput(loss, int(mb["char_lens"].sum()), {"char_ctc": loss.detach()})
    ctc = (mb["ctc_targets"], mb["ctc_lens"]) if "ctc_targets" in mb else None
    chars = (mb["char_targets"], mb["char_lens"]) if "char_targets" in mb else None
    teacher = (mb["t_tokens"], mb["t_labels"]) if "t_tokens" in mb else None
    if ctc is None and chars is None and teacher is None:
        return StepOutput(m(mb["tokens"], mb["feats"], mb["feat_lens"], labels=mb["labels"]), mb["n"])
    lm_loss, aux = m(mb["tokens"], mb["feats"], mb["feat_lens"], labels=mb["labels"], ctc=ctc, chars=chars,
                     teacher=teacher, temperature=temperature)
    weights = {"ctc": mb.get("ctc_w", 0.0), "char_ctc": char_weight, "distill": distill_weight}
    total = lm_loss + sum(weights[k] * v for k, v in aux.items())
    return StepOutput(total, mb["n"], {"lm_loss": lm_loss.detach(), **{k: v.detach() for k, v in aux.items()}})


def run(cfg: SpeechSFTConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train encoder + adapter with the LM frozen; writes checkpoints/, final/, and the held-out figures."""
    t0 = time.perf_counter()
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    if cfg.acoustic_only and cfg.char_ctc_weight <= 0:
        raise ValueError("acoustic_only trains the encoder on the character CTC: set char_ctc_weight > 0")
    model, tok = build_model(cfg)
    stream = model.model.speech
    model.model.train_only("speech")  # + the char head, a training aid (DESIGN.md invariant 4)
    if cfg.acoustic_only:  # the adapter gets no gradient without the LM, so it stays out of the optimizer too
        stream.adapter.requires_grad_(False)
    counts = param_counts(model)
    net = wrap_model(model.to(info.device), cfg.train.parallel, info)
    loss_fn = functools.partial(speech_loss, char_weight=cfg.char_ctc_weight, acoustic_only=cfg.acoustic_only,
                                distill_weight=cfg.distill_weight, temperature=cfg.distill_temperature)
    records, loader, feed, trainer, train_s = train_on_audio(cfg, net, info, run_dir, loss_fn, resume,
                                                             lambda ld: SpeechFeed(ld, tok, cfg, stream, info.device))
    base = {"stage": cfg.stage, "steps": cfg.steps, "skipped": {**loader.skipped, **feed.skipped}}
    if trainer.stopped_at is not None:
        return {**base, "stopped_at": trainer.stopped_at, "checkpoint": trainer.last_checkpoint()}
    logs = [r["loss"] for r in records if "loss" in r]
    result = {**base, **{f"params_{k}": n for k, n in counts.items()}, "tasks": dict(feed.tasks),
              "encoder_from": cfg.encoder_from, "train_s": train_s,
              "first_loss": logs[0] if logs else None, "final_loss": logs[-1] if logs else None}
    for k in ("lm_loss", "ctc", "char_ctc", "distill"):
        vals = [r[k] for r in records if k in r]
        if vals:
            result[f"final_{k}"] = vals[-1]
    if info.is_main:
        meta = {"stage": cfg.stage, "step": cfg.steps, "lm": str(model_dir(cfg.lm).resolve()),
                "encoder_from": cfg.encoder_from}
        m = unwrap(net)
        final = save_model(run_dir / "final", m.model, tok, meta)
        if cfg.eval_items:  # an acoustic stage's adapter never trained: its encoder is scored on the char head only
            from mm.eval.speech import acoustic_eval, eval_speech_shards, load_audio_items

            t_eval = time.perf_counter()
            m.eval()
            if cfg.acoustic_only:
                ev = acoustic_eval(m.model.speech.encoder, m.char_head,
                                   load_audio_items(cfg.data.val_shards, cfg.eval_items)[0])
            else:  # with a char head this also scores the encoder's own transcription (char_cer, char_wer, ...)
                ev = eval_speech_shards(m.model, tok, cfg.data.val_shards, cfg.eval_items, char_head=m.char_head)
            result.update({k: v for k, v in ev.items() if k != "examples"}, eval_s=round(time.perf_counter() - t_eval, 1))
            (final.parent / "eval.json").write_text(json.dumps(ev, indent=1))
        result["total_s"] = round(time.perf_counter() - t0, 1)
    return result
