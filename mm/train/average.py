"""Model averaging (PAPER.md §1.5, and the vision model soup): the mean of several runs' weights."""
from __future__ import annotations

from pathlib import Path

import torch

from mm.model.checkpoint import CheckpointError, load_meta, load_tensors, save_weights
from mm.model.runs import model_dir


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None,
                   names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with identical keys and shapes (an error names the first mismatch)."""
    if not states:
        raise ValueError("nothing to average")
    names = names or [f"#{i}" for i in range(len(states))]
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    w = w / w.sum()
    ref = states[0]
    for name, sd in zip(names[1:], states[1:]):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))[0]
            raise CheckpointError(f"{name}: keys differ from {names[0]} (e.g. {diff!r})")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise CheckpointError(f"{name}: {k!r} has shape {tuple(v.shape)}, {names[0]} has {tuple(ref[k].shape)}")
    out = {}
    for k, v in ref.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = sum(wi * sd[k].double() for wi, sd in zip(w, states))
        out[k] = acc.to(v.dtype)
    return out


def average_runs(runs: list[str | Path], out: Path, weights: list[float] | None = None) -> dict:
    """Average the final models of several runs of the same shape into `out` (tokenizer and meta from the first)."""
    dirs = [model_dir(r) for r in runs]
    states = [load_tensors(d / "model.safetensors") for d in dirs]
    avg = average_states(states, weights, [str(d) for d in dirs])
    meta = {**load_meta(dirs[0]), "averaged_from": [str(d) for d in dirs], "weights": weights}
    path = save_weights(Path(out), {"model": avg}, meta)
    tok = next((p for p in (dirs[0] / "tokenizer.json", dirs[0].parent / "tokenizer.json") if p.exists()), None)
    if tok is not None:
        (path / "tokenizer.json").write_bytes(tok.read_bytes())
    return {"out": str(path), "averaged": len(dirs)}
