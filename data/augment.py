"""Image augmentation for training feeds: a random affine jitter (rotation, shift, scale) whose draws come from the
caller's `random.Random`, so a sample's jitter is a pure function of the caller's seed (exact resume); torchvision's
functional affine does the warp."""
from __future__ import annotations

import random

import torch
import torchvision.transforms.v2.functional as TF


def affine_jitter(image: torch.Tensor, rng: random.Random, degrees: float = 0.0, translate: float = 0.0,
                  scale: float = 0.0) -> torch.Tensor:
    """uint8 image (3, H, W) -> the same shape and dtype rotated by U(-degrees, degrees), shifted by up to
    translate x its side on each axis and scaled by U(1 - scale, 1 + scale) about its centre (bilinear), the
    image warped on an edge-replicated canvas twice its size and cropped back, so uncovered corners continue its
    border (its background) with no seam; all zeros: the image itself."""
    if not (degrees or translate or scale):
        return image
    angle = rng.uniform(-degrees, degrees)
    shift = [round(rng.uniform(-translate, translate) * image.shape[-1]),
             round(rng.uniform(-translate, translate) * image.shape[-2])]
    factor = rng.uniform(1.0 - scale, 1.0 + scale)
    H, W = image.shape[-2:]
    ph, pw = H // 2, W // 2
    canvas = TF.pad(image, [pw, ph, pw, ph], padding_mode="edge")  # (3, H + 2ph, W + 2pw)
    out = TF.affine(canvas, angle=angle, translate=shift, scale=factor, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    return out[:, ph:ph + H, pw:pw + W]  # (3, H, W)
