"""Training data for learned patch descriptors: matching patch pairs from synthetic homographies.

A product photo A is warped by a random homography H (rotation, scale, shear, perspective,
translation) and re-lit (gamma, contrast, brightness, noise) into B. A local affine frame (LAF)
placed in A maps through H to the frame that sees the same surface in B, so every pair of patches
is a known correspondence, with no labels and no learned detector needed (the recipe of
SuperPoint's homographic adaptation and of LF-Net's synthetic pairs). The pieces:

- `random_homographies`, `warp_images`, `photometric_jitter`: the synthetic view B of a batch A.
- `homography_patch_pairs`: 32x32 patches at LAFs in A and at the mapped LAFs in B, with the pairs
  whose patch leaves either image dropped, and a mask of negatives that are really the same place.
- `hardnet_loss` / `hardest_in_batch_triplet_loss`: the HardNet loss (Mishchuk et al., "Working
  hard to know your neighbor's margins", NeurIPS 2017): for every matching pair, the closest
  non-matching descriptor in the batch, in either direction, is the negative of a margin triplet.
- `patch_matching_metrics`: FPR95 and matching mAP on held-out pairs, where descriptor training shows.
- `garment_patch_pairs` / `load_garment_pair_batch`: cross-domain pairs, a product photo's patch and
  the patch at the same place of the garment worn in the street photo (coarse, by mask boxes).

LAFs follow kornia's convention (``[A | c]`` in pixels, pixel centres at integers; the patch covers
``c + A [-1, 1]^2``). Homographies map pixel coordinates of A to pixel coordinates of B.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.feature import extract_patches_from_pyramid, get_laf_center, perspective_transform_lafs
from kornia.geometry.transform import warp_perspective

from retrieval.garments import GARMENT_LABELS

PATCH_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Synthetic second views
# --------------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def random_homographies(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    max_rotation_deg: float = 30.0,
    scale_range: Tuple[float, float] = (0.75, 1.33),
    max_aspect: float = 1.15,
    max_shear: float = 0.15,
    max_perspective: float = 0.12,
    max_translation: float = 0.12,
) -> torch.Tensor:
    """Draw random homographies that keep the centre of an image roughly in view.

    They are built in centred coordinates normalised by half the longer side (so a rotation is a
    rotation in pixels too): ``[[R(theta) diag(s a, s / a) Shear, t], [p, 1]]``, with the rotation,
    log-uniform scale and aspect, shear, translation (a fraction of the half side) and perspective
    terms drawn uniformly within the given bounds; then conjugated back to pixel coordinates.

    Args:
        batch: how many.
        height, width: image size in pixels.
        generator: seeds the draw (CPU generator).
        max_rotation_deg: rotation drawn in [-max, max] degrees.
        scale_range: isotropic scale, log-uniform in this range.
        max_aspect: anisotropic stretch, log-uniform in [1 / max_aspect, max_aspect].
        max_shear: shear drawn in [-max, max].
        max_perspective: perspective row drawn in [-max, max] (per unit of normalised coordinate).
        max_translation: translation in [-max, max] times half the longer side.

    Returns:
        float32 homographies mapping pixel (x, y, 1) of the source to the warped image.

    Shape:
        - output: (batch, 3, 3)

    Example:
        >>> H = random_homographies(2, 256, 192, torch.Generator().manual_seed(0))
        >>> H.shape
        torch.Size([2, 3, 3])
    """
    radius = max(height, width) / 2.0
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_centred = torch.tensor(
        [[1 / radius, 0, -cx / radius], [0, 1 / radius, -cy / radius], [0, 0, 1]], dtype=torch.float64
    )
    to_pixels = torch.linalg.inv(to_centred)

    theta = torch.deg2rad(_uniform(generator, (batch,), -max_rotation_deg, max_rotation_deg))
    scale = torch.exp(_uniform(generator, (batch,), math.log(scale_range[0]), math.log(scale_range[1])))
    aspect = torch.exp(_uniform(generator, (batch,), -math.log(max_aspect), math.log(max_aspect)))
    shear = _uniform(generator, (batch,), -max_shear, max_shear)
    translation = _uniform(generator, (batch, 2), -max_translation, max_translation)
    perspective = _uniform(generator, (batch, 2), -max_perspective, max_perspective)

    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    stretch = torch.diag_embed(torch.stack([scale * aspect, scale / aspect], -1))
    shearing = torch.eye(2, dtype=torch.float64).repeat(batch, 1, 1)
    shearing[:, 0, 1] = shear
    centred = torch.zeros(batch, 3, 3, dtype=torch.float64)
    centred[:, :2, :2] = rotation @ stretch @ shearing
    centred[:, :2, 2] = translation
    centred[:, 2, :2] = perspective
    centred[:, 2, 2] = 1.0
    return (to_pixels @ centred @ to_centred).float()


def warp_images(images: torch.Tensor, homographies: torch.Tensor) -> torch.Tensor:
    """Warp images by homographies into a canvas of the same size (borders replicate the edge).

    Edge replication rather than black: shop photos are on white, and a black wedge would hand the
    detector strong fake corners along the canvas border.

    Shape:
        - images: (B, C, H, W)
        - homographies: (B, 3, 3), source pixels -> output pixels
        - output: (B, C, H, W)
    """
    height, width = images.shape[-2:]
    return warp_perspective(
        images, homographies.to(images), (height, width), mode="bilinear", padding_mode="border", align_corners=True
    )


def photometric_jitter(
    grey: torch.Tensor,
    generator: torch.Generator,
    gamma_range: Tuple[float, float] = (0.7, 1.4),
    contrast_range: Tuple[float, float] = (0.7, 1.3),
    max_brightness: float = 0.15,
    noise_std: float = 0.02,
) -> torch.Tensor:
    """Random gamma, contrast (about the image mean), brightness and Gaussian noise, per image.

    Shape:
        - grey: (B, 1, H, W) in [0, 1]
        - output: (B, 1, H, W) in [0, 1]
    """
    batch = grey.shape[0]

    def draw(low: float, high: float) -> torch.Tensor:
        return _uniform(generator, (batch, 1, 1, 1), low, high).to(grey)

    gamma = torch.exp(draw(math.log(gamma_range[0]), math.log(gamma_range[1])))
    out = grey.clamp(1e-6, 1.0) ** gamma
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * draw(*contrast_range) + mean + draw(-max_brightness, max_brightness)
    noise = torch.randn(grey.shape, generator=generator, dtype=torch.float64).to(grey)
    return (out + noise_std * noise).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Patch pairs
# --------------------------------------------------------------------------------------------------


def laf_square_inside(lafs: torch.Tensor, height: int, width: int, border: float = 0.0) -> torch.Tensor:
    """Whether the whole square patch ``c + A [-1, 1]^2`` of each LAF lies inside the image.

    kornia's `laf_is_inside_image` tests the inscribed ellipse; the patch sampler reads the square,
    whose corners reach sqrt(2) further, and a corner outside the image reads replicated border.

    Shape:
        - lafs: (B, N, 2, 3)
        - output: (B, N) bool
    """
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=lafs.dtype, device=lafs.device)
    points = lafs[..., None, :, 2] + torch.einsum("bnij,kj->bnki", lafs[..., :2], corners)  # (B, N, 4, 2)
    inside_x = (points[..., 0] >= border) & (points[..., 0] <= width - 1 - border)
    inside_y = (points[..., 1] >= border) & (points[..., 1] <= height - 1 - border)
    return (inside_x & inside_y).all(dim=-1)


def same_place_mask(centres: torch.Tensor, image_index: torch.Tensor, radius: float) -> torch.Tensor:
    """Pairs (i, j) of distinct features from the same image whose centres are closer than `radius`.

    Two such patches show nearly the same pixels (e.g. SIFT's second orientation at a keypoint), so
    using one as the other's negative would teach the network to separate identical content.

    Shape:
        - centres: (M, 2)
        - image_index: (M,)
        - output: (M, M) bool, False on the diagonal
    """
    close = torch.cdist(centres.double(), centres.double()) < radius
    same_image = image_index[:, None] == image_index[None, :]
    eye = torch.eye(len(centres), dtype=torch.bool, device=centres.device)
    return close & same_image & ~eye


@dataclass
class PatchPairs:
    """Matching patches: ``anchors[i]`` (view A) and ``positives[i]`` (view B) show the same surface.

    Shape:
        anchors, positives: (M, 1, PS, PS)
        centres: (M, 2) xy of the anchor in A's pixels.
        image_index: (M,) which image of the batch each pair came from.
        exclude: (M, M) bool, pairs that must not serve as each other's negatives.
    """

    anchors: torch.Tensor
    positives: torch.Tensor
    centres: torch.Tensor
    image_index: torch.Tensor
    exclude: torch.Tensor


def homography_patch_pairs(
    grey_a: torch.Tensor,
    grey_b: torch.Tensor,
    lafs_a: torch.Tensor,
    mask: torch.Tensor,
    homographies: torch.Tensor,
    patch_size: int = PATCH_SIZE,
    same_place_radius: float = 4.0,
    min_contrast: float = 0.01,
) -> PatchPairs:
    """Patches at LAFs of A and at the same LAFs mapped by H into B.

    A pair is kept when it is real (``mask``), both square patches lie inside their images (in B a
    pixel outside the canvas is invented border), and the anchor is not flat (std >= `min_contrast`:
    a patch of white backdrop matches every other one and teaches nothing). The LAFs in B are
    kornia's `perspective_transform_lafs` (exact centre, affine approximation of H around it), so
    the grid-sampling of patches is differentiable in ``lafs_a`` (LF-Net-style detector training).

    Args:
        grey_a: view A.
        grey_b: view B = warp of A by ``homographies`` (plus photometric change).
        lafs_a: frames in A; padding rows may hold anything finite.
        mask: True for real frames.
        homographies: pixels of A -> pixels of B.
        patch_size: side of the square patches.
        same_place_radius: pairs from one image closer than this (pixels of A) are excluded as negatives.
        min_contrast: anchors with a lower standard deviation are dropped.

    Shape:
        - grey_a, grey_b: (B, 1, H, W)
        - lafs_a: (B, N, 2, 3)
        - mask: (B, N) bool
        - homographies: (B, 3, 3)
        - output: `PatchPairs` with M <= B * N pairs
    """
    if grey_a.ndim != 4 or grey_a.shape[1] != 1 or grey_a.shape != grey_b.shape:
        raise ValueError(
            f"grey_a and grey_b must both be (B, 1, H, W), got {tuple(grey_a.shape)}, {tuple(grey_b.shape)}"
        )
    batch, n_lafs = mask.shape
    if lafs_a.shape != (batch, n_lafs, 2, 3) or homographies.shape != (batch, 3, 3):
        raise ValueError(
            f"shapes disagree: lafs {tuple(lafs_a.shape)}, mask {tuple(mask.shape)}, H {tuple(homographies.shape)}"
        )
    height, width = grey_a.shape[-2:]
    lafs_b = perspective_transform_lafs(homographies.to(lafs_a), lafs_a)
    with torch.no_grad():
        keep = mask & laf_square_inside(lafs_a, height, width) & laf_square_inside(lafs_b, height, width)
        keep = keep & torch.isfinite(lafs_b).flatten(2).all(dim=-1)
    # Sample only the kept frames: zero the others so that the patch sampler reads finite grids.
    zero = torch.zeros((), dtype=lafs_a.dtype, device=lafs_a.device)
    patches_a = extract_patches_from_pyramid(grey_a, torch.where(keep[..., None, None], lafs_a, zero), patch_size)
    patches_b = extract_patches_from_pyramid(grey_b, torch.where(keep[..., None, None], lafs_b, zero), patch_size)
    with torch.no_grad():
        keep = keep & (patches_a.flatten(2).std(dim=-1) >= min_contrast)
    image_index = torch.arange(batch, device=mask.device)[:, None].expand(batch, n_lafs)[keep]
    centres = get_laf_center(lafs_a)[keep]
    return PatchPairs(
        anchors=patches_a[keep],
        positives=patches_b[keep],
        centres=centres,
        image_index=image_index,
        exclude=same_place_mask(centres.detach(), image_index, same_place_radius),
    )


# --------------------------------------------------------------------------------------------------
# Cross-domain pairs: the garment on the person <-> the same garment in the product photo
# --------------------------------------------------------------------------------------------------


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (x0, y0, x1, y1) in pixels of binary masks; an empty mask gives NaN.

    Shape:
        - masks: (B, 1, H, W) bool or 0/1
        - output: (B, 4) float32
    """
    on = masks[:, 0].bool()
    rows, cols = on.any(dim=2), on.any(dim=1)  # (B, H), (B, W)

    def first_last(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(flags.shape[1], device=flags.device, dtype=torch.float32)
        first = torch.where(flags, index, torch.inf).amin(dim=1)
        last = torch.where(flags, index, -torch.inf).amax(dim=1)
        return first, last

    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(on.flatten(1).any(dim=1, keepdim=True), boxes, torch.full_like(boxes, float("nan")))


def garment_patch_pairs(
    grey_product: torch.Tensor,
    product_mask: torch.Tensor,
    grey_person: torch.Tensor,
    garment_mask: torch.Tensor,
    pairs_per_image: int,
    generator: torch.Generator,
    scale_range: Tuple[float, float] = (0.06, 0.16),
    same_place_radius: Optional[float] = None,
    min_contrast: float = 0.01,
    candidates: int = 4,
) -> PatchPairs:
    """Patches of a product photo and of the same garment worn in a street photo, matched by position.

    There is no pixel-exact correspondence between a flat product and the garment on a body, so the two
    are matched coarsely: a position u in [0, 1]^2 of the product mask's bounding box corresponds to
    the position u of the garment mask's box in the person photo (collar to collar, hem to hem, the
    print in the middle to the print in the middle). Positions are drawn uniformly and kept where
    both masks are on; each patch's half side is the same fraction s of its own box (sqrt of the box
    area, s drawn from `scale_range`), upright. Training on these pairs teaches a patch descriptor the
    street-to-shop change (folds, light, pose, another camera) that homographies of the product
    photo alone never show, which is what retrieval asks of it.

    Args:
        grey_product, product_mask: the product photos and their garment masks (anchors).
        grey_person, garment_mask: the person photos and the worn garment's masks (positives).
        pairs_per_image: at most this many pairs per pair of photos.
        generator: CPU generator of the positions and scales.
        scale_range: range of s.
        same_place_radius: pairs of one photo closer than this (in box units) are not each other's
            negatives; None (default): no two pairs of one photo are. The correspondence is only
            coarse and a garment's print repeats, so a patch elsewhere on the same garment often looks
            like the positive: what retrieval needs is telling garments apart, and the negatives come
            from the other garments of the batch.
        min_contrast: product patches with a lower standard deviation are dropped.
        candidates: positions drawn per kept pair (most land outside one of the masks).

    Shape:
        - grey_*: (B, 1, H, W); masks: (B, 1, H, W) bool or 0/1, at the same H, W as their photos
        - output: `PatchPairs` with M <= B * pairs_per_image; centres are box coordinates u
    """
    batch = grey_product.shape[0]
    if grey_person.shape[0] != batch or product_mask.shape[0] != batch or garment_mask.shape[0] != batch:
        raise ValueError("garment_patch_pairs needs one person photo and two masks per product photo")
    device = grey_product.device
    n = int(pairs_per_image) * int(candidates)
    u = torch.rand(batch, n, 2, generator=generator).to(device)
    s = (scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand(batch, n, generator=generator)).to(device)

    def frames(grey: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        boxes = mask_boxes(mask).to(device)
        origin, extent = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2]).clamp_min(1.0)
        centres = origin + u * extent  # (B, n, 2) pixels
        radius = s * extent.prod(dim=-1).sqrt()  # (B, n)
        height, width = mask.shape[-2:]
        x = centres[..., 0].round().long().clamp(0, width - 1)
        y = centres[..., 1].round().long().clamp(0, height - 1)
        on = mask[:, 0].bool()[torch.arange(batch, device=device)[:, None], y, x] & torch.isfinite(radius)
        lafs = torch.zeros(batch, n, 2, 3, device=device, dtype=grey.dtype)
        lafs[..., 0, 0] = lafs[..., 1, 1] = torch.nan_to_num(radius, nan=1.0)
        lafs[..., :, 2] = torch.nan_to_num(centres, nan=0.0)
        return lafs, on & laf_square_inside(lafs, height, width)

    lafs_c, keep_c = frames(grey_product, product_mask)
    lafs_p, keep_p = frames(grey_person, garment_mask)
    keep = keep_c & keep_p
    # at most pairs_per_image per photo: a random subset of the valid candidates
    order = torch.rand(batch, n, generator=generator).to(device).masked_fill(~keep, 2.0).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    keep = keep & (rank < int(pairs_per_image))
    zero = torch.zeros((), dtype=grey_product.dtype, device=device)
    patches_c = extract_patches_from_pyramid(grey_product, torch.where(keep[..., None, None], lafs_c, zero), PATCH_SIZE)
    patches_p = extract_patches_from_pyramid(grey_person, torch.where(keep[..., None, None], lafs_p, zero), PATCH_SIZE)
    keep = keep & (patches_c.flatten(2).std(dim=-1) >= min_contrast)
    image_index = torch.arange(batch, device=device)[:, None].expand(batch, n)[keep]
    centres = u[keep]
    return PatchPairs(
        anchors=patches_c[keep],
        positives=patches_p[keep],
        centres=centres,
        image_index=image_index,
        exclude=same_place_mask(centres, image_index, math.inf if same_place_radius is None else same_place_radius),
    )


def load_garment_pair_batch(rows, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """Grey product and person photos of training pairs with their garment masks, resized to `size`.

    The product mask is the data set's mask (thresholded at 128, VITON's are JPEGs) or, without one,
    the product photo's non-white pixels; the worn garment's mask is the LIP labels 5, 6, 7 of the
    person's parse map. Rows without a parse map cannot be used: the caller filters them out.

    Args:
        rows: records with product_image, person_image, parse and mask (e.g. `dataset.train.itertuples()`).
        size: (H, W) of every output.

    Returns:
        {"product", "person"}: (B, 1, H, W) float grey in [0, 1]; {"product_mask", "garment_mask"}: (B, 1, H, W) bool.
    """
    from retrieval.batching import load_batch
    from retrieval.io import read_mask

    height, width = int(size[0]), int(size[1])

    def resized(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)

    products = load_batch([r.product_image for r in rows], size)
    persons = load_batch([r.person_image for r in rows], size)
    product_masks, garment_masks = [], []
    for row, product in zip(rows, products):
        mask_path = getattr(row, "mask", None)
        if isinstance(mask_path, (str, os.PathLike)) and str(mask_path):  # a missing mask reads as None or NaN
            mask = read_mask(mask_path)
            product_masks.append(resized((mask if mask.ndim == 2 else mask[..., 0]) >= 128))
        else:
            product_masks.append(((product < 0.94).any(dim=0)).numpy().astype(np.uint8))
        garment_masks.append(resized(np.isin(read_mask(row.parse), GARMENT_LABELS)))
    return {
        "product": rgb_to_grayscale(products),
        "person": rgb_to_grayscale(persons),
        "product_mask": torch.from_numpy(np.stack(product_masks))[:, None].bool(),
        "garment_mask": torch.from_numpy(np.stack(garment_masks))[:, None].bool(),
    }


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def descriptor_distances(desc_a: torch.Tensor, desc_b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Euclidean distance matrix, with a gradient that stays finite at distance 0.

    ``sqrt(|a|^2 + |b|^2 - 2 a.b + eps)``, HardNet's form: `torch.cdist`'s gradient is NaN for two
    identical rows, which happens with a random network on flat patches.

    Shape:
        - desc_a: (M, D)
        - desc_b: (K, D)
        - output: (M, K)
    """
    squared = (desc_a * desc_a).sum(1)[:, None] + (desc_b * desc_b).sum(1)[None, :] - 2.0 * desc_a @ desc_b.T
    return torch.sqrt(squared.clamp(min=0.0) + eps)


def hardest_in_batch_triplet_loss(
    distances: torch.Tensor, margin: float = 1.0, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """HardNet's loss from a distance matrix whose diagonal holds the matching pairs.

    For pair i, the positive distance is ``d[i, i]`` and the negative is the smallest distance from
    anchor i to another positive or from positive i to another anchor (``min(row, column)``
    excluding the diagonal and ``exclude``); the loss is ``mean_i max(0, margin + d[i, i] - neg_i)``.
    A pair without any allowed negative contributes 0.

    Args:
        distances: d[i, j] = distance(anchor_i, positive_j).
        margin: triplet margin.
        exclude: True where (i, j) must not serve as a negative (same physical point).

    Shape:
        - distances: (M, M)
        - exclude: (M, M) bool
        - output: scalar

    Example:
        >>> d = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.3, 1.4], [1.1, 0.6, 0.4]])
        >>> round(hardest_in_batch_triplet_loss(d).item(), 4)  # negatives 0.5, 0.6, 0.5
        0.7667
    """
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be a square (M, M) matrix, got {tuple(distances.shape)}")
    size = distances.shape[0]
    if size == 0:
        return distances.sum()
    blocked = torch.eye(size, dtype=torch.bool, device=distances.device)
    if exclude is not None:
        blocked = blocked | exclude.to(device=distances.device, dtype=torch.bool)
    negatives = distances.masked_fill(blocked, float("inf"))
    hardest = torch.minimum(negatives.min(dim=1).values, negatives.min(dim=0).values)
    return F.relu(margin + distances.diagonal() - hardest).mean()


def _check_matching_rows(desc_a: torch.Tensor, desc_b: torch.Tensor) -> None:
    if desc_a.shape != desc_b.shape or desc_a.ndim != 2:
        raise ValueError(
            f"desc_a and desc_b must be (M, D) of the same shape, got {tuple(desc_a.shape)}, {tuple(desc_b.shape)}"
        )


def hardnet_loss(
    desc_a: torch.Tensor, desc_b: torch.Tensor, margin: float = 1.0, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Hardest-in-batch triplet margin loss of matching descriptor rows (HardNet).

    Shape:
        - desc_a, desc_b: (M, D), row i of each describes the same point
        - exclude: (M, M) bool, optional
        - output: scalar
    """
    _check_matching_rows(desc_a, desc_b)
    return hardest_in_batch_triplet_loss(descriptor_distances(desc_a, desc_b), margin, exclude)


def info_nce_loss(
    desc_a: torch.Tensor, desc_b: torch.Tensor, temperature: float = 0.1, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Symmetric InfoNCE of matching unit-norm descriptor rows: each row must pick its partner among all.

    Softer than `hardnet_loss`: every negative weighs in by its similarity instead of only the hardest
    one, so coarse pairs (`garment_patch_pairs`, where the hardest negative is often a look-alike) still
    give a useful gradient. Excluded entries are left out of the softmax.

    Shape:
        - desc_a, desc_b: (M, D), row i of each describes the same point
        - exclude: (M, M) bool, optional
        - output: scalar
    """
    _check_matching_rows(desc_a, desc_b)
    logits = desc_a @ desc_b.t() / float(temperature)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    target = torch.arange(len(desc_a), device=desc_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_matching_metrics(
    desc_a: torch.Tensor, desc_b: torch.Tensor, exclude: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """How well descriptors tell matching patches from the others.

    - ``fpr95``: the share of non-matching pairs (i, j != i, not excluded) closer than the distance
      under which 95% of the matching pairs fall (Brown et al.'s FPR at 95% recall; lower is better).
    - ``matching_map``: for each anchor, rank every positive by distance; with one true match the
      average precision is 1 / its rank (excluded ones are not ranked); mean over anchors.
    - ``top1``: share of anchors whose nearest positive is their own.

    Shape:
        - desc_a, desc_b: (M, D), M >= 2
        - exclude: (M, M) bool, optional
    """
    size = desc_a.shape[0]
    if size < 2 or desc_b.shape != desc_a.shape:
        raise ValueError(
            f"need at least 2 matching rows of the same shape, got {tuple(desc_a.shape)}, {tuple(desc_b.shape)}"
        )
    distances = descriptor_distances(desc_a.double(), desc_b.double(), eps=0.0)
    eye = torch.eye(size, dtype=torch.bool)
    blocked = eye if exclude is None else eye | exclude.cpu().bool()
    positive = distances.diagonal()
    negatives = distances[~blocked]
    threshold = torch.quantile(positive, 0.95)
    ranks = 1 + (distances.masked_fill(blocked, float("inf")) < positive[:, None]).sum(dim=1)
    return {
        "fpr95": float((negatives <= threshold).double().mean()),
        "matching_map": float((1.0 / ranks.double()).mean()),
        "top1": float((ranks == 1).double().mean()),
        "pairs": int(size),
    }
