"""Stage image_sft (PAPER.md §7.2; DESIGN.md stage table, invariants 4 and 6): a sweep of image SFT runs averaged into
a model soup.

Each sweep member i (its own seed and peak LR) trains into members/<i>/ with the image_pretrain runner
(mm.stages.image_pretrain.run): ViT + image adapter from `init_from`, the LM hot-swapped to `instruct_lm`
(ComposedLM.load_lm_weights; frozen), the same VQA/caption dialogs, assistant-only loss. Each member is then scored on
held-out VQA (mm.eval.image on data.val_shards, the same seeded items for every run). Members are ranked by vqa_acc;
the top-K soups (mm.train.average.average_states over their final ViT + adapter tensors; the LM is not in those files and
stays the instruct LM) for K = soup_min_k..soup_top_k are written to soups/top<K>/ and scored the same way (K = 1 is
the best member, its score reused), and the best one ("K is chosen by evaluating the averages", PAPER.md §7.2) is
written to final/.

Reruns continue: a member with members/<i>/result.json is reused (if its seed, LR, the rest of its training config and
the init / instruct-LM weights it was trained from match, else an error; re-scored if eval_items changed), one with a
final model but no score is only scored, and an interrupted one resumes from its checkpoints.
Files: members/<i>/{checkpoints, final, train.json, result.json}; final/ (a composed model folder; meta "soup_of").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from mm.train.average import average_states
from mm.model.checkpoint import CheckpointError, file_sha256, save_weights
from mm.config import ImageSFTConfig, SweepMember, to_yaml
from mm.model.runs import model_dir
from mm.model.store import FORMAT, load_model, read_run
from mm.stages import image_pretrain
from mm.train.rundir import SAFE_KEYS
from mm.train.trainer import TrainConfig

SAVED_PARTS = ("image.",)  # an image run's tensors (no LM): the only ones a soup averages

# what must match for a member to be reused: settings, and the weights behind the paths (a retrained LM at the same
# path must not reuse members trained over the old one)
MEMBER_KEYS = ("seed", "lr", "steps", "init_from", "instruct_lm", "lm", "init_sha256", "instruct_lm_sha256",
               "config_sha256")


def weights_sha256(ckpt) -> str:
    """sha256 of a run's final model file (model_dir(ckpt)/model.safetensors), first 16 hex digits."""
    return file_sha256(model_dir(ckpt) / "model.safetensors")[:16]


def member_config(cfg: ImageSFTConfig, m: SweepMember) -> ImageSFTConfig:
    """The config one member trains with: the stage's, with the member's seed and peak LR."""
    return dataclasses.replace(cfg, seed=m.seed, train=dataclasses.replace(cfg.train, lr=m.lr))


def member_config_sha256(cfg: ImageSFTConfig, m: SweepMember) -> str:
    """sha256 (16 hex digits) of everything member m trains with: its config less what only ranks it (the sweep,
    soup_top_k, soup_min_k, eval_items) and the train settings a run may change on resume (rundir.SAFE_KEYS)."""
    c = member_config(cfg, m)
    safe = [k.rsplit(".", 1)[1] for k in SAFE_KEYS if k.startswith("config.train.")]
    t = dataclasses.replace(c.train, **{f: getattr(TrainConfig(), f) for f in safe})
    c = dataclasses.replace(c, sweep=[], soup_top_k=1, soup_min_k=1, eval_items=0, train=t)
    return hashlib.sha256(to_yaml(c).encode()).hexdigest()[:16]


def score(cfg: ImageSFTConfig, ckpt: Path, controls: bool = False) -> dict:
    """Held-out VQA metrics of an image model on data.val_shards (eval_items items); controls: also the blind /
    shuffled-image passes (3x the time; only the final soup needs them, ranking uses vqa_acc)."""
    from mm.eval.image import eval_image_shards

    model, tok, _ = load_model(ckpt)
    tile = model.image.encoder.cfg.image_size
    scale = max(1, (cfg.data.image_size or tile) // tile)
    return eval_image_shards(model, tok, cfg.data.val_shards, max_items=cfg.eval_items, blind=controls,
                             decode_scale=scale, seed=0)


def _figures(ev: dict) -> dict:
    return {k: ev.get(k) for k in ("vqa_acc", "blind_vqa_acc", "shuffled_vqa_acc", "exact_match", "items")}


def run_member(cfg: ImageSFTConfig, i: int, m: SweepMember, mdir: Path) -> dict:
    """Train (or resume / reuse) member i into mdir and score it; returns its result (also mdir/result.json)."""
    key = {"seed": m.seed, "lr": m.lr, "steps": cfg.steps, "init_from": str(cfg.init_from),
           "instruct_lm": str(cfg.instruct_lm), "lm": str(cfg.lm), "init_sha256": weights_sha256(cfg.init_from),
           "instruct_lm_sha256": weights_sha256(cfg.instruct_lm), "config_sha256": member_config_sha256(cfg, m)}
    done = mdir / "result.json"
    if done.exists():
        old = json.loads(done.read_text())
        diff = [k for k in MEMBER_KEYS if old.get(k) != key[k]]
        if diff:  # reached only under --force (the stage's fingerprint covers the key): retrain, and say why
            print(f"[image_sft] {mdir}: retraining member {i}: it was trained with {diff[0]}={old.get(diff[0])!r}, "
                  f"the config says {key[diff[0]]!r}", file=sys.stderr, flush=True)
            shutil.rmtree(mdir)
        elif old.get("eval_items") == cfg.eval_items:
            return {**old, "reused": True}  # else: scored on other items, so only scored again below
    trained = mdir / "train.json"
    if not trained.exists():
        res = image_pretrain.run(member_config(cfg, m), mdir, resume=True)  # resume: a no-op without checkpoints
        if res.get("stopped_at") is not None:
            return res
        trained.write_text(json.dumps(res, indent=1))
    res = json.loads(trained.read_text())
    ev = score(cfg, mdir)
    out = {"member": i, **key, **_figures(ev), "eval_items": cfg.eval_items, "final_loss": res.get("final_loss"),
           "train_s": res.get("train_s"), "examples": ev.get("examples", [])[:3]}
    done.write_text(json.dumps(out, indent=1))
    return {**out, "reused": False}


def make_soup(members: list[Path], out: Path, meta: dict) -> Path:
    """Average the members' final ViT + adapter tensors (no LM tensors are in them) into out; tokenizer from the
    first member."""
    runs = [read_run(d) for d in members]  # members of either format, under the current keys
    dirs, states = [d for d, _, _ in runs], [sd for _, _, sd in runs]
    for d, sd in zip(dirs, states):
        bad = [k for k in sd if not k.startswith(SAVED_PARTS)]
        if bad:
            raise CheckpointError(f"{d}: {bad[0]!r} is not an image-stream tensor; refusing to average it")
    avg = average_states(states, names=[str(d) for d in dirs])
    meta = {**runs[0][1], **meta, "format": FORMAT, "soup_of": [str(d) for d in dirs]}
    path = save_weights(out, {"model": avg}, meta)
    (path / "tokenizer.json").write_bytes((dirs[0] / "tokenizer.json").read_bytes())
    return path


def run(cfg: ImageSFTConfig, run_dir: Path, resume: bool = False) -> dict:
    """The sweep (members reused / resumed where done), then the top-K soup in final/; returns the stage result."""
    t0 = time.perf_counter()
    if not cfg.init_from:
        raise ValueError("image_sft needs init_from: the image_pretrain / image_anneal run to start from")
    if not cfg.sweep:
        raise ValueError("image_sft needs a non-empty sweep: [{seed, lr}, ...]")
    if not 1 <= cfg.soup_top_k <= len(cfg.sweep):
        raise ValueError(f"soup_top_k {cfg.soup_top_k} must be in [1, {len(cfg.sweep)}] (the sweep's size)")
    if not 1 <= cfg.soup_min_k <= 2:
        raise ValueError(f"soup_min_k must be 1 (the best member competes) or 2 (averages only), got {cfg.soup_min_k}")
    run_dir = Path(run_dir)
    mdirs = [run_dir / "members" / str(i) for i in range(len(cfg.sweep))]
    members = []
    for i, (m, mdir) in enumerate(zip(cfg.sweep, mdirs)):
        res = run_member(cfg, i, m, mdir)
        if res.get("stopped_at") is not None:  # train.stop_after inside member i: not complete; a rerun continues
            return {"stage": cfg.stage, "member": i, "stopped_at": res["stopped_at"],
                    "checkpoint": res.get("checkpoint")}
        members.append(res)
    ranked = sorted(range(len(members)), key=lambda i: (-(members[i]["vqa_acc"] or 0.0), i))
    # K is chosen by evaluating the averages (PAPER.md §7.2): every top-K soup for K = soup_min_k..soup_top_k is scored
    # on the held-out items, the best (ties: the larger K) becomes final/; K = 1 (the best member alone, as a greedy
    # soup may end) keeps the soup from ending below its best member
    candidates = {}
    for k in range(min(cfg.soup_min_k, cfg.soup_top_k), cfg.soup_top_k + 1):
        kdir, key = run_dir / "soups" / f"top{k}", [[i, members[i]["vqa_acc"]] for i in ranked[:k]]
        done = json.loads((kdir / "result.json").read_text()) if (kdir / "result.json").exists() else {}
        if done.get("key") != key:  # new, or its members changed since: (re)build and score it
            make_soup([mdirs[i] for i in ranked[:k]], kdir / "final", {"stage": cfg.stage, "soup_top_k": k,
                                                                       "soup_members": ranked[:k]})
            done = {"vqa_acc": members[ranked[0]]["vqa_acc"]} if k == 1 else score(cfg, kdir)  # K = 1: its score
            done["key"] = key
            (kdir / "result.json").write_text(json.dumps(done, indent=1))
        candidates[k] = done
    k_best = max(candidates, key=lambda k: ((candidates[k].get("vqa_acc") or 0.0), k))
    top = ranked[:k_best]
    make_soup([mdirs[i] for i in top], run_dir / "final", {"stage": cfg.stage, "soup_top_k": k_best,
                                                           "soup_members": top})
    ev, kdir = candidates[k_best], run_dir / "soups" / f"top{k_best}"
    if ev.get("blind_vqa_acc") is None:  # the blind / shuffled-image controls, for the chosen soup only
        ev = {**score(cfg, kdir, controls=True), "key": ev["key"]}
        (kdir / "result.json").write_text(json.dumps(ev, indent=1))
    best = members[ranked[0]]["vqa_acc"] or 0.0
    soup = ev.get("vqa_acc") or 0.0
    return {"stage": cfg.stage, "steps": cfg.steps, "soup_k": k_best,
            "soup_candidates": {str(k): c.get("vqa_acc") for k, c in candidates.items()},
            "members": [{k: r.get(k) for k in ("member", "seed", "lr", "vqa_acc", "exact_match", "final_loss", "reused")}
                        for r in members],
            "soup_members": top, "soup_top_k": cfg.soup_top_k,
            "soup_vqa_acc": ev.get("vqa_acc"), "soup_blind_vqa_acc": ev.get("blind_vqa_acc"),
            "soup_shuffled_vqa_acc": ev.get("shuffled_vqa_acc"), "best_member_vqa_acc": best,
            "soup_vs_best": round(soup - best, 6), "eval_items": ev.get("items"),
            "soup_examples": ev.get("examples", [])[:3], "total_s": round(time.perf_counter() - t0, 1)}
