"""Garment masks and the segmented texture T_m: pure operations that retrieval, generation and training share.

They live here, below `generation/`, because retrieval-side trainers (L2-Net's garment pairs, the patch
sampler) need them too and a layer never imports a higher one. `generation.parsing` (the parser that
predicts the masks) re-exports them.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# LIP labels of the garment a VITON pair shows: upper-clothes, dress, coat.
GARMENT_LABELS = (5, 6, 7)


def garment_mask_from_labels(labels: np.ndarray, garment_labels: Sequence[int] = GARMENT_LABELS) -> np.ndarray:
    """LIP label map (H, W) uint8 -> boolean garment mask (H, W).

    Example:
        >>> garment_mask_from_labels(np.array([[0, 5], [7, 9]], np.uint8)).tolist()
        [[False, True], [True, False]]
    """
    return np.isin(labels, garment_labels)


def mask_bounding_boxes(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes (top, left, bottom, right), end-exclusive, of boolean masks; the full image when empty.

    Shape:
        - masks: (B, 1, H, W) bool.
        - Output: boxes (B, 4) long, nonempty (B,) bool.

    Example:
        >>> m = torch.zeros(1, 1, 4, 5, dtype=torch.bool); m[0, 0, 1:3, 2:4] = True
        >>> mask_bounding_boxes(m)[0].tolist()
        [[1, 2, 3, 4]]
    """
    rows, cols = masks[:, 0].any(dim=2), masks[:, 0].any(dim=1)  # (B, H), (B, W)
    height, width = masks.shape[-2:]
    top = rows.int().argmax(dim=1)
    bottom = height - rows.flip(1).int().argmax(dim=1)
    left = cols.int().argmax(dim=1)
    right = width - cols.flip(1).int().argmax(dim=1)
    nonempty = rows.any(dim=1)
    full = torch.tensor([0, 0, height, width], device=masks.device)
    boxes = torch.where(nonempty[:, None], torch.stack([top, left, bottom, right], dim=1), full)
    return boxes, nonempty


def segmented_texture(
    images: torch.Tensor, garment_mask: torch.Tensor, size: Tuple[int, int] = (64, 64), margin: float = 0.05
) -> torch.Tensor:
    """The garment cut out on white, cropped to its box, resized keeping aspect, padded with white (T_m).

    Args:
        images: person photos in [0, 1].
        garment_mask: garment alpha in [0, 1] (binary or soft); its box is where it exceeds 0.5.
        size: (h, w) of the output.
        margin: white border around the garment's box, as a fraction of the box's side.

    An image whose mask is empty is returned whole (not cut out, resized keeping aspect): with no
    garment found, the photo itself is a better guess than a blank page.

    Shape:
        - images: (B, 3, H, W); garment_mask: (B, 1, H, W).
        - Output: (B, 3, h, w) in [0, 1].

    Example:
        >>> photo = torch.zeros(1, 3, 8, 8); mask = torch.zeros(1, 1, 8, 8); mask[..., 2:6, 3:5] = 1
        >>> t = segmented_texture(photo, mask, size=(8, 8), margin=0.0)
        >>> t[0, 0, :, 2:6].tolist() == [[0.0] * 4] * 8, float(t[0, 0, 0, 0])  # a 4x2 box fills 8x4
        (True, 1.0)
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if garment_mask.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise ValueError(
            f"garment_mask must be (B, 1, H, W) = {(images.shape[0], 1, *images.shape[-2:])}, "
            f"got {tuple(garment_mask.shape)}"
        )
    alpha = garment_mask.to(images.dtype).clamp(0, 1)
    boxes, nonempty = mask_bounding_boxes(alpha > 0.5)
    alpha = torch.where(nonempty[:, None, None, None], alpha, torch.ones_like(alpha))
    cutout = images * alpha + (1 - alpha)  # composite over white
    out_h, out_w = int(size[0]), int(size[1])
    out = images.new_ones(images.shape[0], 3, out_h, out_w)
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):  # per image: each box has its own size
        box_h, box_w = bottom - top, right - left
        scale = min(out_h / (box_h * (1 + 2 * margin)), out_w / (box_w * (1 + 2 * margin)))
        new_h = min(out_h, max(1, int(round(box_h * scale))))
        new_w = min(out_w, max(1, int(round(box_w * scale))))
        crop = cutout[i : i + 1, :, top:bottom, left:right]
        shrinking = new_h < box_h or new_w < box_w
        resized = F.interpolate(crop, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=shrinking)
        y0, x0 = (out_h - new_h) // 2, (out_w - new_w) // 2
        out[i, :, y0 : y0 + new_h, x0 : x0 + new_w] = resized[0]
    return out.clamp(0, 1)
