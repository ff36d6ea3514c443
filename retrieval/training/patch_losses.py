"""The loss terms of the learned patch descriptors' trainer (`retrieval.training.patch`).

Patch pairs through the network (`patch_pair_loss`: HardNet or InfoNCE, or InfoNCE of whole garments),
the end-to-end objective through a soft-assignment VLAD (`vlad_loss`, its `SoftVLADHead` and the head's
k-means start), and the homography loss of each model: `l2net_homography_loss` (HardNet at DoG
keypoints) and `lfnet_homography_loss` (LF-Net's score-map loss, built from `peak_target`,
`soft_refine` and `balanced_mse`, plus HardNet at refined KeyNet peaks).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from kornia.feature import laf_from_center_scale_ori
from kornia.filters import gaussian_blur2d, get_gaussian_kernel1d
from kornia.geometry.transform import warp_perspective
from torch import nn

from retrieval.aggregation import fit_codebook, soft_vlad
from retrieval.descriptors.learned_patch import LearnedPatchDescriptor
from retrieval.descriptors.lfnet import keynet_logits
from retrieval.garments import segmented_texture
from retrieval.patches import (
    hardnet_loss,
    homography_patch_pairs,
    info_nce_loss,
    load_garment_pair_batch,
)

if TYPE_CHECKING:  # the annotations only: the trainer imports this module, a runtime import would be circular
    from retrieval.training.patch import L2NetTrainConfig, LFNetTrainConfig

GARMENT_LOSSES = ("hardnet", "infonce", "image")
VLAD_ANCHORS = ("photo", "cutout", "both")


def choose_random_subset(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most `k` of the True entries of each row, chosen uniformly at random.

    Shape:
        - mask: (B, N) bool
        - output: (B, N) bool, each row a subset of the input row with min(k, row count) entries
    """
    if mask.shape[1] <= k:
        return mask.clone()
    keys = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(~mask, -1.0)
    chosen = torch.zeros_like(mask)
    chosen.scatter_(1, keys.topk(k, dim=1).indices, True)
    return chosen & mask


class SoftVLADHead(nn.Module):
    """Training-only NetVLAD layer: learnable centroids, a fixed assignment sharpness `alpha`.

    It exists only while training through the aggregation (``vlad_weight > 0``) and is checkpointed
    with the run; the descriptor's own codebook is refitted with hard k-means after training (`fit`).
    """

    def __init__(self, centroids: torch.Tensor, alpha: float):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @classmethod
    def from_descriptors(cls, desc: np.ndarray, n_clusters: int, seed: int) -> "SoftVLADHead":
        """k-means centroids of sampled descriptors; `alpha` makes the nearest centroid weigh 100 times
        the second nearest for the median descriptor (NetVLAD's initialisation, Sec. 3.1 of the paper).

        Shape:
            - desc: (M, D) unit rows, M >= n_clusters
        """
        centroids = torch.from_numpy(fit_codebook(desc, n_clusters, seed=seed))
        squared = torch.cdist(torch.from_numpy(np.ascontiguousarray(desc, np.float32)), centroids) ** 2
        nearest_two = squared.topk(2, dim=1, largest=False).values
        gap = float((nearest_two[:, 1] - nearest_two[:, 0]).median().clamp(min=1e-4))
        return cls(centroids, math.log(100.0) / gap)

    def forward(self, desc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_vlad(desc, mask, self.centroids, self.alpha)


# ---- losses ------------------------------------------------------------------------------------
def patch_pair_loss(
    model: LearnedPatchDescriptor, pairs, config: L2NetTrainConfig, kind: str = "hardnet"
) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """Loss of a `PatchPairs` batch (kind: one of GARMENT_LOSSES, see the config); None below 2 pairs."""
    if kind not in GARMENT_LOSSES:
        raise ValueError(f"garment_loss must be one of {GARMENT_LOSSES}, got {kind!r}")
    n_pairs = len(pairs.anchors)
    if n_pairs < 2 or (kind == "image" and len(pairs.image_index.unique()) < 2):
        return None, {"pairs": float(n_pairs)}
    # One forward pass for both views: one set of BatchNorm statistics, one large GEMM per layer.
    desc = model._net(torch.cat([pairs.anchors, pairs.positives]))
    if kind == "image":
        images, which = pairs.image_index.unique(return_inverse=True)
        pooled = [
            F.normalize(desc.new_zeros(len(images), desc.shape[1]).index_add_(0, which, half), dim=1)
            for half in (desc[:n_pairs], desc[n_pairs:])
        ]
        loss = info_nce_loss(pooled[0], pooled[1], float(config.garment_temperature))
    elif kind == "infonce":
        loss = info_nce_loss(desc[:n_pairs], desc[n_pairs:], float(config.garment_temperature), pairs.exclude)
    else:
        loss = hardnet_loss(desc[:n_pairs], desc[n_pairs:], float(config.margin), pairs.exclude)
    return loss, {"desc_loss": float(loss.detach()), "pairs": float(n_pairs)}


def vlad_anchor_images(worn: Dict[str, torch.Tensor], generator: torch.Generator, which: str) -> torch.Tensor:
    """The street side of each pair: the raw photo, its garment cut out on white (what the hp proxy
    serves, here from the ground-truth parse), or a seeded coin flip between the two per pair.

    Shape:
        - worn["person"], worn["garment_mask"]: (B, 1, H, W)
        - output: (B, 1, H, W) grey in [0, 1]
    """
    photos = worn["person"]
    if which == "photo":
        return photos
    size = tuple(photos.shape[-2:])
    cutouts = segmented_texture(photos.expand(-1, 3, -1, -1), worn["garment_mask"].to(photos.dtype), size=size)[:, :1]
    if which == "cutout":
        return cutouts
    flips = (torch.rand(len(photos), generator=generator) < 0.5).to(photos.device)
    return torch.where(flips[:, None, None, None], cutouts, photos)


def keypoint_subset(
    model: LearnedPatchDescriptor, grey: torch.Tensor, k: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The test-time detector's frames on `grey`, at most `k` per image (seeded random subset)."""
    with torch.no_grad():
        lafs, _, mask = model.detect(grey.expand(-1, 3, -1, -1), grey)
    return lafs, choose_random_subset(mask, k, generator)


def vlad_loss(
    model: LearnedPatchDescriptor,
    worn: Dict[str, torch.Tensor],
    head: SoftVLADHead,
    generator: torch.Generator,
    config: L2NetTrainConfig,
) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """InfoNCE between the soft VLADs of the street side and of the products of a batch of pairs.

    Patches come from the test-time detector on whole images (background, face and all, as at
    query time), a random ``vlad_keypoints`` of each image's; both sides go through the network
    in one pass. None below two pairs.
    """
    anchors = vlad_anchor_images(worn, generator, str(config.vlad_anchors))
    n_pairs = len(anchors)
    if n_pairs < 2:
        return None, {}
    grey = torch.cat([anchors, worn["product"]])
    lafs, mask = keypoint_subset(model, grey, int(config.vlad_keypoints), generator)
    desc, mask = model.describe(grey, lafs, mask)
    vectors = head(desc, mask)
    loss = info_nce_loss(vectors[:n_pairs], vectors[n_pairs:], float(config.vlad_temperature))
    with torch.no_grad():
        similarity = vectors[:n_pairs] @ vectors[n_pairs:].T
        top1 = float((similarity.argmax(dim=1) == torch.arange(n_pairs, device=similarity.device)).float().mean())
    return loss, {"vlad_loss": float(loss.detach()), "vlad_top1": top1, "vlad_patches": float(mask.sum())}


@torch.no_grad()
def initial_vlad_head(
    model: LearnedPatchDescriptor, rows, size: Tuple[int, int], config: L2NetTrainConfig, seed: int
) -> SoftVLADHead:
    """A `SoftVLADHead` seeded by k-means of the current network's descriptors on the first
    ``vlad_init_images`` training pairs (street photos and products alike)."""
    was_training = model.training
    model.eval()
    rows = list(rows)[: max(1, int(config.vlad_init_images))]
    sampled = []
    for start in range(0, len(rows), 16):
        worn = load_garment_pair_batch(rows[start : start + 16], size)
        for grey in (worn["person"], worn["product"]):
            grey = grey.to(model.device)
            lafs, mask = keypoint_subset(
                model, grey, int(model.conf["max_keypoints"]), torch.Generator().manual_seed(seed)
            )
            desc, mask = model.describe(grey, lafs, mask)
            sampled.append(desc[mask].float().cpu().numpy())
    model.train(was_training)
    desc = np.concatenate(sampled)
    n_clusters = int(model.conf["n_clusters"])
    if len(desc) < n_clusters:
        raise ValueError(
            f"vlad_weight > 0: the first {len(rows)} training pairs gave {len(desc)} descriptors, fewer "
            f"than n_clusters={n_clusters}: raise vlad_init_images"
        )
    return SoftVLADHead.from_descriptors(desc, n_clusters, seed).to(model.device)


def l2net_homography_loss(model, grey_a, grey_b, homographies, generator, config: L2NetTrainConfig):
    """HardNet loss on patches at DoG keypoints of A and their homography images in B.

    The training frames come from the same detector as at test time (a random subset of
    ``pairs_per_image`` per image), so the network learns the patches it will see.
    """
    with torch.no_grad():
        images_a = grey_a.expand(-1, 3, -1, -1)
        lafs, _, mask = model.detect(images_a, grey_a)
        mask = choose_random_subset(mask, int(config.pairs_per_image), generator)
    pairs = homography_patch_pairs(
        grey_a, grey_b, lafs, mask, homographies, min_contrast=float(model.conf["min_patch_contrast"])
    )
    return patch_pair_loss(model, pairs, config)


# ---- LF-Net's detector training --------------------------------------------------------------
def top_peaks(
    scores: torch.Tensor, valid: torch.Tensor, k: int, nms_size: int, generator: torch.Generator, min_score: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `k` strongest local maxima (over an ``nms_size`` window) above `min_score` inside `valid`.

    Ties (flat regions) are broken by a tiny seeded noise so that a plateau yields one peak, not all.

    Returns:
        (flat pixel indices (B, k), found (B, k) bool): ``found`` is False for slots beyond the
        number of maxima an image has.

    Shape:
        - scores: (B, 1, H, W); valid: (B, 1, H, W) bool
    """
    noise = torch.rand(scores.shape, generator=generator).to(scores)
    jittered = scores.detach() + 1e-4 * noise
    is_peak = (
        (jittered == F.max_pool2d(jittered, nms_size, stride=1, padding=nms_size // 2)) & valid & (scores > min_score)
    )
    keys = jittered.masked_fill(~is_peak, -math.inf).flatten(1)
    values, indices = keys.topk(min(k, keys.shape[1]), dim=1)
    return indices, torch.isfinite(values)


def peak_target(
    scores: torch.Tensor, valid: torch.Tensor, k: int, nms_size: int, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """LF-Net's clean target ``g(S)``: top-k non-maxima-suppressed peaks, Gaussian-blurred, peaks = 1.

    Shape:
        - scores: (B, 1, H, W) (already warped into the other view); valid: (B, 1, H, W) bool
        - output: (B, 1, H, W) in [0, 1]
    """
    indices, found = top_peaks(scores, valid, k, nms_size, generator)
    impulses = torch.zeros_like(scores).flatten(1)
    impulses.scatter_(1, indices, found.to(scores.dtype))
    side = 2 * max(1, int(math.ceil(3 * sigma))) + 1
    blurred = gaussian_blur2d(impulses.view_as(scores), (side, side), (sigma, sigma))
    # The separable kernel's peak is the square of the 1-D kernel's: divide so that a peak is 1.
    peak = get_gaussian_kernel1d(side, sigma, dtype=scores.dtype, device=scores.device).max() ** 2
    return (blurred / peak).clamp(max=1.0)


def soft_refine(logits: torch.Tensor, indices: torch.Tensor, window: int = 5, temperature: float = 1.0) -> torch.Tensor:
    """Sub-pixel keypoints by a soft-argmax of the logits in a window around integer peaks (LF-Net).

    Differentiable in `logits`: a loss on the returned positions moves the score map.

    Shape:
        - logits: (B, 1, H, W)
        - indices: (B, K) flat pixel indices
        - output: (B, K, 2) xy in pixels
    """
    batch, _, height, width = logits.shape
    radius = window // 2
    offsets = torch.arange(-radius, radius + 1, device=logits.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    dx, dy = dx.reshape(-1), dy.reshape(-1)  # (window^2,)
    x = (indices % width)[..., None] + dx
    y = (indices // width)[..., None] + dy
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    flat = (y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).flatten(1)
    local = logits.flatten(1).gather(1, flat).view(batch, -1, window * window)
    weights = torch.softmax((local / temperature).masked_fill(~inside, -math.inf), dim=-1)
    centre = torch.stack([indices % width, indices // width], dim=-1).to(logits.dtype)
    shift = torch.stack([weights @ dx.to(logits.dtype), weights @ dy.to(logits.dtype)], dim=-1)
    return centre + shift


def balanced_mse(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared error averaged separately over the peaks and the background of a soft target, summed.

    Pixel p counts ``target[p]`` towards the peak mean and ``1 - target[p]`` towards the background
    mean, over `valid` pixels. LF-Net's plain MSE does not transfer as is: its peaks here cover about
    1% of the map, and a plain mean is minimised by a nearly all-zero score map, whose logits are
    then nearly constant, with peaks too weak to survive as the detector's strongest maxima.

    Shape:
        - prediction, target: (*) with target in [0, 1]
        - valid: (*) bool
        - output: scalar

    Example:
        >>> balanced_mse(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.5, 0.0, 0.0]), torch.ones(3, dtype=torch.bool))
        tensor(0.7000)
    """
    error = (prediction - target) ** 2
    weight = valid.to(prediction.dtype)
    peak, background = target * weight, (1.0 - target) * weight
    return (error * peak).sum() / peak.sum().clamp(min=1e-6) + (error * background).sum() / background.sum().clamp(
        min=1e-6
    )


def _visible_region(homographies: torch.Tensor, like: torch.Tensor, border: int) -> torch.Tensor:
    """Pixels of the output view that see the source image, at least `border` pixels inside it.

    Shape:
        - homographies: (B, 3, 3) source -> output
        - like: (B, 1, H, W), gives size, dtype and device
        - output: (B, 1, H, W) bool
    """
    height, width = like.shape[-2:]
    ones = torch.ones_like(like)
    if border > 0:
        ones = F.pad(ones[..., border:-border, border:-border], (border,) * 4)
    warped = warp_perspective(ones, homographies.to(like), (height, width), padding_mode="zeros", align_corners=True)
    return warped > 0.999


def lfnet_homography_loss(model, grey_a, grey_b, homographies, generator, config: LFNetTrainConfig):
    """LF-Net's image-level loss (both directions) + HardNet loss at refined peaks of A."""
    keynet = model.keynet
    inverse = torch.linalg.inv(homographies)
    logits_a, logits_b = keynet_logits(keynet, torch.cat([grey_a, grey_b])).chunk(2)
    score_a, score_b = torch.sigmoid(logits_a), torch.sigmoid(logits_b)
    seen_in_b = _visible_region(homographies, grey_a, border=2)  # B pixels that see A
    seen_in_a = _visible_region(inverse, grey_a, border=2)  # A pixels that B sees
    peaks, nms, sigma = int(config.peaks_per_image), int(model.conf["nms_size"]), float(config.target_sigma)
    with torch.no_grad():
        height, width = grey_a.shape[-2:]
        warp = lambda s, h: warp_perspective(s, h, (height, width), padding_mode="zeros", align_corners=True)  # noqa: E731
        target_b = peak_target(warp(score_a, homographies), seen_in_b, peaks, nms, sigma, generator)
        target_a = peak_target(warp(score_b, inverse), seen_in_a, peaks, nms, sigma, generator)
    image_loss = balanced_mse(score_b, target_b, seen_in_b) + balanced_mse(score_a, target_a, seen_in_a)

    # Keypoints of A whose whole patch both views see; the soft-argmax links their positions to
    # the score map.
    margin = int(math.ceil(float(model.conf["s_mult"]) * math.sqrt(2.0)))
    inner = _visible_region(inverse, grey_a, border=margin)
    inner[..., :margin, :] = inner[..., -margin:, :] = False
    inner[..., :, :margin] = inner[..., :, -margin:] = False
    indices, found = top_peaks(score_a, inner, int(config.pairs_per_image), nms, generator)
    centres = soft_refine(logits_a, indices, int(config.refine_window))
    scale = torch.full((*indices.shape, 1, 1), float(model.conf["s_mult"]), dtype=grey_a.dtype, device=grey_a.device)
    lafs = laf_from_center_scale_ori(centres, scale, torch.zeros_like(scale[..., 0]))
    pairs = homography_patch_pairs(
        grey_a, grey_b, lafs, found, homographies, min_contrast=float(model.conf["min_patch_contrast"])
    )
    desc_loss, logs = patch_pair_loss(model, pairs, config)
    weight = float(config.image_loss_weight)
    loss = weight * image_loss if desc_loss is None else desc_loss + weight * image_loss
    logs["image_loss"] = float(image_loss.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs
