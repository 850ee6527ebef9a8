"""report.md for a multi-stage run (the herd quickstart): loss curves per stage, cross-attention gate values over
training, the benchmark table and example generations beside their inputs, with PNG plots (matplotlib, Agg).

Inputs are what the stages already write: each stage directory's metrics.jsonl (records with "step" and "loss";
gate records "gate_<modality>/<layer>.<attn|ffn>") and the benchmark JSON lines; nothing is recomputed here.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON records of run_dir/metrics.jsonl (empty when the stage wrote none); unreadable lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has both "step" and a numeric `key`."""
    pts = [(r["step"], float(r[key])) for r in records if "step" in r and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(stages: dict[str, Path], out: Path) -> Path | None:
    """One panel per stage with a logged loss curve; returns the PNG path (None when no stage logged a loss)."""
    curves = {name: series(read_metrics(d), "loss") for name, d in stages.items()}
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, axes = _grid(len(curves), 4.2, 3.0)
    for ax, (name, (x, y)) in zip(axes.flat, curves.items()):
        ax.plot(x, y, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, axes, len(curves), out)


def _grid(n: int, w: float, h: float):
    """A figure with n panels, at most 3 per row."""
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    return plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)


def _save(fig, axes, n: int, out: Path) -> Path:
    """Blank the unused panels, write the PNG, close the figure."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_gates(stages: dict[str, Path], out: Path) -> Path | None:
    """tanh(gate) per cross-attention block over training, one panel per stage that logged gates."""
    panels = {}
    for name, d in stages.items():
        recs = read_metrics(d)
        keys = sorted({k for r in recs for k in r if k.startswith("gate_")})
        if keys:
            panels[name] = {k: series(recs, k) for k in keys}
    if not panels:
        return None
    fig, axes = _grid(len(panels), 4.6, 3.2)
    for ax, (name, gs) in zip(axes.flat, panels.items()):
        for k, (x, y) in gs.items():
            ax.plot(x, y, lw=1.0, label=k.split("/", 1)[-1] + (" (" + k.split("/")[0][5:] + ")"))
        ax.set_title(f"{name}: tanh(gate)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, axes, len(panels), out)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"
    return "" if v is None else str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows (dicts) over the given columns (missing values left blank)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def stage_costs(stages: dict[str, Path]) -> list[dict]:
    """One row per stage: {"stage", "run_dir", "run_s", "peak_rss_mb", "child_peak_rss_mb"} from its result.json
    (the runner's measures; absent for a run made before they were recorded), and a "total" row of the wall time
    and the largest peak."""
    rows = []
    for name, d in stages.items():
        try:
            res = json.loads((Path(d) / "result.json").read_text())
        except (OSError, ValueError):
            res = {}
        rows.append({"stage": name, "run_dir": str(d),
                     **{k: res[k] for k in ("run_s", "peak_rss_mb", "child_peak_rss_mb") if k in res}})
    timed = [r for r in rows if "run_s" in r]
    if timed:
        rows.append({"stage": "total", "run_s": round(sum(r["run_s"] for r in timed), 1),
                     "peak_rss_mb": max((r["peak_rss_mb"] for r in timed if "peak_rss_mb" in r), default=None)})
    return rows


def write_report(run_dir: Path, stages: dict[str, Path], benchmarks: list[dict], examples: list[dict],
                 title: str = "Herd run report", notes: list[str] = (),
                 tables: list[tuple[str, list[dict], list[str]]] = ()) -> Path:
    """Write run_dir/report.md and run_dir/plots/*.png.

    stages: {stage name: its run directory}; benchmarks: rows {"modality", "metric", "model", "baseline",
    "baseline_name", "gain_ci95"? (95% interval of model - baseline), "beats"?}; tables: further (title, rows,
    columns) sections after the benchmarks; examples: {"modality", "input" (text; an image path is embedded),
    "prompt", "output", "reference"}. Returns the report path."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}\n"]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md.append("## Benchmarks\n")
    cols = ["modality", "metric", "model", "baseline", "baseline_name"]
    cols += ["gain_ci95"] if any("gain_ci95" in b for b in benchmarks) else []
    cols += ["beats"] if any("beats" in b for b in benchmarks) else []
    md.append(table(benchmarks, cols) if benchmarks
              else "_no benchmark rows_\n")
    for name, rows, columns in tables:
        md.append(f"## {name}\n")
        md.append(table(rows, columns))
    loss_png = plot_losses(stages, plots / "losses.png")
    md.append("## Loss curves\n")
    md.append(f"![losses](plots/{loss_png.name})\n" if loss_png else "_no stage logged a loss_\n")
    gate_png = plot_gates(stages, plots / "gates.png")
    md.append("## Cross-attention gates over training\n")
    md.append(f"![gates](plots/{gate_png.name})\n" if gate_png else "_no stage logged gate values_\n")
    md.append("## Example generations\n")
    for ex in examples:
        inp = str(ex.get("input", ""))
        shown = f"![input]({inp})" if inp.lower().endswith((".png", ".jpg", ".jpeg")) else f"`{inp}`"
        md.append(f"- **{ex.get('modality', '')}** {shown} — prompt: _{ex.get('prompt', '')}_ → "
                  f"**{ex.get('output', '')}** (reference: {ex.get('reference', '')})")
    md.append("\n## Stages\n")
    md.append("What each stage cost when it was made (a reused stage keeps its figures): wall seconds and peak "
              "resident memory of the process, and of its largest child process where one ran.\n")
    md.append(table(stage_costs(stages), ["stage", "run_s", "peak_rss_mb", "child_peak_rss_mb", "run_dir"]))
    path = run_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
