"""Stage `herd_report`: score every trained part of a herd run against its baseline and write report.md.

Each benchmark script (benchmarks/text.py, image.py, video.py, speech.py) runs as a subprocess, so the stage measures
exactly what a user's command line would print and frees each model's memory when it ends; its JSON line is kept in
benchmarks/<name>.json. Rows compare a model with its baseline (bare-LM unigram, the pretrained LM, DPO's SFT and a
tie under a held-out judge, the blind model, another image, the single middle frame) and say whether it beats it.
Reference rows are no control: peers (an offline OCR or ASR tool a user would pick instead, on the same items) and
ceilings (the frozen LM given the typed transcript: what any speech adapter on it can reach) go to their own tables
and count in no "beats". mm.eval.report draws the plots and writes the markdown.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data.shards import expand_shards
from mm.config import HerdReportConfig
from mm.eval.report import write_report
from mm.eval.stats import paired_bootstrap

REPO = Path(__file__).resolve().parents[2]


class BenchmarkError(RuntimeError):
    """A benchmark script failed; the message holds its error line."""


def run_benchmark(script: str, args: list[str], out: Path, threads: int) -> dict:
    """Run benchmarks/<script> with args, keep its JSON line in `out`, return it (reused when `out` exists)."""
    if out.exists():
        return json.loads(out.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args]
    print(f"[herd_report] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # the caller's cwd: its relative paths
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {"ok": False, "error": f"no JSON line (exit {proc.returncode})"}
    if not res.get("ok", proc.returncode == 0):
        raise BenchmarkError(f"benchmarks/{script} {' '.join(args)}: {res.get('error')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


REF_TABLES = {  # reference rows (no control, no "beats") -> their table's title
    "peer": "Peers: offline tools a user would pick instead, on the same items (a reference, not a control)",
    "ceiling": "Ceilings: the frozen LM given the typed transcript, what any speech adapter on it can reach "
               "(a reference, not a control)"}


def row(modality: str, metric: str, model, baseline, baseline_name: str, lower_is_better: bool = False,
        ci: list[float] | None = None, ref: str = "") -> dict:
    """One benchmark-table row; "beats" says whether the model is better than its baseline: with ci (the paired 95%
    interval of model - baseline, shown as "gain_ci95") only when the interval excludes 0 on the better side, else
    (a row without an item-level pairing) when it is strictly better. ref ("peer" | "ceiling"): the baseline is a
    reference, not a control ("ref" kept, "beats" None)."""
    beats = None
    if ref:  # a reference is no control: nothing to beat
        if ref not in REF_TABLES:
            raise ValueError(f"row ref {ref!r} unknown; known: {sorted(REF_TABLES)}")
    elif ci is not None:
        beats = ci[1] < 0 if lower_is_better else ci[0] > 0
    elif isinstance(model, (int, float)) and isinstance(baseline, (int, float)):
        beats = model < baseline if lower_is_better else model > baseline
    return {"modality": modality, "metric": metric, "model": model, "baseline": baseline,
            "baseline_name": baseline_name, **({"gain_ci95": ci} if ci is not None else {}), "beats": beats,
            **({"ref": ref} if ref else {})}


def text_rows(cfg: HerdReportConfig, bench: Path) -> tuple[list[dict], list[dict]]:
    """LM bits per byte against the unigram model; the chat model's exact match against the pretrained LM's; with sft
    and judge, DPO against its SFT (dpo_rows)."""
    n = str(cfg.max_items)
    held = ["--chat-shards", cfg.chat_shards, "--pref-shards", cfg.pref_shards, "--max-items", n, "--no-progress"]
    lm = run_benchmark("text.py", ["--ckpt", cfg.lm, "--no-progress"], bench / "text_lm.json", cfg.threads)
    rows = [row("text", "val_bpb", lm["val_bpb"], lm["unigram_bpb"], "unigram model", lower_is_better=True,
                ci=lm.get("vs_unigram_ci95"))]
    examples: list[dict] = []
    if cfg.chat:
        base = run_benchmark("text.py", ["--ckpt", cfg.lm, "--chat", *held],
                             bench / "chat_pretrained.json", cfg.threads)
        chat = run_benchmark("text.py", ["--ckpt", cfg.chat, *held],
                             bench / "chat.json", cfg.threads)
        a, b = chat.get("exact_match_items"), base.get("exact_match_items")  # the same held-out items, paired
        ci = paired_bootstrap(a, b, None, 1000, 0)["ci95"] if a and b and len(a) == len(b) else None
        rows.append(row("chat", "exact_match", chat["exact_match"]["overall"], base["exact_match"]["overall"],
                        "pretrained LM", ci=ci))
        if "chosen_frac" in chat:
            ci = chat.get("chosen_frac_ci95")
            rows.append(row("chat", "chosen_frac", chat["chosen_frac"], 0.5, "chance",
                            ci=[ci[0] - 0.5, ci[1] - 0.5] if ci else None))
        if cfg.sft and cfg.judge:
            rows += dpo_rows(cfg, bench)
        elif cfg.sft or cfg.judge:
            raise ValueError("herd_report: the DPO-vs-SFT rows need both sft and judge (one of them is empty)")
    return rows, examples


def dpo_rows(cfg: HerdReportConfig, bench: Path) -> list[dict]:
    """DPO against the SFT it started from: the win rate judged by a reward model trained on the other half of the
    preference pairs (sampled replies on win_items held-out prompts, against a tie), and chosen_frac (both policies
    on the pretrained LM as reference) and exact match, each paired over the same held-out items."""
    n = str(max(cfg.win_items, cfg.max_items))
    held = ["--chat", "--chat-shards", cfg.chat_shards, "--pref-shards", cfg.pref_shards, "--max-items", n,
            "--reference", cfg.lm, "--no-progress"]
    dpo = run_benchmark("text.py", ["--ckpt", cfg.chat, *held, "--rm", cfg.judge, "--vs", cfg.sft,
                                    "--win-items", str(cfg.win_items)], bench / "dpo_vs_sft.json", cfg.threads)
    sft = run_benchmark("text.py", ["--ckpt", cfg.sft, *held], bench / "sft.json", cfg.threads)
    if "rm_win_rate_ci95" not in dpo:
        raise ValueError(f"herd_report: {cfg.chat_shards}: no held-out chat prompt with an answer for the DPO win rate")
    lo, hi = dpo["rm_win_rate_ci95"]
    rows = [row("chat", f"DPO win rate vs SFT ({len(dpo['rm_win_items'])} prompts, held-out RM judge)",
                dpo["rm_win_rate_vs"], 0.5, "tie", ci=[lo - 0.5, hi - 0.5])]
    for name, items in (("chosen_frac", "chosen_items"), ("exact_match", "exact_match_items")):
        a, b = dpo[items], sft[items]  # the same held-out pairs / items in the same order; each figure is their mean
        rows.append(row("chat", f"DPO {name} vs SFT's", sum(a) / len(a), sum(b) / len(b), "SFT",
                        ci=paired_bootstrap(a, b, None, 1000, 0)["ci95"]))
    rows[-1]["beats"] = rows[-1]["gain_ci95"][1] >= 0  # exact match: DPO must not be below its SFT
    return rows


def image_rows(cfg: HerdReportConfig, bench: Path) -> tuple[list[dict], list[dict]]:
    """VQA accuracy against the blind model and against another sample's image (the reading gain, with its
    interval); text bits per byte of the composed model without media against the LM."""
    peer = ["--peer", cfg.ocr_peer] if cfg.ocr_peer else []
    r = run_benchmark("image.py", ["--ckpt", cfg.image, "--max-items", str(cfg.max_items), "--examples-dir",
                                   str(bench.parent / "examples"), *peer], bench / "image.json", cfg.threads)
    g = r.get("reading") or {}
    rows = [row("image", "vqa_acc", r["vqa_acc"], r["blind_vqa_acc"], "blind (no image)",
                ci=g.get("blind_gain_ci95"))]
    if g:  # the control that isolates reading: another sample's image; beats when the interval does
        rows.append(row("image", "vqa_acc vs another image", g["acc"], g["shuffled"], "shuffled image",
                        ci=g["gain_ci95"]))
    p = r.get("ocr_peer") or {}
    if p.get("acc") is not None:  # an OCR recogniser a user would pick instead, on the same OCR items
        rows.append(row("image", f"ocr items ({p['items']})", p["ours"], p["acc"], f"OCR peer {p['name']}",
                        ci=p["ci95"], ref="peer"))
    elif p:  # the peer is not installed here: the row says so
        rows.append(row("image", "ocr items", None, None, f"OCR peer {p['name']}: {p.get('error')}", ref="peer"))
    if cfg.photo_shards and _exists(cfg.photo_shards):  # real photographs, held out (a kit may predate them)
        ph = run_benchmark("image.py", ["--ckpt", cfg.image, "--shards", cfg.photo_shards, "--max-items", "0",
                                        "--text-docs", "0"], bench / "photos.json", cfg.threads)["reading"]
        rows.append(row("image", f"real photos ({ph['items']})", ph["acc"], ph["shuffled"], "shuffled photo",
                        ci=ph["gain_ci95"]))
    if "text_bpb" in r:
        rows.append(row("image", "text_bpb (no image)", r["text_bpb"], r["lm_text_bpb"], "bare LM (must be equal)"))
        rows[-1]["beats"] = r["text_bpb"] == r["lm_text_bpb"]  # preservation: equal is the pass
    ex = [{"modality": f"image ({e.get('family', '?')})", "input": image_link(e, bench.parent), "prompt": e["q"],
           "output": e["pred"], "reference": " / ".join(e["answers"][:3])}
          for e in {e.get("family"): e for e in reversed(r.get("examples", []))}.values()]  # first of each family
    return rows, ex


def _exists(spec: str) -> bool:
    try:
        return bool(expand_shards(spec))
    except FileNotFoundError:
        return False


def reading_tables(image_json: Path) -> list[tuple[str, list[dict], list[str]]]:
    """The image model's reading per task family, per source, and on the naming questions per source (accuracy with
    the image, another sample's image and none; the gain over the shuffled image with its 95% interval), when the
    image benchmark ran."""
    if not image_json.exists():
        return []
    r = json.loads(image_json.read_text())
    cols = ["group", "items", "acc", "shuffled", "blind", "gain", "gain_ci95"]
    titles = {"reading_by_family": "Image reading by family", "reading_by_source": "Image reading by source",
              "naming_by_source": "Image naming questions (the label in words) by source"}
    return [(title, [{"group": g, **v} for g, v in r[key].items()], cols) for key, title in titles.items()
            if r.get(key)]


def image_link(example: dict, report_dir: Path) -> str:
    """The example's saved image relative to report.md (so the markdown embeds it), else a placeholder."""
    path = example.get("image")
    if not path:
        return "held-out image"
    try:
        return str(Path(path).resolve().relative_to(report_dir.resolve()))
    except ValueError:
        return str(path)


def video_rows(cfg: HerdReportConfig, bench: Path) -> tuple[list[dict], list[dict]]:
    """Video QA accuracy against the blind model; the temporal families against the single middle frame."""
    r = run_benchmark("video.py", ["--ckpt", cfg.video, "--max-items", str(cfg.max_items)], bench / "video.json",
                      cfg.threads)
    rows = [row("video", "video_acc", r["video_acc"], r["blind_acc"], "blind (no video)", ci=r.get("blind_gain_ci95"))]
    t = r.get("temporal") or {}
    if t.get("video_acc") is not None:
        rows.append(row("video", "temporal video_acc", t["video_acc"], t["single_frame_acc"], "single middle frame",
                        ci=t.get("gap_ci95")))
    ex = [{"modality": "video", "input": "held-out clip", "prompt": e["q"].splitlines()[0], "output": e["video"],
           "reference": e["gold"]} for e in r.get("examples", [])[:3]]
    return rows, ex


def speech_rows(cfg: HerdReportConfig, bench: Path) -> tuple[list[dict], list[dict]]:
    """WER against the blind model (lower is better); BLEU and spoken-QA exact match against blind."""
    r = run_benchmark("speech.py", ["--ckpt", cfg.speech, "--max-items", str(cfg.max_items)], bench / "speech.json",
                      cfg.threads)
    rows = [row("speech", "wer", r["wer"], r.get("blind_wer"), "blind (no audio)", lower_is_better=True,
                ci=(r.get("wer_vs_blind") or {}).get("ci95"))]
    if r.get("bleu") is not None:
        rows.append(row("speech", "bleu", r["bleu"], r.get("blind_bleu"), "blind (no audio)"))
    if r.get("qa_em") is not None:
        rows.append(row("speech", "qa_em", r["qa_em"], r.get("blind_qa_em"), "blind (no audio)",
                        ci=r.get("qa_em_vs_blind_ci95")))
    if r.get("text_wer") is not None:  # the LM's own ceiling: the transcript typed instead of spoken
        rows.append(row("speech", "wer", r["wer"], r["text_wer"], "the frozen LM given the typed transcript",
                        lower_is_better=True, ref="ceiling"))
    ex = [{"modality": f"speech ({e['task']})", "input": "held-out utterance", "prompt": e["task"],
           "output": e["hyp"], "reference": e["ref"]} for e in r.get("examples", [])[:3]]
    if cfg.human_speech_shards and _exists(cfg.human_speech_shards):  # recorded human speech (a kit may predate it)
        rows += human_speech_rows(cfg, bench)
    return rows, ex


def human_speech_rows(cfg: HerdReportConfig, bench: Path) -> list[dict]:
    """WER on every recorded human prompt and on its letters-only subset against the blind model, and against each
    offline recogniser of cfg.asr_peers on the same audio (paired; a peer not installed here says so)."""
    args = ["--ckpt", cfg.speech, "--shards", cfg.human_speech_shards, "--max-items", "0"]
    r = run_benchmark("speech.py", args + [a for p in cfg.asr_peers for a in ("--peer", p)],
                      bench / "speech_human.json", cfg.threads)
    rows = [row("speech", f"human wer ({r['items']})", r["wer"], r.get("blind_wer"), "blind (no audio)",
                lower_is_better=True, ci=(r.get("wer_vs_blind") or {}).get("ci95"))]
    for tag, wer in (r.get("wer_by_tag") or {}).items():
        rows.append(row("speech", f"human wer, {tag}", wer, (r.get("blind_wer_by_tag") or {}).get(tag),
                        "blind (no audio)", lower_is_better=True,
                        ci=((r.get("wer_vs_blind_by_tag") or {}).get(tag) or {}).get("ci95")))
    for name, p in (r.get("peers") or {}).items():
        if p.get("wer") is None:
            rows.append(row("speech", "human wer", None, None, f"ASR peer {name}: {p.get('error')}", ref="peer"))
            continue
        rows.append(row("speech", "human wer", p["ours"], p["wer"], f"ASR peer {name}", lower_is_better=True,
                        ci=p["ci95"], ref="peer"))
    return rows


def herd_rows(cfg: HerdReportConfig, bench: Path) -> tuple[list[dict], list[dict]]:
    """The composed model with no media against the bare LM on held-out text: bits per byte must be equal."""
    from data.shards import SkipCounter, expand_shards, iter_text_docs
    from mm.eval.text import bits_per_byte
    from mm.model.runs import load_lm
    from mm.model.store import load_model

    out = bench / "herd.json"
    if not out.exists():
        herd, tok, meta = load_model(cfg.herd)
        lm, _, _ = load_lm(meta["lm"])
        texts = [d["text"] for d in iter_text_docs(expand_shards(cfg.text_shards), SkipCounter())][:16]
        if not texts:
            raise ValueError(f"{cfg.text_shards}: no readable text documents")
        seq = min(256, lm.cfg.max_seq_len)
        res = {"herd_text_bpb": bits_per_byte(herd, tok, texts, seq), "lm_text_bpb": bits_per_byte(lm, tok, texts, seq)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    res = json.loads(out.read_text())
    r = row("herd", "text_bpb (no media)", res["herd_text_bpb"], res["lm_text_bpb"], "bare LM (must be equal)")
    r["beats"] = res["herd_text_bpb"] == res["lm_text_bpb"]
    return [r], []


def run(cfg: HerdReportConfig, run_dir: Path, resume: bool = False) -> dict:
    """Benchmarks (reused from run_dir/benchmarks/ when present), then report.md; returns the table."""
    run_dir = Path(run_dir)
    bench = run_dir / "benchmarks"
    rows, examples, notes = [], [], []
    parts = [(text_rows, cfg.lm), (image_rows, cfg.image), (video_rows, cfg.video), (speech_rows, cfg.speech),
             (herd_rows, cfg.herd)]
    for fn, path in parts:
        if not path:
            notes.append(f"{fn.__name__.split('_')[0]}: no run given, not scored")
            continue
        if not Path(path).exists():
            raise FileNotFoundError(f"herd_report: {path}: no such run directory")
        r, ex = fn(cfg, bench)
        rows += r
        examples += ex
    stages = {k: Path(v) for k, v in cfg.stages.items()}
    refs = {k: [r for r in rows if r.get("ref") == k] for k in REF_TABLES}
    rows = [r for r in rows if not r.get("ref")]
    beaten = [r for r in rows if r["beats"] is not None]
    notes.append(f"{sum(r['beats'] for r in beaten)} of {len(beaten)} benchmark rows beat their baseline")
    cols = ["modality", "metric", "model", "baseline", "baseline_name", "gain_ci95"]
    tables = reading_tables(bench / "image.json") + [(REF_TABLES[k], v, cols) for k, v in refs.items() if v]
    path = write_report(run_dir, stages, rows, examples, notes=notes, tables=tables)
    return {"stage": "herd_report", "report": str(path), "rows": rows, **refs,
            "beats_all": all(r["beats"] for r in beaten)}
