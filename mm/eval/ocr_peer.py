"""An OCR peer a user would pick instead, scored on the same held-out OCR items as the image model (DATA.md §6):
RapidOCR (PP-OCR ONNX models; `pip install rapidocr onnxruntime`) or Tesseract (Debian `tesseract-ocr` +
`tesseract-ocr-eng`). The peer transcribes each image (upscaled: the kit's tiles are 64 px); its lines answer the
kit's OCR questions by rule (the word, the first word, the last word of the first line, is-the-word, letters, lines),
scored by the same item_score as the model's replies."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

PEERS = ("rapidocr", "tesseract")
UPSCALE = 4


class PeerMissing(RuntimeError):
    """The peer is not installed here (the message says how to install it)."""


def reader(name: str) -> Callable[[np.ndarray], list[str]]:
    """name -> read(image (3, H, W) or (H, W, 3) uint8) -> text lines, top to bottom; PeerMissing when absent."""
    if name == "rapidocr":
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise PeerMissing("rapidocr is not installed (pip install rapidocr onnxruntime)") from None
        engine = RapidOCR()

        def read(image: np.ndarray) -> list[str]:
            res = engine(_upscaled(image))
            return [str(t) for t in (getattr(res, "txts", None) or ())]
        return read
    if name == "tesseract":
        exe = shutil.which("tesseract")
        if exe is None:
            raise PeerMissing("tesseract is not installed (Debian: tesseract-ocr tesseract-ocr-eng)")

        def read(image: np.ndarray) -> list[str]:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "page.png"
                Image.fromarray(_upscaled(image)).save(path)
                out = subprocess.run([exe, str(path), "-", "--psm", "6"], capture_output=True, text=True, timeout=60)
            return [ln for ln in out.stdout.splitlines() if ln.strip()]
        return read
    raise ValueError(f"unknown OCR peer {name!r}; known: {', '.join(PEERS)}")


def _upscaled(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 3:
        img = img.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(im.resize((im.width * UPSCALE, im.height * UPSCALE), Image.BICUBIC))


def answer_from_lines(question: str, lines: list[str]) -> str:
    """The peer's answer to one of the kit's OCR questions from its transcribed lines ("" when it read nothing)."""
    words = [w for ln in lines for w in ln.split()]
    q = question.lower()
    if q.startswith("is the word"):
        asked = re.search(r'"([^"]+)"', question)
        return "yes" if asked and asked.group(1).lower() in (w.lower().strip(".,;:!?\"'") for w in words) else "no"
    if "how many lines" in q:
        return str(len(lines))
    if "how many letters" in q:
        return str(len(words[0].strip(".,;:!?\"'"))) if words else ""
    if "last word on the first line" in q:
        return lines[0].split()[-1] if lines and lines[0].split() else ""
    return words[0] if words else ""  # what word is written / the first word of the text


def peer_eval(samples: list[dict], items: list[dict], read: Callable[[np.ndarray], list[str]],
              score: Callable[[dict, str], float]) -> dict:
    """{"acc", "items", "per_item"} of the peer on the OCR items (vqa_items' records, family "ocr") of samples."""
    lines: dict[int, list[str]] = {}
    per = []
    for it in items:
        if it["sample"] not in lines:
            lines[it["sample"]] = read(samples[it["sample"]]["image"])
        per.append(score(it, answer_from_lines(it["question"], lines[it["sample"]])))
    return {"acc": float(np.mean(per)) if per else None, "items": len(per), "per_item": per}
