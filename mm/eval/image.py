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
from mm.eval.stats import paired_bootstrap
from mm.model.composed import ComposedLM
from mm.model.generate import generate, generate_rows
from mm.model.media import images_to_pixels
from mm.model.streams import to_device

FAMILIES = ("recognition", "ocr", "chart", "counting")


@torch.no_grad()
def image_features(model: ComposedLM, image) -> torch.Tensor:
    """One image (3, H, W) uint8 (tensor or array, as image samples hold it) -> its features (1, 1, N, D_media):
    tiled to the encoder's tile size / max_tiles, CLIP-normalised, encoded once."""
    vcfg = model.image.encoder.cfg
    px = images_to_pixels([torch.as_tensor(image)], vcfg)
    return model.image.features(to_device(px, model.output.weight.device))


def vqa_score(pred: str, answers) -> float:
    """VQA accuracy of one prediction (after normalise_answer): with 3 or more references (annotators' answers, as
    VQAv2's ten) min(#references matching / 3, 1); with one or two (a kit item's accepted forms, e.g. "3" and
    "three") 1 if any matches, else 0."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    p = normalise_answer(pred)
    hits = sum(p == normalise_answer(r) for r in refs)
    if len(refs) >= 3:
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
                      "family": meta.get("family", "other"), "naming": is_naming(qa, meta)}
                if qa.get("letter"):
                    it.update(question=mc_prompt(str(qa["question"]), list(qa["choices"])), letter=qa["letter"])
                out.append(it)
    return out[:max_items] if max_items else out


def is_naming(qa: dict, meta: dict) -> bool:
    """Whether a qa is its item's naming question: open (no options), its answer the item's label ("What digit is
    shown?" -> "3", "What kind of clothing item is this?" -> "sandal", "What word is written in the image?")."""
    label = meta.get("label")
    return (label is not None and not qa.get("choices")
            and normalise_answer(str(label)) in {normalise_answer(str(a)) for a in qa.get("answers") or []})


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
def answers(model: ComposedLM, fmt: ChatFormat, question: str, media: list[torch.Tensor], max_new_tokens: int = 8,
            batch: int = 64) -> list[str]:
    """Greedy short answers to one question about each of several images (features (1, 1, N, D) each), decoded
    `batch` images at a time as rows of one batch (generate_rows): answer() per image, batched."""
    ids, _ = dialog(fmt, question, media=model.image.placeholder_ids())
    tok, out = fmt.tok, []
    for k in range(0, len(media), batch):
        rows = generate_rows(model, ids, max_new_tokens, image=torch.cat(media[k:k + batch]),  # (b, 1, N, D)
                             stop_ids=(tok.eot_id, tok.eos_id, tok.eom_id))
        out += [fmt.decode_reply(r).strip() for r in rows]
    return out


def answer_items(model: ComposedLM, fmt: ChatFormat, items: list[dict], media_of,
                 max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to vqa_items, in item order; the items that share a question are decoded as rows of one batch
    (answers). media_of(item) -> that item's image features (1, 1, N, D)."""
    asked: dict[str, list[int]] = defaultdict(list)  # question -> its items: one prompt, decoded as rows
    for k, it in enumerate(items):
        asked[it["question"]].append(k)
    out: list[str] = [""] * len(items)
    for q, ks in asked.items():
        for k, pred in zip(ks, answers(model, fmt, q, [media_of(items[k]) for k in ks], max_new_tokens)):
            out[k] = pred
    return out


SOURCE_GROUPS = {"counting/": "counting", "ocr/": "words", "ocr_doc/": "pages", "chart/": "charts"}


def source_of(meta: dict) -> str:
    """The held-out source an item is reported under: mnist, fashion_mnist, tuxpaint, words (rendered words), pages,
    charts, counting (any sprite), or a benchmark file's own source / "other"."""
    src = str((meta or {}).get("source") or "other")
    return next((name for prefix, name in SOURCE_GROUPS.items() if src.startswith(prefix)), src)


def reading_summary(flat: dict, key: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per value of flat[key] (family / source) and overall: accuracy with the image, with a shuffled image and with
    none, the reading gain (image - shuffled) with its paired bootstrap 95% interval, and that of the gain over no
    image ("blind_gain_ci95")."""
    groups = {"all": list(range(len(flat["model"])))}
    for i, g in enumerate(flat[key]):
        groups.setdefault(g, []).append(i)
    out = {}
    for g, idx in groups.items():
        m, sh = [flat["model"][i] for i in idx], [flat["shuffled"][i] for i in idx]
        d = paired_bootstrap(m, sh, None, n_boot, seed)
        b = paired_bootstrap(m, [flat["blind"][i] for i in idx], None, n_boot, seed)
        out[g] = {"items": len(idx), "acc": d["a"], "shuffled": d["b"], "blind": b["b"], "gain": d["delta"],
                  "gain_ci95": d["ci95"], "blind_gain_ci95": b["ci95"]}
    return out


@torch.no_grad()
def vqa_eval(model: ComposedLM, tok, samples: list[dict], max_items: int = 0, max_new_tokens: int = 8,
             blind: bool = True, per_item: bool = False) -> dict:
    """Greedy answers with the image ("vqa_acc"; "exact_match": any reference); if blind, also with no image and no
    placeholders ("blind_vqa_acc") and with another sample's image ("shuffled_vqa_acc": answer format kept, image
    content wrong), and the reading gain (image - shuffled) with its paired bootstrap 95% interval ("reading":
    overall, "reading_by_family", "reading_by_source"). Each accuracy also *_by_family and *_by_source (source_of).
    Also "naming_by_source": the same reading figures on the naming questions alone (is_naming), "all" overall.
    per_item: also "per_item" {"family", "source", "naming", "model" / "blind" / "shuffled": [...]} in item order."""
    model.eval()
    fmt, items = ChatFormat(tok), vqa_items(samples, max_items)
    feats: dict[int, torch.Tensor] = {}
    examples, flat, blind_said = [], defaultdict(list), {}  # flat: per-item records in item order

    def media(i: int) -> torch.Tensor:
        if i not in feats:
            feats[i] = image_features(model, samples[i]["image"])  # (1, 1, n_tiles*(P+1), D): one media item
        return feats[i]

    def other(i: int) -> int:  # the shuffled control's image: another sample's
        return (i + 1 + len(samples) // 2) % len(samples)

    said = {"model": answer_items(model, fmt, items, lambda it: media(it["sample"]), max_new_tokens)}
    if blind:
        said["shuffled"] = answer_items(model, fmt, items, lambda it: media(other(it["sample"])), max_new_tokens)
    for k, it in enumerate(items):
        i, pred = it["sample"], said["model"][k]
        flat["family"].append(it["family"])
        flat["source"].append(source_of(samples[i].get("meta")))
        flat["naming"].append(it["naming"])
        flat["model"].append(item_score(it, pred))
        flat["em"].append(flat["model"][-1] if it.get("letter") else
                          float(any(normalise_answer(pred) == normalise_answer(a) for a in it["answers"])))
        if blind:
            if it["question"] not in blind_said:  # greedy without an image: a function of the question alone
                blind_said[it["question"]] = answer(model, fmt, it["question"], None, max_new_tokens)
            flat["blind"].append(item_score(it, blind_said[it["question"]]))
            flat["shuffled"].append(item_score(it, said["shuffled"][k]))
        if len(examples) < 8 and sum(e["family"] == it["family"] for e in examples) < 2:  # spread over families
            examples.append({"q": it["question"], "pred": pred, "answers": it["answers"], "family": it["family"],
                             "sample": i})

    def mean(v: list[float]) -> float | None:
        return sum(v) / len(v) if v else None

    def by(key: str, col: str) -> dict:
        return {g: mean([v for v, x in zip(flat[col], flat[key]) if x == g]) for g in sorted(set(flat[key]))}

    out = {"items": len(items), "items_by_family": {f: flat["family"].count(f) for f in sorted(set(flat["family"]))},
           "items_by_source": {s: flat["source"].count(s) for s in sorted(set(flat["source"]))},
           "mc_items": sum(bool(it.get("letter")) for it in items)}
    for name, col in (("vqa_acc", "model"), ("exact_match", "em")) + ((("blind_vqa_acc", "blind"),
                                                                       ("shuffled_vqa_acc", "shuffled")) if blind else ()):
        out[name] = mean(flat[col])
        out[f"{name}_by_family"], out[f"{name}_by_source"] = by("family", col), by("source", col)
    if blind and items:
        fam, src = reading_summary(flat, "family"), reading_summary(flat, "source")
        out["reading"] = fam.pop("all")
        src.pop("all")
        out["reading_by_family"], out["reading_by_source"] = fam, src
        named = [k for k, n in enumerate(flat["naming"]) if n]
        if named:  # the naming questions alone, per source (the label read out in words)
            sub = {c: [flat[c][k] for k in named] for c in ("source", "model", "shuffled", "blind")}
            out["naming_by_source"] = reading_summary(sub, "source")
    out["examples"] = examples
    if per_item:
        out["per_item"] = {k: v for k, v in flat.items() if k != "em"}
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
            blind: bool, examples_dir, per_item: bool = False, peer: str | None = None) -> dict:
    """{**where, "image_samples", "skipped", "skipped_total", **vqa_eval(...)}; examples' images saved if asked;
    with an OCR peer (mm.eval.ocr_peer) also "ocr_peer": its accuracy and ours on the same OCR items, the paired
    difference (ours - peer) with its 95% interval, or the line saying it is not installed."""
    out = {**where, "image_samples": len(samples), "skipped": skips, "skipped_total": sum(skips.values())}
    if not samples:
        raise ValueError(f"{next(iter(where.values()))}: no readable image samples (skipped: {skips})")
    out.update(vqa_eval(model, tok, samples, max_items, max_new_tokens, blind=blind, per_item=per_item or bool(peer)))
    if peer:
        out["ocr_peer"] = ocr_peer_figures(peer, samples, vqa_items(samples, max_items), out["per_item"]["model"])
        if not per_item:
            del out["per_item"]
    if examples_dir:
        save_example_images(samples, out["examples"], Path(examples_dir))
    return out


def ocr_peer_figures(name: str, samples: list[dict], items: list[dict], ours: list[float]) -> dict:
    """The OCR peer `name` against our per-item scores `ours` on the OCR-family items."""
    from mm.eval.ocr_peer import PeerMissing, peer_eval, reader

    keep = [k for k, it in enumerate(items) if it["family"] == "ocr"]
    try:
        read = reader(name)
    except PeerMissing as e:
        return {"name": name, "error": str(e)}
    if not keep:
        return {"name": name, "error": "no OCR items among the scored ones"}
    peer = peer_eval(samples, [items[k] for k in keep], read, item_score)
    d = paired_bootstrap([ours[k] for k in keep], peer["per_item"], None, 1000, 0)
    return {"name": name, "items": len(keep), "acc": d["b"], "ours": d["a"], "ours_minus_peer": d["delta"],
            "ci95": d["ci95"]}


def eval_image_shards(model: ComposedLM, tok, shards: str, max_items: int = 400, max_new_tokens: int = 8,
                      blind: bool = True, decode_scale: int = 1, seed: int = 0,
                      examples_dir: str | Path | None = None, families: tuple[str, ...] = (),
                      per_item: bool = False, peer: str | None = None) -> dict:
    """VQA metrics of a loaded image model on any image-text shards (DESIGN.md format): samples decoded at
    decode_scale tile sides (a seeded subset of max_items // 2 samples, all when max_items is 0), then vqa_eval.
    Returns {"shards", "image_samples", "skipped" ({reason: n}), "skipped_total", **vqa_eval(...)}; the one
    implementation behind `mm eval image` and benchmarks/image.py. examples_dir: save the examples' images there;
    families: keep only samples of these task families (all when empty); peer: an OCR peer scored on the same OCR
    items (mm.eval.ocr_peer.PEERS)."""
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
                   examples_dir, per_item, peer)


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
