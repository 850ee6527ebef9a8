"""Image metrics: VQA accuracy of a composed model per task family, the same with the image removed (blind) and with
another sample's image (shuffled), on image shards or benchmark files (data/bench_files.py: VLMEvalKit TSV,
lmms-eval JSONL; a file's categories are the families); and held-out text bits per byte of the composed model without
media next to the bare LM (equal by DESIGN.md invariant 1). A qa with a "letter" is asked in the multiple-choice
format of data/qa_format.py and scored by the reply's option letter."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import torch

from data.bench_files import load_bench_samples
from data.chat_tasks import normalise_answer
from data.dialog import dialog
from data.loader import load_image_samples
from data.qa_format import mc_prompt, parse_letter, qa_prompt
from llm.tokenizer import ChatFormat
from mm.model.composed import ComposedLM
from mm.model.generate import generate
from mm.model.media import images_to_pixels
from mm.model.streams import to_device

FAMILIES = ("recognition", "ocr", "chart", "counting")


@torch.no_grad()
def image_features(model: ComposedLM, image) -> torch.Tensor:
    """One image (3, H, W) uint8 (tensor or array, as image samples hold it) -> its features (1, 1, N, D_media):
    tiled to the encoder's tile size / max_tiles, CLIP-normalised, encoded once."""
    vcfg = model.image.encoder.cfg
    px = images_to_pixels([torch.as_tensor(image)], vcfg.image_size, vcfg.max_tiles)
    return model.image.features(to_device(px, model.output.weight.device))


def vqa_score(pred: str, answers) -> float:
    """VQA accuracy of one prediction: min(#references matching / 3, 1) with several references, else exact match
    (both after normalise_answer)."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    p = normalise_answer(pred)
    hits = sum(p == normalise_answer(r) for r in refs)
    if len(refs) > 1:
        return min(hits / 3.0, 1.0)
    return float(hits > 0)


def vqa_items(samples: list[dict], max_items: int = 0) -> list[dict]:
    """Flatten image samples ({image, meta, ...}) into VQA items {sample, question, answers, family, letter?}: a qa
    with a "letter" gets the multiple-choice prompt (mc_prompt), others qa_prompt."""
    out = []
    for i, s in enumerate(samples):
        meta = s.get("meta") or {}
        for qa in meta.get("qa") or []:
            if qa.get("answers"):
                it = {"sample": i, "question": qa_prompt(qa), "answers": list(qa["answers"]),
                      "family": meta.get("family", "other")}
                if qa.get("letter"):
                    it.update(question=mc_prompt(str(qa["question"]), list(qa["choices"])), letter=qa["letter"])
                out.append(it)
    return out[:max_items] if max_items else out


def item_score(item: dict, pred: str) -> float:
    """One item's score: the gold option letter (lettered items, parse_letter) or vqa_score."""
    if item.get("letter"):
        return float(parse_letter(pred) == item["letter"])
    return vqa_score(pred, item["answers"])


@torch.no_grad()
def answer(model: ComposedLM, fmt: ChatFormat, question: str, media: torch.Tensor | None,
           max_new_tokens: int = 8) -> str:
    """Greedy short answer; media (1, 1, N, D) for one image (its placeholders go into the prompt), None: blind."""
    ids, _ = dialog(fmt, question, media=model.image.placeholder_ids() if media is not None else ())
    tok = fmt.tok
    out = generate(model, ids, max_new_tokens, image=media, stop_ids=(tok.eot_id, tok.eos_id, tok.eom_id))
    return fmt.decode_reply(out).strip()


@torch.no_grad()
def vqa_eval(model: ComposedLM, tok, samples: list[dict], max_items: int = 0, max_new_tokens: int = 8,
             blind: bool = True, per_item: bool = False) -> dict:
    """{"vqa_acc", "vqa_acc_by_family", "blind_vqa_acc", "blind_vqa_acc_by_family", "exact_match" (any reference),
    "shuffled_vqa_acc"(_by_family), "items", "examples"}: greedy answers with the image; if blind, also with no image
    and no `<|image|>` token, and with another sample's image (answer format kept, image content wrong). per_item:
    also "per_item" {"family": [...], "model" / "blind" / "shuffled": [score, ...]} in item order (paired tests)."""
    model.eval()
    fmt, items = ChatFormat(tok), vqa_items(samples, max_items)
    feats: dict[int, torch.Tensor] = {}
    scores: dict[str, dict[str, list[float]]] = {"vqa": defaultdict(list), "blind": defaultdict(list),
                                                 "em": defaultdict(list), "shuffled": defaultdict(list)}
    examples, flat, blind_said = [], defaultdict(list), {}  # flat: per-item scores in item order

    def media(i: int) -> torch.Tensor:
        if i not in feats:
            feats[i] = image_features(model, samples[i]["image"])  # (1, 1, n_tiles*(P+1), D): one media item
        return feats[i]

    for it in items:
        i = it["sample"]
        media(i)
        pred = answer(model, fmt, it["question"], feats[i], max_new_tokens)
        s = item_score(it, pred)
        scores["vqa"][it["family"]].append(s)
        flat["family"].append(it["family"])
        flat["model"].append(s)
        scores["em"][it["family"]].append(s if it.get("letter") else float(any(normalise_answer(pred) ==
                                                                                normalise_answer(a)
                                                                                for a in it["answers"])))
        if blind:
            if it["question"] not in blind_said:  # greedy without an image: a function of the question alone
                blind_said[it["question"]] = answer(model, fmt, it["question"], None, max_new_tokens)
            bl = item_score(it, blind_said[it["question"]])
            other = media((i + 1 + len(samples) // 2) % len(samples))
            sh = item_score(it, answer(model, fmt, it["question"], other, max_new_tokens))
            scores["blind"][it["family"]].append(bl)
            scores["shuffled"][it["family"]].append(sh)
            flat["blind"].append(bl)
            flat["shuffled"].append(sh)
        if len(examples) < 8 and sum(e["family"] == it["family"] for e in examples) < 2:  # spread over families
            examples.append({"q": it["question"], "pred": pred, "answers": it["answers"], "family": it["family"],
                             "sample": i})

    def summary(d: dict) -> tuple[float | None, dict]:
        allv = [v for vs in d.values() for v in vs]
        fam = {f: sum(vs) / len(vs) for f, vs in sorted(d.items()) if vs}
        return (sum(allv) / len(allv) if allv else None), fam

    out = {"items": len(items), "items_by_family": {f: len(vs) for f, vs in sorted(scores["vqa"].items())},
           "mc_items": sum(bool(it.get("letter")) for it in items)}
    out["vqa_acc"], out["vqa_acc_by_family"] = summary(scores["vqa"])
    out["exact_match"], out["exact_match_by_family"] = summary(scores["em"])
    if blind:
        out["blind_vqa_acc"], out["blind_vqa_acc_by_family"] = summary(scores["blind"])
        out["shuffled_vqa_acc"], out["shuffled_vqa_acc_by_family"] = summary(scores["shuffled"])
    out["examples"] = examples
    if per_item:
        out["per_item"] = dict(flat)
    return out


def save_example_images(samples: list[dict], examples: list[dict], out_dir: Path) -> None:
    """Write each example's image as out_dir/example_<k>.png and record its path under "image"."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    for k, ex in enumerate(examples):
        path = out_dir / f"example_{k}.png"
        Image.fromarray(torch.as_tensor(samples[ex["sample"]]["image"]).permute(1, 2, 0).numpy()).save(path)
        ex["image"] = str(path)


def _scored(model: ComposedLM, tok, where: dict, samples: list[dict], skips: dict, max_items: int, max_new_tokens: int,
            blind: bool, examples_dir, per_item: bool = False) -> dict:
    """{**where, "image_samples", "skipped", "skipped_total", **vqa_eval(...)}; examples' images saved if asked."""
    out = {**where, "image_samples": len(samples), "skipped": skips, "skipped_total": sum(skips.values())}
    if not samples:
        raise ValueError(f"{next(iter(where.values()))}: no readable image samples (skipped: {skips})")
    out.update(vqa_eval(model, tok, samples, max_items, max_new_tokens, blind=blind, per_item=per_item))
    if examples_dir:
        save_example_images(samples, out["examples"], Path(examples_dir))
    return out


def eval_image_shards(model: ComposedLM, tok, shards: str, max_items: int = 400, max_new_tokens: int = 8,
                      blind: bool = True, decode_scale: int = 1, seed: int = 0,
                      examples_dir: str | Path | None = None, families: tuple[str, ...] = (),
                      per_item: bool = False) -> dict:
    """VQA metrics of a loaded image model on any image-text shards (DESIGN.md format): samples decoded at
    decode_scale tile sides (a seeded subset of max_items // 2 samples, all when max_items is 0), then vqa_eval.
    Returns {"shards", "image_samples", "skipped" ({reason: n}), "skipped_total", **vqa_eval(...)}; the one
    implementation behind `mm eval image` and benchmarks/image.py. examples_dir: save the examples' images there;
    families: keep only samples of these task families (all when empty)."""
    size = model.image.encoder.cfg.image_size * (decode_scale or 1)
    cap = max(1, max_items // 2) if max_items else 0
    samples, skips = load_image_samples(shards, size, max_samples=0 if families else cap, seed=seed)
    if families:
        unknown = set(families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown image families {sorted(unknown)}; known: {list(FAMILIES)}")
        samples = [s for s in samples if (s.get("meta") or {}).get("family") in families]
        if 0 < cap < len(samples):
            keep = sorted(random.Random(seed).sample(range(len(samples)), cap))
            samples = [samples[k] for k in keep]
    return _scored(model, tok, {"shards": shards}, samples, skips, max_items, max_new_tokens, blind,
                   examples_dir, per_item)


def eval_image_file(model: ComposedLM, tok, path: str | Path, kind: str, max_items: int = 400,
                    max_new_tokens: int = 8, blind: bool = True, decode_scale: int = 1, seed: int = 0,
                    examples_dir: str | Path | None = None, families: tuple[str, ...] = ()) -> dict:
    """eval_image_shards on a benchmark file (kind "tsv" | "jsonl", data/bench_files.py): a seeded subset of
    max_items rows (all when 0) of the given categories (families; all when empty), decoded at decode_scale tile
    sides. Returns {kind: path, "image_samples", "skipped" ({reason: n}, bad rows and images), "skipped_total",
    **vqa_eval(...)} with the per-category figures under *_by_family."""
    size = model.image.encoder.cfg.image_size * (decode_scale or 1)
    samples, skips = load_bench_samples(path, kind, size, max_samples=max_items, seed=seed, categories=families)
    return _scored(model, tok, {kind: str(path)}, samples, skips, max_items, max_new_tokens, blind,
                   examples_dir)
