"""The `mm` command: run stages, data, compose, chat, export, evaluate. Each ends with one JSON line."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from mm.model.checkpoint import CheckpointError
from mm.config import ConfigError
from mm.train.trainer import Preempted

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after a checkpoint; re-run with --resume

USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, KeyError, RuntimeError)


def emit(result: dict) -> None:
    """Print the closing JSON line (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


def cmd_run(args) -> dict:
    from mm.runner import run_config

    run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    return run_config(args.config, args.overrides, run_dir, resume=args.resume, force=args.force,
                      break_lock=args.break_lock)


FETCHERS = {  # `mm data fetch --only ...` groups -> (module, function)
    "text": ("data.fetch", "fetch_text"),
    "chat": ("data.chat_kit", "fetch_chat"),
    "image": ("data.image_sources", "fetch_images"),
    "speech": ("data.tts", "fetch_engines"),
    "photos": ("data.photo_kit", "fetch_photos"),
    "human_speech": ("data.human_speech_kit", "fetch_human_speech"),
}


def cmd_data(args) -> dict:
    import importlib

    from data.fetch import default_cache_dir

    cache = Path(args.cache) if args.cache else default_cache_dir()
    if args.action == "fetch":
        groups = args.only.split(",") if args.only else list(FETCHERS)
        unknown = sorted(set(groups) - set(FETCHERS))
        if unknown:
            raise ValueError(f"--only: unknown group {unknown[0]!r}; known: {sorted(FETCHERS)}")
        out = {}
        for g in groups:
            module, fn = FETCHERS[g]
            out[g] = getattr(importlib.import_module(module), fn)(cache)
        return {"fetched": out, "cache": str(cache)}
    if args.action == "build":
        from data.kit import build_kit

        out = Path(args.out) if args.out else cache.parent / "shards"
        m = build_kit(args.target or "experiments/data/kit.yaml", cache, out)
        return {"out": str(out), "timings_s": m["timings_s"], "parts": m["parts"]}
    from data.inspect import inspect_shards

    if not args.target:
        raise ValueError("mm data inspect needs a shard spec (a glob, brace pattern, folder or file)")
    png = Path(args.png) if args.png else None
    res = inspect_shards(args.target, png)
    for e in res.get("examples", [])[:4]:
        print(f"  {e}", file=sys.stderr)
    return res


def _is_composed(ckpt) -> bool:
    """Is this run a composed model (any image / video / speech stage, or mm compose), as opposed to an LM?"""
    from mm.model.checkpoint import load_meta
    from mm.model.runs import model_dir

    return load_meta(model_dir(ckpt)).get("kind") in ("composed", "image", "speech", "herd")


def add_media_caps(p: argparse.ArgumentParser) -> None:
    """The per-file media caps as flags (defaults: data.decode.MediaCaps)."""
    from data.decode import MediaCaps

    d = MediaCaps()
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"image: refuse more pixels (default "
                   f"{d.max_pixels}), read from the header before decoding")
    p.add_argument("--max-frame-pixels", type=int, default=d.max_frame_pixels,
                   help=f"video: refuse frames larger than this many pixels (default {d.max_frame_pixels})")
    p.add_argument("--max-frames", type=int, default=d.max_frames,
                   help=f"video: refuse clips with more frames; never decode more (default {d.max_frames})")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help=f"audio: refuse longer files, from the header (default {d.max_audio_seconds:g})")


def apply_media_caps(args) -> None:
    from data.decode import MediaCaps, set_media_caps

    set_media_caps(MediaCaps(args.max_pixels, args.max_frame_pixels, args.max_frames, args.max_audio_seconds))


def cmd_chat(args) -> dict:
    from llm.generate import generate
    from llm.tokenizer import ChatFormat

    apply_media_caps(args)
    gen_kw = dict(greedy=args.greedy, temperature=args.temperature, seed=args.seed)
    given = {k: getattr(args, k) for k in ("image", "video", "audio") if getattr(args, k)}
    history: list[dict] = []
    if _is_composed(args.ckpt):  # any composed run: every given medium in one user turn (mm/model/chat.py)
        from data.speech_tasks import ASR_PROMPT
        from mm.model.chat import chat
        from mm.model.store import load_model

        model, tok, _ = load_model(args.ckpt)
        system, prompt = args.system, args.prompt
        if set(given) == {"audio"} and set(model.streams()) == {"speech"}:  # a speech run: --prompt is the system
            system = next((x for x in (args.prompt, args.system) if x is not None), ASR_PROMPT.format(
                language="English")) or None  # prompt it was trained with ('' for spoken questions); greedy
            prompt, gen_kw["greedy"] = "", True
        if given:
            return {"text": chat(model, tok, prompt, system=system, max_new_tokens=args.max_new_tokens, **given,
                                 **gen_kw), **given, **({"system": system} if "audio" in given else {})}
        chat_template = True

        def reply(text: str, history: list[dict]) -> str:
            return chat(model, tok, text, system=args.system, history=history, max_new_tokens=args.max_new_tokens,
                        **gen_kw)
    else:
        if given:
            raise ValueError(f"--{next(iter(given))} needs a multimodal run; {args.ckpt} is a text model")
        from mm.model.runs import load_lm

        model, tok, meta = load_lm(args.ckpt)
        chat_template = bool(meta.get("chat")) and not args.raw
        fmt = ChatFormat(tok)
        stops = (tok.eot_id, tok.eom_id, tok.eos_id)

        def reply(text: str, history: list[dict]) -> str:
            if chat_template:
                msgs = ([{"role": "system", "content": args.system}] if args.system else []) + history
                msgs.append({"role": "user", "content": text})
                ids, _ = fmt.encode_dialog(msgs, add_generation_prompt=True)
            else:
                ids = tok.encode(text, bos=True)
            out = generate(model, ids, args.max_new_tokens, stop_ids=stops, **gen_kw)
            return tok.decode(out)

    if args.prompt is not None:
        return {"text": reply(args.prompt, []), "chat_template": chat_template}
    print("interactive chat; an empty line or Ctrl-D ends it", file=sys.stderr)
    turns = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        answer = reply(line, history)
        print(answer, flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        turns += 1
    return {"turns": turns}


def cmd_compose(args) -> dict:
    from mm.model.store import compose, runs_of

    return compose(runs_of(args.video, args.image, args.speech), Path(args.out))


def cmd_export(args) -> dict:
    from llm.export import export_hf
    from mm.model.runs import load_lm

    model, tok, _ = load_lm(args.ckpt)
    return export_hf(model, tok, Path(args.out))


def cmd_average(args) -> dict:
    from mm.train.average import average_runs

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if weights is not None and len(weights) != len(args.runs):
        raise ValueError(f"--weights has {len(weights)} values for {len(args.runs)} runs")
    return average_runs(args.runs, Path(args.out), weights)


def cmd_import(args) -> dict:
    """`mm import hf`: a Hugging Face Llama folder -> an LM run (mm.lm_import); `mm import open_clip|timm`: a
    pretrained ViT checkpoint -> a vision run directory (mm.vision_import)."""
    if args.kind == "hf":
        from mm.lm_import import import_hf_run

        return import_hf_run(args.model, args.out, chat=args.chat, force=args.force)
    if not args.arch:
        raise ValueError(f"mm import {args.kind}: --arch is required")
    from mm.vision_import import import_vision_run

    taps = [int(t) for t in args.taps.split(",")] if args.taps else None
    return import_vision_run(args.kind, args.model, args.arch, args.out, image_size=args.image_size, taps=taps,
                             n_gated=args.n_gated, max_tiles=args.max_tiles, seed=args.seed, force=args.force)


def cmd_eval(args) -> dict:
    apply_media_caps(args)
    given = [f"--{k}" for k in ("shards", "tsv", "jsonl") if getattr(args, k)]
    if args.modality != "image" and given != ["--shards"]:
        raise ValueError(f"mm eval {args.modality}: needs --shards (--tsv / --jsonl are for image); got {given}")
    if len(given) != 1:
        raise ValueError(f"mm eval image: give exactly one of --shards, --tsv, --jsonl; got {given}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.modality != "text":
        from mm.model.store import load_model

        model, tok, _ = load_model(args.ckpt)
        model.require(args.modality, f"mm eval {args.modality}: {args.ckpt}")
    if args.modality == "image":
        from mm.eval.image import eval_image_file, eval_image_shards

        kw = dict(max_items=args.max_items, max_new_tokens=args.max_new_tokens, blind=not args.no_blind,
                  decode_scale=args.decode_scale, seed=args.seed)
        if args.shards:
            return {"ckpt": str(args.ckpt), **eval_image_shards(model, tok, args.shards, **kw)}
        kind = "tsv" if args.tsv else "jsonl"
        return {"ckpt": str(args.ckpt), **eval_image_file(model, tok, args.tsv or args.jsonl, kind, **kw)}
    if args.modality == "video":
        from mm.eval.video import eval_video_shards

        return {"ckpt": str(args.ckpt), **eval_video_shards(model, tok, args.shards, args.frames or None,
                                                            args.max_items, args.max_new_tokens, seed=args.seed)}
    if args.modality == "speech":
        from mm.eval.speech import eval_speech_shards

        return {"ckpt": str(args.ckpt), **eval_speech_shards(model, tok, args.shards, args.max_items,
                                                             max(args.max_new_tokens, 48), blind=not args.no_blind)}
    from data.shards import SkipCounter, expand_shards, iter_text_docs
    from mm.eval.text import bits_per_byte
    from mm.model.runs import load_lm

    model, tok, _ = load_lm(args.ckpt)
    skips = SkipCounter()
    texts = [d["text"] for d in iter_text_docs(expand_shards(args.shards), skips)]
    if not texts:
        raise ValueError(f"{args.shards}: no readable text documents (skipped: {skips.as_dict()})")
    return {"val_bpb": bits_per_byte(model, tok, texts, args.seq_len), "docs": len(texts), "skipped": skips.as_dict()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a stage from YAML into a run directory")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key=value overrides")
    r.add_argument("--out", help="run directory (default runs/<config name>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--force", action="store_true", help="retrain even if the run directory holds a result or an "
                   "interrupted run (a pipeline: retrain only the steps whose config or inputs changed)")
    r.add_argument("--break-lock", action="store_true", help="take the run directory's lock even if another host "
                   "holds it (only when that run is known to be gone)")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("data", help="fetch / build / inspect the real data kit")
    d.add_argument("action", choices=["fetch", "build", "inspect"])
    d.add_argument("target", nargs="?", help="build: kit YAML (default experiments/data/kit.yaml); inspect: shards")
    d.add_argument("--cache", help="data cache (default .cache/data or $MM_DATA_CACHE)")
    d.add_argument("--out", help="shard output dir (build; default .cache/shards)")
    d.add_argument("--only", help="fetch: comma-separated groups among text,chat,image,speech,photos,"
                   "human_speech (default all)")
    d.add_argument("--png", help="inspect: where to write the contact sheet")
    d.set_defaults(fn=cmd_data)
    c = sub.add_parser("chat", help="talk to a trained model")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--prompt")
    c.add_argument("--system")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--greedy", action="store_true")
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--raw", action="store_true", help="no chat template, plain continuation")
    c.add_argument("--image", help="a PNG/JPEG file to ask about (image-stage runs); prompt default: "
                                   "'Describe the image.'. On a composed run (mm compose) --image, --video and "
                                   "--audio go together into one user turn, followed by --prompt")
    c.add_argument("--audio", help="a wav/flac file (speech_sft runs); --prompt is then the system prompt "
                                   "(default 'Repeat after me in English:'; '' for spoken questions). On a "
                                   "composed run --prompt is the user text after the media and --system the system "
                                   "prompt")
    c.add_argument("--video", help="an MP4 file to ask about (video-stage runs); prompt default: "
                                   "'Describe the video.'")
    add_media_caps(c)
    c.set_defaults(fn=cmd_chat)
    h = sub.add_parser("compose", help="one model: a video (or image) run's streams + a speech run's, on their "
                                       "shared frozen LM")
    src = h.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video-stage run (holds the image adapter and encoder too)")
    src.add_argument("--image", help="an image-stage run (no video adapter)")
    h.add_argument("--speech", required=True, help="a speech_sft run on the same LM")
    h.add_argument("--out", required=True, help="the composed run directory (for mm chat --ckpt)")
    h.set_defaults(fn=cmd_compose)
    e = sub.add_parser("export", help="export a model")
    e.add_argument("format", choices=["hf"])
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_export)
    a = sub.add_parser("average", help="average the weights of several runs of one shape (model soup)")
    a.add_argument("runs", nargs="+")
    a.add_argument("--out", required=True)
    a.add_argument("--weights", help="comma-separated weights (default: equal)")
    a.set_defaults(fn=cmd_average)
    im = sub.add_parser("import", help="a Hugging Face Llama folder -> an LM run (for lm= / instruct_lm=); a "
                        "pretrained open_clip / timm ViT checkpoint -> a vision run (for vision= and vision_from=)")
    im.add_argument("kind", choices=["hf", "open_clip", "timm"])
    im.add_argument("--model", required=True, help="hf: the model folder; open_clip / timm: the checkpoint "
                                                   "(.safetensors or a weights-only torch file)")
    im.add_argument("--chat", action="store_true", help="hf: an instruct model (mm chat uses the chat template)")
    im.add_argument("--arch", help="open_clip / timm (required): open_clip model name (ViT-B-16, ViT-B-32-quickgelu, ...) or timm "
                                                   "ViT name, or a .json arch file (encoders/import_vit.py)")
    im.add_argument("--out", required=True, help="the run directory to write")
    im.add_argument("--image-size", type=int, help="tile side (default the checkpoint's; position embeddings are "
                                                   "resampled otherwise)")
    im.add_argument("--taps", help="comma-separated 0-based block indices (default: the paper's, scaled to depth)")
    im.add_argument("--n-gated", type=int, help="gated layers after the ViT (default max(1, layers // 4))")
    im.add_argument("--max-tiles", type=int, default=1)
    im.add_argument("--seed", type=int, default=0, help="init seed of the new (non-imported) parameters")
    im.add_argument("--force", action="store_true", help="overwrite an existing RUN/final")
    im.set_defaults(fn=cmd_import)
    v = sub.add_parser("eval", help="score a model on shards (image: or a TSV / JSONL benchmark file)")
    v.add_argument("modality", choices=["text", "image", "video", "speech"])
    v.add_argument("--ckpt", required=True)
    v.add_argument("--shards", help="held-out shards (required but for image benchmark files)")
    v.add_argument("--tsv", help="image: a VLMEvalKit-style TSV benchmark (index, image base64, question, "
                                 "[A..D], answer, [category]) instead of --shards")
    v.add_argument("--jsonl", help="image: an lmms-eval-style JSONL benchmark (image path/base64, question, "
                                   "answers|answer, [choices], [category]) instead of --shards")
    v.add_argument("--seq-len", type=int, default=512, help="text: context length")
    v.add_argument("--max-items", type=int, default=400, help="image: cap on VQA questions (0: all)")
    v.add_argument("--max-new-tokens", type=int, default=8, help="image: answer length")
    v.add_argument("--no-blind", action="store_true", help="image: skip the blind / shuffled-image passes")
    v.add_argument("--decode-scale", type=int, default=1, help="image: decode at this many tile sides")
    v.add_argument("--seed", type=int, default=0, help="image / video: sample subset seed")
    v.add_argument("--frames", type=int, default=0, help="video: frames sampled per clip (0: the run's)")
    v.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    add_media_caps(v)
    v.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:  # `key=value` overrides may stand anywhere after `mm run CONFIG`
        if args.cmd != "run" or any("=" not in e or e.startswith("-") for e in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return run_reporting(args.fn, args)


def run_reporting(fn, args) -> int:
    """Run fn(args) and end with the one JSON line: results (exit 0) or one error line on stderr (exit 2)."""
    try:
        result = fn(args)
    except Preempted as e:
        again = shlex.join(["mm", "run", args.config, "--out", str(args.out or Path("runs") / Path(args.config).stem),
                          *args.overrides, "--resume"]) if args.cmd == "run" else "the same command with --resume"
        print(f"preempted: {e}; continue with: {again}", file=sys.stderr)
        emit({"ok": False, "preempted": True, "step": e.step, "checkpoint": e.checkpoint})
        return PREEMPTED_EXIT
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        emit({"ok": False, "error": msg})
        return 2
    emit({"ok": True, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
