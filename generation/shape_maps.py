"""Shape maps of product photos by GrabCut, as in PaintNet (Sec. 4.1), and their agreement with VITON's cloth-mask.

The paper extracts each shop image's shape map S (the garment's silhouette, what the shape predictor
predicts and the texture renderer fills) with GrabCut. Product photos are shot on white with the
garment filling the frame, so GrabCut starts from either

- ``init="rect"``: everything outside a rectangle inset `inset` pixels from the border is background,
  the inside "probably garment" (OpenCV's rectangle mode), or
- ``init="white"``: the border band is background; inside it, near-white pixels (every channel >=
  `white_threshold`) start as "probably background" and the rest as "probably garment".

Holes (background regions that do not touch the border: a white print inside a dark shirt) are filled,
because a silhouette has none; VITON's cloth-masks have none either.

`shape_map_agreement` measures the IoU of these maps with VITON's own cloth-mask (thresholded at 128).

Example:
    >>> product = np.full((64, 48, 3), 255, np.uint8); product[12:52, 10:38] = (200, 30, 30)
    >>> bool(grabcut_shape_map(product)[12:52, 10:38].mean() > 0.95)
    True
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
import torch

from generation.parsing import run_grabcut
from retrieval.io import read_image, read_mask, resize_image

SHAPE_MAP_INITS = ("rect", "white")


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of a boolean (H, W) mask that do not touch the image border.

    Example:
        >>> ring = np.ones((5, 5), bool); ring[2, 2] = False
        >>> bool(fill_holes(ring)[2, 2])
        True
    """
    background = (~mask).astype(np.uint8)
    count, labels = cv2.connectedComponents(background, connectivity=4)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border_labels[border_labels > 0])
    return ~outside


def shape_map_initial_labels(
    image: np.ndarray, init: str = "rect", inset: int = 4, white_threshold: int = 245
) -> np.ndarray:
    """GrabCut's initial labels for a product photo on white (see the module docstring).

    Returns:
        (H, W) uint8 of cv2.GC_BGD / GC_PR_BGD / GC_PR_FGD.
    """
    if init not in SHAPE_MAP_INITS:
        raise ValueError(f"init must be one of {SHAPE_MAP_INITS}, got {init!r}")
    height, width = image.shape[:2]
    if not 0 < inset < min(height, width) // 2:
        raise ValueError(f"inset must be in 1..{min(height, width) // 2 - 1} for a {height}x{width} image, got {inset}")
    labels = np.full((height, width), cv2.GC_BGD, np.uint8)
    inside = (slice(inset, height - inset), slice(inset, width - inset))
    labels[inside] = cv2.GC_PR_FGD
    if init == "white":
        near_white = (image >= white_threshold).all(axis=2)
        labels[inside][near_white[inside]] = cv2.GC_PR_BGD
        if not (labels == cv2.GC_PR_FGD).any():  # an all-white photo: fall back to the rectangle
            labels[inside] = cv2.GC_PR_FGD
    return labels


def grabcut_shape_map(
    image: np.ndarray,
    init: str = "rect",
    inset: int = 4,
    white_threshold: int = 245,
    iterations: int = 5,
    keep_holes: bool = False,
) -> np.ndarray:
    """Boolean silhouette (H, W) of the garment in a product photo on white, by GrabCut.

    Args:
        image: (H, W, 3) uint8 RGB product photo.
        init: "rect" or "white" (module docstring).
        inset: width in pixels of the border band that starts as sure background.
        white_threshold: channel value from which a pixel counts as near-white ("white" init only).
        iterations: GrabCut iterations.
        keep_holes: keep holes (by default they are filled: a silhouette has none).
    """
    mask = run_grabcut(image, shape_map_initial_labels(image, init, inset, white_threshold), iterations)
    return mask if keep_holes else fill_holes(mask)


def grabcut_shape_maps(images: torch.Tensor, **options) -> torch.Tensor:
    """`grabcut_shape_map` over a batch of product images (one OpenCV call per image).

    Shape:
        - images: (B, 3, H, W) in [0, 1].
        - Output: (B, 1, H, W) float in {0, 1}, on the images' device.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    maps = np.stack([grabcut_shape_map(np.ascontiguousarray(p), **options) for p in pixels])
    return torch.from_numpy(maps)[:, None].to(device=images.device, dtype=images.dtype)


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> float:
    """IoU of two boolean masks; 1 when both are empty.

    Example:
        >>> mask_iou(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
        0.5
    """
    union = np.logical_or(predicted, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, target).sum() / union)


def shape_map_agreement(
    product_images: Sequence[str],
    cloth_masks: Sequence[str],
    limit: Optional[int] = 200,
    seed: int = 0,
    size: Optional[tuple] = None,
    **options,
) -> Dict[str, object]:
    """IoU of GrabCut shape maps with VITON's cloth-mask (grey JPEG, thresholded at 128) over product photos.

    Args:
        product_images, cloth_masks: paths, in the same order (e.g. `dataset.train["product_image"]`
            and `dataset.train["mask"]`).
        limit: a seeded sample of this many pairs (None: all).
        seed: the sample's seed.
        size: (H, W) to resize photo and mask to first (nearest for the mask); None keeps the photo's.
        **options: `grabcut_shape_map` options (init, inset, white_threshold, iterations, keep_holes).

    Returns:
        {"mean_iou", "median_iou", "min_iou", "images", "per_image": DataFrame(product_image, iou)}.
    """
    from retrieval.batching import sample_paths

    if len(product_images) != len(cloth_masks):
        raise ValueError(f"{len(product_images)} product photos but {len(cloth_masks)} cloth masks")
    pairs = [(p, m) for p, m in zip(product_images, cloth_masks) if isinstance(m, str) and m]
    if not pairs:
        raise ValueError("no product photo has a cloth-mask to compare with")
    keep = set(sample_paths([p for p, _ in pairs], limit, seed=seed))
    rows = []
    for product, mask_path in pairs:
        if product not in keep:
            continue
        image = read_image(product)
        truth = read_mask(mask_path)
        if size is not None:
            image = resize_image(image, size)
        if truth.shape != image.shape[:2]:
            truth = cv2.resize(truth, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        rows.append({"product_image": product, "iou": mask_iou(grabcut_shape_map(image, **options), truth >= 128)})
    per_image = pd.DataFrame(rows)
    return {
        "mean_iou": float(per_image["iou"].mean()),
        "median_iou": float(per_image["iou"].median()),
        "min_iou": float(per_image["iou"].min()),
        "images": len(per_image),
        "per_image": per_image,
    }
