"""Stage `ablation`: adapter designs compared on equal budgets (mm.config.AblationConfig).

Every arm trains the same stage YAML with the same shared overrides (frozen LM, encoder, seed, data order, steps)
plus its own (its design block) into RUN/arms/<name>, reused when complete and unchanged. Every arm is then scored on
the same held-out items with its modality's controls (image: another sample's image, no image; video: a single frame,
no video; speech: no audio), per-item scores cached in RUN/scores/<name>.json. Written: RUN/ablation.json,
RUN/ablation.md and RUN/ablation.png; per arm its metric with a 95% bootstrap interval, the controls, the gain over
the control that isolates the medium (paired bootstrap), the difference from the default arm (paired bootstrap),
trainable parameters, training FLOPs per sample (torch's FlopCounterMode, one forward + backward of a representative
sample) and training wall time.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.atomic import atomic_write_text
from data.dialog import collate_dialogs, dialog
from mm.config import AblationConfig
from mm.eval.stats import bootstrap_ci, paired_bootstrap
from mm.model.store import load_model
from mm.model.streams import Frames, Pixels


@dataclass(frozen=True)
class Modality:
    """How one modality's arms are scored: the metric, whether higher is better, its controls (the first isolates
    the medium: gain = metric vs it) and the scorer (arm dir, cfg) -> per-item figures."""

    metric: str
    higher_better: bool
    controls: tuple[str, ...]
    score: Callable[[Path, AblationConfig], dict]


def _flops(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> float:
    """Forward + backward FLOPs of one loss (the model in train mode, its frozen parts frozen); grads dropped."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss_of().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _arm_config(arm_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((arm_dir / "config.yaml").read_text())


def score_image(arm_dir: Path, cfg: AblationConfig) -> dict:
    """VQA accuracy per held-out item with the image, another sample's image and none; FLOPs of one VQA sample."""
    from llm.tokenizer import ChatFormat
    from mm.eval.image import eval_image_shards

    model, tok, _ = load_model(arm_dir)
    ev = eval_image_shards(model, tok, cfg.eval_shards, max_items=cfg.eval_items, max_new_tokens=cfg.max_new_tokens,
                           blind=True, seed=cfg.seed, per_item=True)
    model.train_only("image")
    mb = collate_dialogs([dialog(ChatFormat(tok), "What is shown?", "a photo of a bag.",
                                 media=model.image.placeholder_ids())], tok.pad_id, int(_arm_config(arm_dir)["seq_len"]))
    v = model.image.encoder.cfg
    px = Pixels(torch.zeros(1, v.tile_slots, 3, v.image_size, v.image_size), torch.zeros(1, dtype=torch.long))
    flops = _flops(model, lambda: model(mb["tokens"], image=px, labels=mb["labels"]))
    p = ev["per_item"]
    return {"values": {"model": p["model"], "shuffled": p["shuffled"], "blind": p["blind"]}, "weights": None,
            "keys": [f"{f}:{i}" for i, f in enumerate(p["family"])], "flops": flops,
            "groups": [f"{s} naming" if n else s for s, n in zip(p["source"], p["naming"])]}


def score_video(arm_dir: Path, cfg: AblationConfig) -> dict:
    """Accuracy on the temporal items (direction, order) with the clip, its middle frame and no video."""
    from llm.tokenizer import ChatFormat
    from mm.eval.video import TEMPORAL, eval_video_shards

    model, tok, _ = load_model(arm_dir)
    frames = model.video.num_frames
    ev = eval_video_shards(model, tok, cfg.eval_shards, frames, max_items=cfg.eval_items,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, per_item=True)
    p = ev["per_item"]
    keep = [i for i, f in enumerate(p["family"]) if f in TEMPORAL]
    if not keep:
        raise ValueError(f"{cfg.eval_shards}: no temporal (direction / order) video items to score")
    model.train_only("video")
    mb = collate_dialogs([dialog(ChatFormat(tok), "Which way does it move?", "left",
                                 media=model.video.placeholder_ids())], tok.pad_id,
                         int(_arm_config(arm_dir)["seq_len"]))
    v = model.image.encoder.cfg
    fr = Frames(torch.zeros(1, frames, 1, 3, v.image_size, v.image_size), torch.zeros(1, frames, dtype=torch.long))
    flops = _flops(model, lambda: model(mb["tokens"], video=fr, labels=mb["labels"]))
    return {"values": {c: [p[c][i] for i in keep] for c in ("video", "single_frame", "blind")}, "weights": None,
            "keys": [f"{p['family'][i]}:{i}" for i in keep], "flops": flops, "primary": "video"}


def score_speech(arm_dir: Path, cfg: AblationConfig) -> dict:
    """Word errors per held-out utterance (greedy ASR) with the audio and without (blind); weights: reference
    words (so sums give the corpus WER)."""
    from mm.eval.speech import eval_speech_shards
    from mm.eval.wer import utterance_errors

    model, tok, _ = load_model(arm_dir)
    ev = eval_speech_shards(model, tok, cfg.eval_shards, max_items=cfg.eval_items, blind=True, per_item=True)
    p = ev["per_item"]
    err = np.array(utterance_errors(p["refs"], p["hyps"]), dtype=np.float64).reshape(-1, 2)
    blind = np.array(utterance_errors(p["refs"], p["blind_hyps"]), dtype=np.float64).reshape(-1, 2)
    return {"values": {"model": err[:, 0].tolist(), "blind": blind[:, 0].tolist()}, "weights": err[:, 1].tolist(),
            "keys": [hashlib.sha256(r.encode()).hexdigest()[:12] for r in p["refs"]],
            "flops": speech_flops(model, tok)}


def speech_flops(model, tok) -> float:
    """Forward + backward FLOPs of one ASR sample of 4 s (the adapter's placeholder count for it)."""
    from data.speech_tasks import ASR_PROMPT
    from llm.tokenizer import ChatFormat
    from mm.model.media import Featurizer

    model.train_only("speech")
    wave = np.zeros(4 * 16000, dtype=np.float32)
    audio = Featurizer()([wave])
    media = model.speech.placeholder_ids(model.speech.n_tokens(len(wave)))
    mb = collate_dialogs([dialog(ChatFormat(tok), "", "the quick brown fox", media=media,
                                 system=ASR_PROMPT.format(language="English"))], tok.pad_id, 10 ** 6)
    return _flops(model, lambda: model(mb["tokens"], speech=audio, labels=mb["labels"]))


MODALITIES = {
    "image": Modality("accuracy", True, ("shuffled", "blind"), score_image),
    "video": Modality("temporal accuracy", True, ("single_frame", "blind"), score_video),
    "speech": Modality("WER", False, ("blind",), score_speech),
}


def _fill(text: str, run_dir: Path) -> str:
    return text.replace("{run}", str(run_dir))


SCORES_VERSION = 3  # what a cached scores file holds (2: image items' sources, 3: the image accepted-forms rule);
# older files are scored again


def _arm_key(arm_dir: Path, cfg: AblationConfig) -> str:
    """What an arm's scores depend on: its weights (fingerprint + result), the evaluation settings and the scores'
    format."""
    h = hashlib.sha256()
    for name in ("fingerprint.json", "result.json"):
        h.update((arm_dir / name).read_bytes())
    h.update(json.dumps([cfg.eval_shards, cfg.eval_items, cfg.max_new_tokens, cfg.seed, SCORES_VERSION]).encode())
    return h.hexdigest()


def scores_of(name: str, arm_dir: Path, cfg: AblationConfig, run_dir: Path) -> dict:
    """The arm's per-item scores: RUN/scores/<name>.json when its key matches, else scored now and kept."""
    path = run_dir / "scores" / f"{name}.json"
    key = _arm_key(arm_dir, cfg)
    if path.exists():
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key:
                return kept
        except json.JSONDecodeError:
            pass
    print(f"[ablation] scoring {name} on {cfg.eval_shards}", file=sys.stderr, flush=True)
    out = {"key": key, **MODALITIES[cfg.modality].score(arm_dir, cfg)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    return out


def compare(scores: dict[str, dict], results: dict[str, dict], cfg: AblationConfig) -> dict:
    """Per-arm rows (metric, CI, controls, gain over the first control with its paired CI, delta vs the default
    arm with its paired CI, parameters, FLOPs, wall time); ValueError when arms were scored on different items."""
    mod = MODALITIES[cfg.modality]
    default = cfg.default or cfg.arms[0].name
    if default not in scores:
        raise ValueError(f"ablation default {default!r} is not one of the arms {sorted(scores)}")
    ref = scores[default]
    rows = {}
    for name, s in scores.items():
        if s["keys"] != ref["keys"]:
            raise ValueError(f"ablation arms {name!r} and {default!r} were scored on different held-out items")
        primary = s.get("primary", "model")
        m, w = s["values"][primary], s["weights"]
        control = s["values"][mod.controls[0]]
        gain = paired_bootstrap(m, control, w, cfg.n_boot, cfg.seed) if mod.higher_better else \
            paired_bootstrap(control, m, w, cfg.n_boot, cfg.seed)
        vs = paired_bootstrap(m, ref["values"][ref.get("primary", "model")], w, cfg.n_boot, cfg.seed)
        r = results[name]
        by_group = {}  # the gain per held-out source (image), when the scores name one per item
        for g in sorted(set(s.get("groups") or ())):
            idx = [i for i, x in enumerate(s["groups"]) if x == g]
            d = paired_bootstrap([m[i] for i in idx], [control[i] for i in idx], None, cfg.n_boot, cfg.seed)
            by_group[g] = {"items": len(idx), mod.metric: d["a"], mod.controls[0]: d["b"], "gain": d["delta"],
                           "gain_ci95": d["ci95"]}
        rows[name] = {"design": name, mod.metric: gain["b"] if not mod.higher_better else gain["a"],
                      "ci95": bootstrap_ci(m, w, cfg.n_boot, cfg.seed),
                      **{c: paired_bootstrap(s["values"][c], m, w, cfg.n_boot, cfg.seed)["a"] for c in mod.controls},
                      "gain": gain["delta"], "gain_ci95": gain["ci95"],
                      "vs_default": vs["delta"], "vs_default_ci95": vs["ci95"],
                      "params_trainable": r.get("params_trainable"), "train_flops_per_sample": s["flops"],
                      "train_s": r.get("train_s"), "items": len(m), **({"by_group": by_group} if by_group else {})}
    return {"stage": "ablation", "modality": cfg.modality, "metric": mod.metric, "default": default,
            "higher_better": mod.higher_better, "controls": list(mod.controls), "arms": rows}


def _fmt(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_markdown(table: dict, path: Path) -> None:
    """ablation.md: one row per arm (the default first), intervals in brackets."""
    m, controls = table["metric"], table["controls"]
    gain = f"{m} gain over {controls[0]}" + (" (control - model)" if not table["higher_better"] else "")
    head = ["design", f"{m} [95% CI]", *controls, f"{gain} [95% CI]", f"vs {table['default']} [95% CI]",
            "trainable params", "train GFLOPs / sample", "train s"]
    lines = [f"# Ablation: {table['modality']} adapter designs", "",
             f"Every arm: the same stage config, seed, data order and step budget; scored on the same "
             f"{next(iter(table['arms'].values()))['items']} held-out items. Intervals: paired bootstrap over items.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [table["default"]] + [a for a in table["arms"] if a != table["default"]]
    for name in order:
        r = table["arms"][name]
        ci, gci, vci = r["ci95"], r["gain_ci95"], r["vs_default_ci95"]
        flops = r["train_flops_per_sample"]
        lines.append("| " + " | ".join([
            name, f"{_fmt(r[m])} [{_fmt(ci[0])}, {_fmt(ci[1])}]", *[_fmt(r[c]) for c in controls],
            f"{r['gain']:+.3f} [{gci[0]:+.3f}, {gci[1]:+.3f}]",
            "—" if name == table["default"] else f"{r['vs_default']:+.3f} [{vci[0]:+.3f}, {vci[1]:+.3f}]",
            f"{r['params_trainable']:,}" if r["params_trainable"] is not None else "-",
            _fmt(flops / 1e9 if flops else None, 2), _fmt(r["train_s"], 0)]) + " |")
    groups = sorted({g for r in table["arms"].values() for g in r.get("by_group", {})})
    if groups:  # the gain over the control per held-out source, one column per arm
        lines += ["", f"{gain} by source [95% CI]:", "", "| source | items | " + " | ".join(order) + " |",
                  "|" + "---|" * (2 + len(order))]
        for g in groups:
            cells = [table["arms"][a].get("by_group", {}).get(g) for a in order]
            n = next(c["items"] for c in cells if c)
            lines.append(f"| {g} | {n} | " + " | ".join(
                "-" if c is None else f"{c['gain']:+.3f} [{c['gain_ci95'][0]:+.3f}, {c['gain_ci95'][1]:+.3f}]"
                for c in cells) + " |")
    lines += ["", "![ablation](ablation.png)", ""]
    atomic_write_text(path, "\n".join(lines))


def plot(table: dict, path: Path) -> None:
    """ablation.png: the metric per arm with its interval, the controls as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["arms"])
    rows = [table["arms"][n] for n in names]
    m = table["metric"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 3.6))
    x = np.arange(len(names))
    vals = [r[m] for r in rows]
    err = np.array([[v - r["ci95"][0], r["ci95"][1] - v] for v, r in zip(vals, rows)]).T
    ax.bar(x, vals, yerr=err, capsize=4, color="#4c72b0", label=m)
    for j, (c, mk) in enumerate(zip(table["controls"], ("_", "x", "+"))):
        ax.scatter(x, [r[c] for r in rows], marker=mk, s=220, color=("#dd8452", "#55a868", "#c44e52")[j],
                   label=c, zorder=3)
    ax.set_xticks(x, names)
    ax.set_ylabel(m)
    ax.set_title(f"{table['modality']} adapter designs ({rows[0]['items']} held-out items)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: AblationConfig, run_dir: Path, resume: bool = False, redo_changed: bool = False,
        break_lock: bool = False, run_config: Callable[..., dict] | None = None) -> dict:
    """Train (or reuse) every arm through `run_config` (the runner's, which passes itself), score every arm on the
    same items, write ablation.{json,md,png}."""
    if run_config is None:
        raise ValueError("ablation: run it through the runner (mm run), which trains its arms")
    if cfg.modality not in MODALITIES:
        raise ValueError(f"ablation modality {cfg.modality!r} is not one of {sorted(MODALITIES)}")
    if not cfg.arms:
        raise ValueError("ablation: no arms")
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        raise ValueError(f"ablation: arm names repeat: {names}")
    run_dir = Path(run_dir)
    results, scores = {}, {}
    for i, arm in enumerate(cfg.arms, 1):
        out = run_dir / "arms" / arm.name
        print(f"[ablation {i}/{len(cfg.arms)}] {arm.name}: {cfg.config}", file=sys.stderr, flush=True)
        res = run_config(cfg.config, [_fill(o, run_dir) for o in [*cfg.overrides, *arm.overrides]], out,
                         resume=resume, redo_changed=redo_changed, break_lock=break_lock)
        if res.get("stopped_at") is not None:
            return {"stage": "ablation", "stopped_at": str(out)}
        results[arm.name] = res
    for arm in cfg.arms:
        scores[arm.name] = scores_of(arm.name, run_dir / "arms" / arm.name, cfg, run_dir)
    table = compare(scores, results, cfg)
    atomic_write_text(run_dir / "ablation.json", json.dumps(table, indent=1))
    plot(table, run_dir / "ablation.png")
    write_markdown(table, run_dir / "ablation.md")
    return {**{k: v for k, v in table.items() if k != "arms"},
            "arms": {n: {k: v for k, v in r.items() if not isinstance(v, list)} for n, r in table["arms"].items()},
            "table": str(run_dir / "ablation.md")}
