"""Benchmark files of the field, read into the image samples the shard reader gives (mm.stages.clip_pretrain.
load_image_samples): {"key", "image" (3, H, W) uint8, "caption" "", "meta": {"source", "family" (the row's
category, "other" without one), "index", "qa": [{"question", "answers", "choices"?, "letter"?}]}}, one per row.
A qa with "letter" is a lettered multiple-choice item (data/qa_format.py prompt, scored by the reply's letter).

TSV (VLMEvalKit, MMBench-style): a header with index, image (base64 PNG/JPEG, or the index of an earlier row with
the same image), question, answer, and optionally A..H option columns, hint, category. With options the answer is
the letter (or an option's text); without, a string (or a Python/JSON list of accepted strings).
JSONL (lmms-eval style): one object per line with image (a path relative to the file's folder, or base64, or a
data: URL), question, answers (list of accepted strings) or answer, and optionally choices, category.

Images go through data.decode.decode_image only (PIL, pixel cap). A bad row (bad base64, undecodable or missing
image, missing field, answer not among the options) is skipped and counted by reason; a file not of the shape
(wrong header, first line not a JSON object, not UTF-8) raises one ValueError naming the file.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import random
from pathlib import Path

import numpy as np

from data.decode import decode_image
from data.qa_format import LETTERS, gold_letter
from data.shards import BadSample, SkipCounter

TSV_COLUMNS = ("index", "image", "question", "answer")
JSONL_FIELDS = ("image", "question", "answers|answer")
MAX_FIELD = 64 << 20  # bytes: one TSV cell / one image file
KINDS = ("tsv", "jsonl")


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))


def _answer_list(answer) -> list[str]:
    """An answer cell -> accepted strings: a list, a Python/JSON list literal, or one string."""
    if isinstance(answer, (list, tuple)):
        return [str(a).strip() for a in answer if not _blank(str(a))]
    s = str(answer).strip()
    if s.startswith("[") and s.endswith("]") and len(s) < 10_000:
        try:
            v = ast.literal_eval(s)  # literals only: no code runs
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            v = None
        if isinstance(v, list):
            return [str(a).strip() for a in v if not _blank(str(a))]
    return [s] if s else []


def make_qa(question: str, answers, choices=None) -> dict:
    """One row's qa: {"question", "answers"} or, with 2..8 options, {"question", "choices", "answers" [the gold
    option's text], "letter"}; the gold is an option letter among the answers or an option matching one.
    Raises BadSample: missing_field (no question / answer), bad_choices (1 or > 8 options), bad_answer."""
    refs = _answer_list(answers)
    if _blank(question) or not refs:
        raise BadSample("missing_field", "empty question or answer")
    question = str(question).strip()
    choices = [str(c).strip() for c in choices or []]
    if not choices:
        return {"question": question, "answers": refs}
    if not 2 <= len(choices) <= len(LETTERS):
        raise BadSample("bad_choices", f"{len(choices)} options")
    letters = LETTERS[:len(choices)]
    letter = next((r.upper() for r in refs if len(r) == 1 and r.upper() in letters), None) or \
        gold_letter({"answers": refs, "choices": choices})
    if letter is None:
        raise BadSample("bad_answer", f"{refs[:3]} is neither an option letter nor an option")
    return {"question": question, "choices": choices, "answers": [choices[letters.index(letter)]], "letter": letter}


def _tsv_choices(d: dict, cols: list[str]) -> list[str]:
    present = [L for L in LETTERS if L in cols and not _blank(d[L])]
    if present != list(LETTERS[:len(present)]):
        raise BadSample("bad_choices", f"options {present} are not A, B, ...")
    return [d[L] for L in present]


def read_tsv_rows(path: Path) -> tuple[list[dict], SkipCounter]:
    """Rows of a VLMEvalKit TSV (images not decoded): [{"index", "image": ("b64", str), "qa", "category"}]."""
    skips, rows, by_index = SkipCounter(), [], {}
    old = csv.field_size_limit(MAX_FIELD)
    try:
        with open(path, encoding="utf-8-sig", errors="strict", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            cols = [c.strip() for c in next(reader, None) or []]
            missing = next((c for c in TSV_COLUMNS if c not in cols), None)
            if missing:
                raise ValueError(f"{path}: not a VLMEvalKit-style TSV: no '{missing}' column "
                                 f"(header: {'|'.join(cols)[:80]!r})")
            for line in reader:
                if not line:
                    continue
                if len(line) != len(cols):
                    skips.add("bad_row")
                    continue
                d = dict(zip(cols, line))
                if len(d["image"]) > 64:
                    by_index.setdefault(d["index"].strip(), d["image"])
                try:
                    q = d["question"] if _blank(d.get("hint")) else f"Hint: {d['hint'].strip()}\n{d['question']}"
                    row = {"index": d["index"].strip(), "image": ("b64", d["image"]),
                           "qa": make_qa(q, d["answer"], _tsv_choices(d, cols)),
                           "category": "other" if _blank(d.get("category")) else d["category"].strip()}
                except BadSample as e:
                    skips.add(e.reason)
                    continue
                rows.append(row)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable TSV ({e})") from None
    finally:
        csv.field_size_limit(old)
    for row in rows:  # MMBench stores a repeated image once; later rows hold that row's index
        ref = row["image"][1].strip()
        if len(ref) <= 64 and ref in by_index:
            row["image"] = ("b64", by_index[ref])
    return rows, skips


def _jsonl_image(v, folder: Path) -> tuple[str, object]:
    if not isinstance(v, str) or not v.strip():
        raise BadSample("missing_field", "no image")
    v = v.strip()
    if v.startswith("data:"):
        return "b64", v.partition(",")[2]
    if len(v) < 1024 and ("." in v or (folder / v).is_file()):  # base64 has no '.'; a file name has
        return "file", folder / v
    return "b64", v


def read_jsonl_rows(path: Path) -> tuple[list[dict], SkipCounter]:
    """Records of an lmms-eval-style JSONL (images not decoded): [{"index", "image": ("b64" | "file", ...), "qa",
    "category"}]. The first record must be a JSON object with every field (else ValueError naming the file)."""
    skips, rows, first = SkipCounter(), [], True
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    rec = None
                if not isinstance(rec, dict):
                    if first:
                        raise ValueError(f"{path}: line {n} is not a JSON object (expected lmms-eval-style JSONL)")
                    skips.add("bad_json")
                    continue
                missing = next((k for k in JSONL_FIELDS if not any(a in rec for a in k.split("|"))), None)
                if missing and first:
                    raise ValueError(f"{path}: not an lmms-eval-style JSONL: no '{missing}' field on line {n}")
                first = False
                try:
                    if missing:
                        raise BadSample("missing_field", missing)
                    choices = rec.get("choices") or []
                    if not isinstance(choices, list):
                        raise BadSample("bad_choices", "choices is not a list")
                    rows.append({"index": str(rec.get("index", rec.get("id", n))),
                                 "image": _jsonl_image(rec["image"], path.parent),
                                 "qa": make_qa(rec["question"], rec.get("answers", rec.get("answer")), choices),
                                 "category": "other" if _blank(rec.get("category")) else str(rec["category"])})
                except BadSample as e:
                    skips.add(e.reason)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows, skips


def image_bytes(ref: tuple[str, object]) -> bytes:
    """("b64", text) or ("file", Path) -> the encoded image bytes; BadSample bad_base64 / missing_image /
    image_too_large."""
    kind, v = ref
    if kind == "file":
        p = Path(v)
        if not p.is_file():
            raise BadSample("missing_image", str(p))
        if p.stat().st_size > MAX_FIELD:
            raise BadSample("image_too_large", f"{p}: {p.stat().st_size} bytes")
        return p.read_bytes()
    try:
        return base64.b64decode("".join(str(v).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSample("bad_base64", str(e)) from None


def load_bench_samples(path: str | Path, kind: str, image_size: int | None, max_samples: int = 0, seed: int = 0,
                       categories: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """A benchmark file (kind "tsv" | "jsonl") -> (image samples in file order, skip counts {reason: n}): rows of
    the given categories (all when empty; an unknown one is a ValueError), a seeded subset of max_samples rows
    (all when 0), images decoded at image_size x image_size (native size when None)."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark file kind {kind!r}; known: {list(KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    rows, skips = (read_tsv_rows if kind == "tsv" else read_jsonl_rows)(path)
    if categories:
        unknown = set(categories) - {r["category"] for r in rows}
        if unknown:
            raise ValueError(f"{path}: no rows of categories {sorted(unknown)}")
        rows = [r for r in rows if r["category"] in categories]
    if 0 < max_samples < len(rows):
        rows = [rows[k] for k in sorted(random.Random(seed).sample(range(len(rows)), max_samples))]
    out = []
    for r in rows:
        try:
            img = decode_image(image_bytes(r["image"]), size=image_size)  # (H, W, 3) uint8
        except BadSample as e:
            skips.add(e.reason)
            continue
        out.append({"key": f"{path.name}:{r['index']}", "image": np.ascontiguousarray(img.transpose(2, 0, 1)),
                    "caption": "", "meta": {"source": path.name, "family": r["category"], "index": r["index"],
                                            "qa": [r["qa"]]}})
    return out, skips.as_dict()
