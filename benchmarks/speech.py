"""Speech benchmark: corpus WER of a speech_sft run on held-out voices (overall, per TTS engine, per voice) after
Whisper English normalisation of both sides, the same model with the audio removed (blind_wer), BLEU of speech
translation and spoken-QA exact match.

    python benchmarks/speech.py --ckpt runs/speech_sft_tiny [--shards VAL_SPEC] [--max-items N]
    python benchmarks/speech.py --ckpt RUN_A --against RUN_B    # paired: WER(A) - WER(B), bootstrap 95% CI
    python benchmarks/speech.py --lm CHAT_LM_RUN                # text oracle: the LM copies the typed transcripts
    python benchmarks/speech.py --ckpt RUN --shards ".cache/shards/speech_human/val-*.tar" --peer moonshine \
        --peer pocketsphinx    # offline recognisers on the same utterances, paired against ours (--ckpt optional)

Prints ONE JSON line (metric code: mm/eval/speech.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mm.cli import run_reporting  # noqa: E402
from mm.eval.asr_peer import PEERS  # noqa: E402
from mm.eval.speech import compare_speech, eval_speech_shards, load_audio_items, text_oracle  # noqa: E402
from mm.model.composed import ComposedLM  # noqa: E402
from mm.model.runs import load_lm  # noqa: E402
from mm.model.store import load_model  # noqa: E402


def load_speech(ckpt) -> tuple:
    """(model, tokenizer) of a run with a speech stream (speech_sft or a composed herd); ValueError otherwise."""
    model, tok, _ = load_model(ckpt)
    model.require("speech", ckpt)
    return model, tok


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.lm:  # the frozen LM alone, before any speech stage: its copying caps every speech path on it
        if args.ckpt or args.peer or args.against:
            raise ValueError("--lm scores a chat LM alone: give no --ckpt, --peer or --against with it")
        lm, tok, _ = load_lm(args.lm)
        items, skips = load_audio_items(args.shards, args.max_items)
        out = {"lm": str(args.lm), "shards": args.shards, "skipped": skips,
               **text_oracle(ComposedLM(lm), tok, items, args.max_new_tokens)}
        out["total_s"] = round(time.perf_counter() - t0, 1)
        return out
    if not args.ckpt and not args.peer:
        raise ValueError("give --ckpt (a speech run) or --peer (an offline recogniser), or both")
    if args.against and (args.peer or not args.ckpt):
        raise ValueError("--against compares two runs: give --ckpt and no --peer")
    model, tok = load_speech(args.ckpt) if args.ckpt else (None, None)
    out = {"ckpt": str(args.ckpt) if args.ckpt else None}
    if args.against:  # the ablation's question: is A's WER lower than B's on the same utterances, beyond noise?
        out["against"] = str(args.against)
        out.update(compare_speech((model, tok), load_speech(args.against), args.shards, args.max_items,
                                  args.max_new_tokens))
        out["total_s"] = round(time.perf_counter() - t0, 1)
        return out
    out.update(eval_speech_shards(model, tok, args.shards, args.max_items, args.max_new_tokens, blind=not args.no_blind,
                                  peers=tuple(args.peer or ())))
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="speech_sft run directory (or its final/ folder); optional with --peer")
    p.add_argument("--shards", default=".cache/shards/audio/val-*.tar", help="held-out audio-text shards")
    p.add_argument("--lm", help="a chat LM run alone: the text oracle (it copies the typed transcripts), no speech run")
    p.add_argument("--max-items", type=int, default=0, help="cap on utterances (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--against", help="a second speech_sft run: paired WER difference with a bootstrap 95%% CI")
    p.add_argument("--no-blind", action="store_true", help="skip the blind (no audio) pass")
    p.add_argument("--peer", action="append", choices=PEERS,
                   help="an offline recogniser scored on the same utterances (repeatable; pip install -e .[peers])")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    return run_reporting(evaluate, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
