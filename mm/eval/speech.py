"""Speech metrics (PAPER.md §10.3-10.4): corpus WER after Whisper's English normaliser on both sides (mm.eval.wer;
overall, per TTS engine, per voice, per tagged subset), the same model with the audio removed ("blind"), the frozen
LM given the typed transcript (the text oracle), BLEU for speech translation (sacrebleu), spoken-QA exact match, and
offline recognisers on the same audio (mm.eval.asr_peer). Greedy decoding, as in the paper.
"""
from __future__ import annotations

from collections import defaultdict

import jiwer
import sacrebleu
import torch

from data.audio import iter_audio_samples
from data.dialog import dialog
from data.shards import SkipCounter, expand_shards
from data.speech_tasks import CHARS, char_text, reply_cap, task_choices
from data.token_stream import IGNORE
from llm.tokenizer import ChatFormat
from mm.eval.asr_peer import peer_figures
from mm.eval.stats import paired_bootstrap
from mm.eval.wer import corpus_wer, grouped_wer, item_tags, normalise_text, paired_wer_delta
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.media import Featurizer
from mm.model.streams import Audio


def corpus_bleu(refs: list[str], hyps: list[str]) -> float | None:
    """sacrebleu corpus BLEU (13a tokenisation) of hypotheses against one reference each; None without items."""
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score) if refs else None


def load_audio_items(shards: str, max_items: int = 0) -> tuple[list[dict], dict]:
    """The first max_items (0: all) decodable samples of audio shards, and the skip counts by reason; none readable is
    an error naming the shards."""
    skips = SkipCounter()
    items = []
    for s in iter_audio_samples(expand_shards(shards), skips):
        items.append(s)
        if max_items and len(items) >= max_items:
            break
    if not items:
        raise ValueError(f"{shards}: no readable audio samples (skipped: {skips.as_dict()})")
    return items, skips.as_dict()


@torch.no_grad()
def respond(model: ComposedLM, fmt: ChatFormat, system: str | None, audio, max_new_tokens: int = 48,
            featurize: Featurizer | None = None, text: str = "") -> str:
    """Greedy reply to one system prompt + audio (a float 16 kHz waveform; None: the blind prompt without speech) +
    optional typed user `text` (with audio None and text = the transcript: the text oracle). With audio the reply
    gets at most REPLY_TOKENS_PER_S tokens per second of speech, so a greedy repetition loop cannot add unbounded
    insertions."""
    tok = fmt.tok
    if audio is None:
        ids, _ = dialog(fmt, text, system=system)
        speech = None
    else:
        ids, _ = dialog(fmt, "", media=model.speech.placeholder_ids(model.speech.n_tokens(len(audio))), system=system)
        speech = (featurize or Featurizer())([audio])
        max_new_tokens = reply_cap(len(audio), max_new_tokens)
    if len(ids) >= model.cfg.max_seq_len:  # an utterance too long for the context gets an empty reply
        return ""
    out = generate(model, ids, max_new_tokens, speech=speech, stop_ids=(tok.eot_id, tok.eom_id, tok.eos_id))
    return fmt.decode_reply(out).strip()


@torch.no_grad()
def answer_loss(model: ComposedLM, fmt: ChatFormat, system: str | None, audio, answer: str,
                featurize: Featurizer | None = None, text: str = "") -> tuple[float, int]:
    """Teacher-forced (summed NLL, tokens) of the answer to one system prompt + audio (None: blind, no speech run)
    + optional typed user `text`: the training loss of one item, so held-out audio vs blind losses show whether the
    model uses the audio, and audio vs text-oracle losses how much of what the LM can use it gets."""
    dev = model.output.weight.device
    media = model.speech.placeholder_ids(model.speech.n_tokens(len(audio))) if audio is not None else ()
    ids, mask = dialog(fmt, text, answer, media=media, system=system)
    tokens = torch.tensor([ids[:-1]], device=dev)
    labels = torch.tensor([[t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]], device=dev)
    speech = None
    if audio is not None:
        feats, lens = (featurize or Featurizer())([audio])
        speech = Audio(feats.to(dev), lens.to(dev))
    loss = model(tokens, speech=speech, labels=labels)
    k = int((labels != IGNORE).sum())
    return float(loss) * k, k


@torch.no_grad()
def speech_eval(model: ComposedLM, tok, items: list[dict], max_new_tokens: int = 48, blind: bool = True,
                per_item: bool = False) -> dict:
    """Every item is transcribed (ASR); items with a translation are also translated (AST), items with an answer
    answered (spoken QA). Returns {"wer", "wer_by_engine", "wer_by_voice", "blind_wer"(_by_voice), "wer_by_tag" and
    "blind_wer_by_tag", "wer_vs_blind_by_tag" (the subsets named in the items' json "tags", when any), "bleu",
    "bleu_by_lang", "blind_bleu", "qa_em", "blind_qa_em", "n_asr", "n_ast", "n_sqa", "examples"} and, with blind,
    the teacher-forced per-token ASR loss with and without the audio ("asr_loss", "blind_asr_loss"), and the TEXT
    ORACLE: the same frozen LM given the reference transcript typed in the user turn instead of the audio
    ("text_asr_loss", and text_oracle's "text_wer", "text_wer_by_tag", "text_examples"); the paired intervals
    against blind: "wer_vs_blind" (paired_wer_delta) and "qa_em_vs_blind_ci95". No adapter can beat much what the LM does with the exact text, so these are the
    ceiling of the speech path: a tiny LM that cannot copy text cannot transcribe speech either (issue 7).
    per_item: also "per_item" {"refs", "hyps", "blind_hyps"}: the ASR transcripts in item order (paired tests)."""
    model.eval()
    fmt, featurize = ChatFormat(tok), Featurizer()
    asr: dict[str, list] = defaultdict(list)  # key -> [(ref, hyp, blind_hyp, engine, voice, tags)]
    ast, sqa, examples = [], [], []
    blind_cache: dict = {}
    nll = {"asr_loss": [0.0, 0], "blind_asr_loss": [0.0, 0], "text_asr_loss": [0.0, 0]}  # summed NLL, tokens

    def blind_reply(system: str | None) -> str:  # greedy + no audio: one reply per system prompt
        if not blind:
            return ""
        if system not in blind_cache:
            blind_cache[system] = respond(model, fmt, system, None, max_new_tokens)
        return blind_cache[system]

    for it in items:
        meta = it.get("meta") or {}
        tasks = task_choices(it["text"], meta)
        system, ref = tasks["asr"]
        hyp = respond(model, fmt, system, it["audio"], max_new_tokens, featurize)
        bl = blind_reply(system)
        asr["all"].append((ref, hyp, bl, meta.get("engine", "?"), meta.get("voice", "?"), item_tags(meta)))
        if blind:
            for key, audio, text in (("asr_loss", it["audio"], ""), ("blind_asr_loss", None, ""),
                                     ("text_asr_loss", None, ref)):
                s, k = answer_loss(model, fmt, system, audio, ref, featurize, text)
                nll[key][0] += s
                nll[key][1] += k
        if len(examples) < 6:
            examples.append({"task": "asr", "ref": ref, "hyp": hyp, "blind": bl})
        if "ast" in tasks:
            system, ref = tasks["ast"]
            hyp = respond(model, fmt, system, it["audio"], max_new_tokens, featurize)
            bl = blind_reply(system)
            ast.append((ref, hyp, bl, meta["translation"]["lang"]))
            if sum(e["task"] == "ast" for e in examples) < 3:
                examples.append({"task": "ast", "ref": ref, "hyp": hyp})
        if "sqa" in tasks:
            _, ref = tasks["sqa"]
            hyp = respond(model, fmt, None, it["audio"], max_new_tokens, featurize)
            bl = blind_reply(None)
            sqa.append((ref, hyp, bl))
            if sum(e["task"] == "sqa" for e in examples) < 3:
                examples.append({"task": "sqa", "q": it["text"], "ref": ref, "hyp": hyp})
    rows = asr["all"]
    out: dict = {"n_asr": len(rows), "n_ast": len(ast), "n_sqa": len(sqa)}
    out["wer"] = corpus_wer([r[0] for r in rows], [r[1] for r in rows])
    refs = [r[0] for r in rows]
    out["wer_by_engine"] = grouped_wer(refs, [r[1] for r in rows], [(r[3],) for r in rows])
    out["wer_by_voice"] = grouped_wer(refs, [r[1] for r in rows], [(r[4],) for r in rows])
    if blind:
        out["blind_wer_by_voice"] = grouped_wer(refs, [r[2] for r in rows], [(r[4],) for r in rows])
    if any(r[5] for r in rows):  # subsets a shard marks in its json "tags", e.g. the human set's letters_only prompts
        out["wer_by_tag"] = grouped_wer(refs, [r[1] for r in rows], [r[5] for r in rows])
        if blind:
            out["blind_wer_by_tag"] = grouped_wer(refs, [r[2] for r in rows], [r[5] for r in rows])
            out["wer_vs_blind_by_tag"] = {
                t: paired_wer_delta(*zip(*[r[:3] for r in rows if t in r[5]]), n_boot=1000)
                for t, w in out["wer_by_tag"].items() if w is not None}
    out["bleu"] = corpus_bleu([a[0] for a in ast], [a[1] for a in ast])
    by_lang = defaultdict(list)
    for a in ast:
        by_lang[a[3]].append(a)
    out["bleu_by_lang"] = {k: corpus_bleu([a[0] for a in v], [a[1] for a in v]) for k, v in sorted(by_lang.items())}
    em = lambda ref, hyp: float(normalise_text(ref) == normalise_text(hyp))  # noqa: E731
    out["qa_em"] = sum(em(r, h) for r, h, _ in sqa) / len(sqa) if sqa else None
    if blind:
        out["blind_wer"] = corpus_wer([r[0] for r in rows], [r[2] for r in rows])
        oracle = text_oracle(model, tok, items, max_new_tokens)  # greedy replies to the transcript typed instead
        out.update({k: v for k, v in oracle.items() if k != "items"})
        out["blind_bleu"] = corpus_bleu([a[0] for a in ast], [a[2] for a in ast])
        out["blind_qa_em"] = sum(em(r, b) for r, _, b in sqa) / len(sqa) if sqa else None
        if out["wer"] is not None:  # some reference words: WER - blind WER over the same utterances, paired
            out["wer_vs_blind"] = paired_wer_delta([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                                 n_boot=1000)
        if sqa:
            out["qa_em_vs_blind_ci95"] = paired_bootstrap([em(r, h) for r, h, _ in sqa], [em(r, b) for r, _, b in sqa],
                                                          None, 1000, 0)["ci95"]
        out.update({key: s / k if k else None for key, (s, k) in nll.items()})
    out["examples"] = examples
    if per_item:
        out["per_item"] = {"refs": [r[0] for r in rows], "hyps": [r[1] for r in rows], "blind_hyps": [r[2] for r in rows]}
    return out


@torch.no_grad()
def text_oracle(model: ComposedLM, tok, items: list[dict], max_new_tokens: int = 48) -> dict:
    """A (chat) LM alone on each item's ASR task with the reference transcript typed in the user turn instead of the
    audio: how well the LM a speech adapter would sit on copies (issue 23 item 3), with no speech run.
    {"items", "text_wer", "text_wer_by_tag" (when the items carry json "tags"), "text_examples"}."""
    model.eval()
    fmt = ChatFormat(tok)
    refs, hyps, tags = [], [], []
    for it in items:
        meta = it.get("meta") or {}
        system, ref = task_choices(it["text"], meta)["asr"]
        refs.append(ref)
        hyps.append(respond(model, fmt, system, None, max_new_tokens, text=ref))
        tags.append(item_tags(meta))
    out = {"items": len(items), "text_wer": corpus_wer(refs, hyps)}
    if any(tags):
        out["text_wer_by_tag"] = grouped_wer(refs, hyps, tags)
    out["text_examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:6]]
    return out


def ctc_greedy(logits: torch.Tensor, n: int) -> str:
    """Best-path decoding of one utterance's character logits (F', len(CHARS) + 1) over its first n frames: argmax,
    repeats merged, blanks (id 0) dropped."""
    best = logits[:n].argmax(-1).tolist()
    return "".join(CHARS[c - 1] for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


@torch.no_grad()
def acoustic_eval(encoder: torch.nn.Module, char_head: torch.nn.Module, items: list[dict],
                  batch_size: int = 16) -> dict:
    """The encoder's own transcription of held-out audio through the character CTC head (best path, no LM): the
    measure of an acoustic stage (speech_sft acoustic_only), also reported by eval_speech_shards with a char head.
    {"char_items", "char_cer" (characters, over char_text's alphabet), "char_wer" (Whisper-normalised words, as
    "wer"), "char_cer_by_voice", "char_examples"}."""
    encoder.eval()
    featurize, dev = Featurizer(), char_head.weight.device
    refs, hyps, voices = [], [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        feats, lens = featurize([it["audio"] for it in chunk])
        enc, enc_lens = encoder(feats.to(dev), lens.to(dev))  # (B, F', D_enc)
        logits = char_head(enc)  # (B, F', len(CHARS) + 1)
        for it, lg, n in zip(chunk, logits, enc_lens.tolist()):
            refs.append(char_text(it["text"]))
            hyps.append(ctc_greedy(lg, n))
            voices.append((it.get("meta") or {}).get("voice", "?"))
    by_voice = defaultdict(list)
    for r, h, v in zip(refs, hyps, voices):
        by_voice[v].append((r, h))
    cer = lambda pairs: float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))  # noqa: E731
    return {"char_items": len(refs), "char_cer": cer(list(zip(refs, hyps))), "char_wer": corpus_wer(refs, hyps),
            "char_cer_by_voice": {v: cer(p) for v, p in sorted(by_voice.items())},
            "char_examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:6]]}


def eval_speech_shards(model: ComposedLM | None, tok, shards: str, max_items: int = 0, max_new_tokens: int = 48,
                       blind: bool = True, per_item: bool = False, char_head: torch.nn.Module | None = None,
                       peers: tuple[str, ...] = ()) -> dict:
    """speech_eval on the first max_items (0: all) samples of any audio-text shards (DESIGN.md format); adds
    {"shards", "items", "skipped", "skipped_total"}, and acoustic_eval's char_* figures on the same items when a
    char head is given (speech_sft's training aid; saved models drop it). The one implementation behind `mm eval
    speech`, benchmarks/speech.py and the end-of-stage evaluation of speech_sft. peers: offline recognisers
    (mm.eval.asr_peer.PEERS) scored on the same items, {"peers": {name: peer_figures}}, paired against our
    transcripts; model None scores the peers alone."""
    items, skips = load_audio_items(shards, max_items)
    out = {"shards": shards, "items": len(items), "skipped": skips, "skipped_total": sum(skips.values())}
    if model is not None:
        out.update(speech_eval(model, tok, items, max_new_tokens, blind, per_item=per_item or bool(peers)))
    if char_head is not None:
        out.update(acoustic_eval(model.speech.encoder, char_head, items))
    if peers:
        ours = out["per_item"]["hyps"] if model is not None else None
        out["peers"] = {name: peer_figures(name, items, ours) for name in peers}
        if not per_item:
            out.pop("per_item", None)
    return out


@torch.no_grad()
def compare_speech(a: tuple[ComposedLM, object], b: tuple[ComposedLM, object], shards: str, max_items: int = 0,
                   max_new_tokens: int = 48, n_boot: int = 2000) -> dict:
    """Greedy ASR of the same held-out utterances by two (model, tokenizer) pairs, e.g. the BEST-RQ and random-init
    arms of the ablation, and paired_wer_delta (a minus b) over all of them and per voice:
    {"items", "skipped", **overall, "by_voice": {voice: {...}}}. Whether a WER gap is more than resampling noise."""
    items, skips = load_audio_items(shards, max_items)
    featurize, pairs = Featurizer(), [(model.eval(), ChatFormat(tok)) for model, tok in (a, b)]
    refs, voices, hyps = [], [], ([], [])
    for it in items:
        meta = it.get("meta") or {}
        system, ref = task_choices(it["text"], meta)["asr"]
        refs.append(ref)
        voices.append(meta.get("voice", "?"))
        for (model, fmt), out in zip(pairs, hyps):
            out.append(respond(model, fmt, system, it["audio"], max_new_tokens, featurize))
    res = {"items": len(items), "skipped": skips, **paired_wer_delta(refs, *hyps, n_boot)}
    res["by_voice"] = {}
    for v in sorted(set(voices)):
        pick = [i for i, x in enumerate(voices) if x == v]
        sel = lambda xs: [xs[i] for i in pick]  # noqa: E731
        res["by_voice"][v] = paired_wer_delta(sel(refs), sel(hyps[0]), sel(hyps[1]), n_boot)
    return res
