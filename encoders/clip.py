"""Contrastive image-text pretraining of the image encoder (PAPER.md §3: a ViT "contrastively trained to align images
and text"), in-repo at our scale: the ViT's pooled output + projection against a small causal text Transformer
(open_clip's TextTransformer, EOT pooling) over the repo's own BPE ids, open_clip's symmetric ClipLoss with a
learnable logit scale (init log(1/0.07), capped at 100). Evaluation: zero-shot classification by caption templates and
image<->text recall@k; `clip_score_fn` gives data/curation's clip_filter a scorer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transformer import TextTransformer

from encoders.vision import VisionConfig, VisionEncoder, flops_per_image, normalize_pixels

__all__ = ["TextConfig", "ClipModel", "ClipLoss", "tokenize_captions", "zero_shot_accuracy", "retrieval_recall_at_k",
           "zero_shot_suite", "ZERO_SHOT_TASKS", "clip_score_fn", "flops_per_pair"]


@dataclass
class TextConfig:
    """Shape of the text tower (captions are truncated to context_length - 1 ids + EOT)."""

    context_length: int = 32
    width: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        """Plain dict (meta.json)."""
        return asdict(self)


class ClipModel(nn.Module):
    """Image tower (`vision`: the VisionEncoder, pooled + `visual_proj`) and text tower (`text`) in one joint space.

    forward(pixels (B, 3, t, t) normalised, ids (B, L)) -> (image emb (B, E), text emb (B, E), logit scale ()),
    embeddings L2-normalised.
    """

    def __init__(self, vision: VisionConfig, text: TextConfig, vocab_size: int, pad_id: int, eos_id: int,
                 embed_dim: int = 64, pool: str = "cls", init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be cls|mean, got {pool!r}")
        self.pool, self.max_logit_scale, self.eos_id, self.pad_id = pool, max_logit_scale, eos_id, pad_id
        self.text_cfg = text
        self.vision = VisionEncoder(vision)
        self.visual_proj = nn.Linear(vision.width, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=vision.width ** -0.5)
        self.text = TextTransformer(context_length=text.context_length, vocab_size=vocab_size, width=text.width,
                                    heads=text.heads, layers=text.layers, mlp_ratio=text.mlp_ratio,
                                    output_dim=embed_dim, pad_id=pad_id, eos_id=eos_id, pool_type="eos")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, t, t) normalised -> (B, E) unit vectors."""
        return F.normalize(self.visual_proj(self.vision.pooled(pixels, self.pool)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids ending in EOT -> (B, E) unit vectors."""
        return F.normalize(self.text(ids), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at max_logit_scale."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        """(image embeddings (B, E), text embeddings (B, E), logit scale ())."""
        return self.encode_image(pixels), self.encode_text(ids), self.scale()


def tokenize_captions(tok, captions: Sequence[str], context_length: int) -> torch.Tensor:
    """Captions -> (B, context_length) ids: BPE ids truncated to context_length - 1, then EOT, then pad ids."""
    out = torch.full((len(captions), context_length), tok.pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = tok.encode(c)[:context_length - 1] + [tok.eot_id]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def flops_per_pair(vision: VisionConfig, text: TextConfig) -> float:
    """Training FLOPs of one image-text pair (the ViT without the gated layers, which CLIP does not use)."""
    L, D = text.context_length, text.width
    per_block = 2 * (4 * D * D + 2 * D * int(D * text.mlp_ratio)) * L + 4 * L * L * D
    return flops_per_image(vision, 1, gated=False) + 3.0 * text.layers * per_block


# ---- evaluation -------------------------------------------------------------------------------------------------

def _as_pixels(images, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) tensor or array -> normalised float (N, 3, size, size) (resized where needed)."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    return normalize_pixels(x)


@torch.no_grad()
def _image_features(model: ClipModel, images, batch_size: int) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    px = _as_pixels(images, model.vision.cfg.image_size)
    return torch.cat([model.encode_image(px[i:i + batch_size].to(dev)) for i in range(0, len(px), batch_size)])


@torch.no_grad()
def _text_features(model: ClipModel, tok, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    ids = tokenize_captions(tok, texts, model.text_cfg.context_length)
    return torch.cat([model.encode_text(ids[i:i + batch_size].to(dev)) for i in range(0, len(ids), batch_size)])


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def zero_shot_accuracy(model: ClipModel, tokenizer, images, labels: Sequence[str], classnames, templates: Sequence[str],
                       batch_size: int = 256) -> float:
    """Top-1 accuracy of classifying images by the nearest class text embedding.

    classnames: a list of labels, or {label: [names...]}; each class embedding is the normalised mean over its names x
    templates (format fields {label} and {a}, the article). Labels outside the class set count as wrong.
    """
    names = classnames if isinstance(classnames, dict) else {c: [c] for c in classnames}
    keys = list(names)
    weights = []
    for k in keys:
        prompts = [t.format(label=n, a=_article(n), A=_article(n).capitalize()) for n in names[k] for t in templates]
        weights.append(F.normalize(_text_features(model, tokenizer, prompts, batch_size).mean(0), dim=-1))
    w = torch.stack(weights)  # (K, E)
    img = _image_features(model, images, batch_size)  # (N, E)
    pred = (img @ w.T.to(img.device)).argmax(-1).cpu()
    target = torch.tensor([keys.index(lab) if lab in names else -1 for lab in labels])
    return float((pred == target).float().mean()) if len(labels) else float("nan")


def retrieval_recall_at_k(model: ClipModel, tokenizer, images, captions: Sequence[str], ks: Sequence[int] = (1, 5),
                          batch_size: int = 256) -> dict:
    """Image->text and text->image recall@k over the UNIQUE captions (identical captions are one entry, so a tie
    between duplicates is not a miss); chance for image->text is k / n_captions."""
    uniq = sorted(set(captions))
    pos = torch.tensor([uniq.index(c) for c in captions])  # (N,) the true caption of each image
    img = _image_features(model, images, batch_size)
    txt = _text_features(model, tokenizer, uniq, batch_size).to(img.device)
    sim = (img @ txt.T).cpu()  # (N, U)
    out = {"n_images": len(captions), "n_captions": len(uniq)}
    for k in ks:
        kk = min(k, len(uniq))
        out[f"i2t_r@{k}"] = float((sim.topk(kk, dim=1).indices == pos[:, None]).any(1).float().mean())
        top_img = sim.T.topk(min(k, len(captions)), dim=1).indices  # (U, k) images per caption
        out[f"t2i_r@{k}"] = float((pos[top_img] == torch.arange(len(uniq))[:, None]).any(1).float().mean())
        out[f"i2t_chance@{k}"] = kk / len(uniq)
    return out


_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# source -> (meta field holding the class, templates, names per label or None); the class set is the labels seen
ZERO_SHOT_TASKS: dict[str, tuple[str, tuple[str, ...], Callable[[str], list[str]] | None]] = {
    "fashion_mnist": ("label", ("a photo of {a} {label}.", "A grayscale photo of {a} {label}.",
                                "A small picture of {a} {label}."), None),
    "mnist": ("label", ("a photo of the number {label}.", "A handwritten digit {label}.", "A handwritten {label}."),
              lambda lab: [lab, _DIGITS[int(lab)]] if lab.isdigit() and int(lab) < 10 else [lab]),
    "tuxpaint": ("category", ("a picture of {label}.", "a drawing from the {label} category."), None),
}


def zero_shot_suite(model: ClipModel, tokenizer, samples: Sequence[dict], batch_size: int = 256) -> dict:
    """Zero-shot accuracy per ZERO_SHOT_TASKS source present in `samples` ({image (3,H,W) uint8, caption, meta}),
    with chance = 1 / classes, their mean, and image<->text recall@1/5 over all samples."""
    out: dict = {}
    accs = []
    for src, (fld, templates, names_of) in ZERO_SHOT_TASKS.items():
        sub = [s for s in samples if s["meta"].get("source") == src and s["meta"].get(fld) is not None]
        if not sub:
            continue
        labels = [str(s["meta"][fld]) for s in sub]
        classes = sorted(set(labels))
        if len(classes) < 2:
            continue
        names = {c: (names_of(c) if names_of else [c]) for c in classes}
        acc = zero_shot_accuracy(model, tokenizer, np.stack([s["image"] for s in sub]), labels, names, templates,
                                 batch_size)
        out[f"zs_{src}"] = acc
        out[f"zs_{src}_chance"] = 1.0 / len(classes)
        accs.append((acc, 1.0 / len(classes)))
    if accs:
        out["zs_mean"] = float(np.mean([a for a, _ in accs]))
        out["zs_mean_chance"] = float(np.mean([c for _, c in accs]))
    if samples:
        r = retrieval_recall_at_k(model, tokenizer, np.stack([s["image"] for s in samples]),
                                  [s["caption"] for s in samples], (1, 5), batch_size)
        out.update({k: v for k, v in r.items() if k.startswith(("i2t", "t2i"))})
        out["retrieval_captions"] = r["n_captions"]
    return out


def clip_score_fn(model: "ClipModel", tok) -> Callable:
    """A `score(image, caption) -> float` for data.curation.clip_filter: the cosine similarity (in [-1, 1]) of a CLIP
    model's image and caption embeddings (a run loaded with mm.model.runs.load_clip). image: (H, W, 3) uint8 array
    or (3, H, W) uint8 tensor."""

    def score(image, caption: str) -> float:
        """Cosine similarity of one image and one caption."""
        im = image if torch.is_tensor(image) else torch.from_numpy(np.ascontiguousarray(np.asarray(image)
                                                                                           .transpose(2, 0, 1)))
        img = _image_features(model, im[None], 1)
        return float((img @ _text_features(model, tok, [caption], 1).T.to(img.device)).item())

    return score
