"""Where an image run loses the label: linear probes of the recognition label (the digit, the clothing item, the
stamp's name: each source's own classes) fitted on training images and scored on held-out ones, from places along
the path, next to the model's own answers:

  vit_mean       the image encoder's tokens, averaged (what CLIP's pooling sees)
  vit_flat       the image encoder's tokens, flattened (everything the adapter can use)
  adapter_mean   the tokens the LM side reads, averaged: the design's projection of the encoder tokens (cross-attention
                 designs: the projected, possibly resampled, media; an embedding design: its input embeddings)
  lm_state       the composed model's final hidden state at the answer position of the source's question, with the
                 image; lm_state_shuffled: the same with another held-out image (the floor: answer priors)
  answers        the model's greedy answers to that question (vqa score) with the image / another image
  label_head     the LM's own output rows for the first token of each class's label, applied to lm_state (argmax over
                 the classes: what the frozen head can read of the state, against the free probe's lm_state; exact
                 for single-token labels, approximate for multi-token ones), and
                 label_rows_cos, those rows' mean pairwise cosine (near 1: the head barely tells the labels apart)

    python benchmarks/image_probe.py --ckpt runs/herd/image_sft [--sources mnist,fashion_mnist] [--train 600]

Prints ONE JSON line: {source: {place: {"val_acc", "train_acc"}, "answers": {"image", "shuffled"}, "label_head",
"label_rows_cos", "classes", "chance", "train", "val"}}. A label every probe reads but the model does not answer is
lost between the LM state and the words; one the ViT probes read but the LM state does not is lost in the adapter.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from data.dialog import dialog  # noqa: E402
from data.loader import load_image_samples  # noqa: E402
from data.qa_format import qa_prompt  # noqa: E402
from llm.tokenizer import ChatFormat  # noqa: E402
from mm.cli import run_reporting  # noqa: E402
from mm.eval.image import answer, image_features, item_score, source_of  # noqa: E402
from mm.eval.probe import linear_probe  # noqa: E402
from mm.model.store import load_model  # noqa: E402

PLACES = ("vit_mean", "vit_flat", "adapter_mean", "lm_state", "lm_state_shuffled")


def lm_side_tokens(adapter, media: torch.Tensor) -> torch.Tensor:
    """The tokens (B, M, n, D_lm) an image design hands the LM for media (B, M, N, D_media)."""
    if adapter.join == "embeds":
        return adapter.embed(media)
    x = adapter.resample(media) if hasattr(adapter, "resample") else media
    return (adapter.xattn.projection if hasattr(adapter, "xattn") else adapter.projection)(x)


def recognition(samples: list[dict], sources: tuple[str, ...], n: int) -> dict[str, list[dict]]:
    """The first n recognition samples of each source that have a labelled question."""
    out: dict[str, list[dict]] = {s: [] for s in sources}
    for s in samples:
        meta = s.get("meta") or {}
        src = source_of(meta)
        if src in out and len(out[src]) < n and meta.get("family") == "recognition" and meta.get("qa"):
            out[src].append(s)
    return out


@torch.no_grad()
def features(model, tok, samples: list[dict], others: list[dict], score: bool = False) -> dict:
    """{"x": {place: (n, D)}} for the samples (`others`: another image each, for the shuffled LM state); with score
    also {"answers": {"image", "shuffled"}} (the model's greedy answers' scores)."""
    fmt, stream = ChatFormat(tok), model.image
    feats: dict[str, list] = {p: [] for p in PLACES}
    scores: dict[str, list] = {"image": [], "shuffled": []}
    for j, s in enumerate(samples):
        qa = s["meta"]["qa"][0]
        item = {"answers": list(qa["answers"])}
        media = image_features(model, s["image"])  # (1, 1, N, D_media)
        feats["vit_mean"].append(media[0, 0].mean(0))
        feats["vit_flat"].append(media[0, 0].flatten())
        feats["adapter_mean"].append(lm_side_tokens(stream.adapter, media.to(stream.adapter_dtype))[0, 0].mean(0))
        ids, _ = dialog(fmt, qa_prompt(qa), media=stream.placeholder_ids())
        tokens = torch.tensor([ids])
        other = image_features(model, others[j]["image"])
        feats["lm_state"].append(model(tokens, image=media, return_hidden=True)[0, -1])
        feats["lm_state_shuffled"].append(model(tokens, image=other, return_hidden=True)[0, -1])
        if score:
            scores["image"].append(item_score(item, answer(model, fmt, qa_prompt(qa), media)))
            scores["shuffled"].append(item_score(item, answer(model, fmt, qa_prompt(qa), other)))
    return {"x": {p: torch.stack(v) for p, v in feats.items()}, "answers": scores}


@torch.no_grad()
def label_head(model, tok, classes: list[str], state: torch.Tensor, y: torch.Tensor) -> dict:
    """{"label_head": accuracy of the frozen output rows of the classes' first label tokens on state (n, D),
    "label_rows_cos": those rows' mean off-diagonal cosine}; classes sharing a first token share a row."""
    rows = model.output.weight[[tok.encode(c)[0] for c in classes]].float()  # (C, D)
    acc = ((state.float() @ rows.T).argmax(-1) == y).float().mean()
    unit = torch.nn.functional.normalize(rows, dim=-1)
    off = (unit @ unit.T)[~torch.eye(len(classes), dtype=torch.bool)]
    return {"label_head": round(float(acc), 4), "label_rows_cos": round(float(off.mean()), 4)}


def evaluate(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, _ = load_model(args.ckpt)
    model.require("image", args.ckpt)
    size = model.image.encoder.cfg.image_size
    sources = tuple(s for s in args.sources.split(",") if s)
    train = recognition(load_image_samples(args.train_shards, size)[0], sources, args.train)
    val = recognition(load_image_samples(args.shards, size)[0], sources, args.val)
    out = {"ckpt": str(args.ckpt)}
    for src in sources:
        tr, va = train[src], val[src]
        if len(tr) < 2 or len(va) < 2:
            raise ValueError(f"{src}: too few recognition samples ({len(tr)} train, {len(va)} held out)")
        classes = sorted({s["meta"]["label"] for s in tr + va})
        ytr = torch.tensor([classes.index(s["meta"]["label"]) for s in tr])
        yva = torch.tensor([classes.index(s["meta"]["label"]) for s in va])
        ftr = features(model, tok, tr, tr[len(tr) // 2:] + tr[:len(tr) // 2])
        fva = features(model, tok, va, va[len(va) // 2:] + va[:len(va) // 2], score=True)
        res = {"classes": len(classes), "chance": round(float(torch.bincount(yva).max()) / len(yva), 4),
               "train": len(tr), "val": len(va),
               "answers": {k: round(sum(v) / len(v), 4) for k, v in fva["answers"].items()}}
        for p in PLACES:
            res[p] = {k: round(v, 4) for k, v in linear_probe(ftr["x"][p], ytr, fva["x"][p], yva,
                                                              args.weight_decay).items()}
        res.update(label_head(model, tok, classes, fva["x"]["lm_state"], yva))
        out[src] = res
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="image-stage run directory")
    p.add_argument("--train-shards", default=".cache/shards/image/train-*.tar", help="images the probes are fitted on")
    p.add_argument("--shards", default=".cache/shards/image/val-*.tar", help="held-out images the probes are scored on")
    p.add_argument("--sources", default="mnist,fashion_mnist", help="comma-separated sources (mnist, fashion_mnist, "
                                                                    "tuxpaint)")
    p.add_argument("--train", type=int, default=600, help="training images per source")
    p.add_argument("--val", type=int, default=200, help="held-out images per source")
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    return run_reporting(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
