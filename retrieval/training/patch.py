"""Training of the learned patch descriptors `l2net` and `lfnet` (`retrieval.descriptors.learned_patch`).

Three objectives, each with its weight (`L2NetTrainConfig`):

- ``homography_weight`` (default 1): a homography loss on product photos and random homographies of them
  (with a photometric change), patch to patch: `l2net_homography_loss` (HardNet loss at DoG keypoints)
  or `lfnet_homography_loss` (LF-Net's score-map loss + HardNet loss at refined KeyNet peaks);
- ``garment_pairs_weight``: product patches against the garment worn in the pair's street photo
  (`retrieval.patches.garment_patch_pairs`, form ``garment_loss``);
- ``vlad_weight``: end to end through a soft-assignment VLAD of whole images, street side against
  product (`vlad_loss`), the aggregate the engine searches with.

One registered trainer, `train_patch_descriptor`, runs both; lfnet adds its KeyNet to the trained modules,
its own homography loss (`MODEL_TRAINING`) and its options (`LFNetTrainConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.feature import laf_from_center_scale_ori
from kornia.filters import gaussian_blur2d, get_gaussian_kernel1d
from kornia.geometry.transform import warp_perspective
from torch import nn

from retrieval.aggregation import fit_codebook, soft_vlad
from retrieval.batching import load_batch, sample_paths
from retrieval.descriptors.learned_patch import FIT_STATE_PREFIXES, LearnedPatchDescriptor
from retrieval.descriptors.lfnet import keynet_logits
from retrieval.garments import segmented_texture
from retrieval.patches import (
    garment_patch_pairs,
    hardnet_loss,
    homography_patch_pairs,
    info_nce_loss,
    load_garment_pair_batch,
    photometric_jitter,
    random_homographies,
    warp_images,
)
from retrieval.training.run import TrainingRun
from retrieval.training.trainers import register_trainer

GARMENT_LOSSES = ("hardnet", "infonce", "image")
VLAD_ANCHORS = ("photo", "cutout", "both")


@dataclass(frozen=True)
class L2NetTrainConfig:
    """Training options of `l2net` (not part of the model's conf or fingerprint); CLI flags override.

    On the project's 2-core CPU a step of 8 photos (~150 pairs, 300 patches through the network forward
    and backward, in bfloat16) took 1.3 s with another job running, so the default two epochs over
    VITON's 3,639 training photos (910 steps) take about 20 minutes.
    """

    epochs: int = 2
    batch_size: int = 8
    pairs_per_image: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    margin: float = 1.0
    max_images: Optional[int] = 4000
    # Cross-domain pairs (`retrieval.patches.garment_patch_pairs`): each step also matches patches of
    # the product photos with the garment worn in their street photos; that loss (`garment_loss`) is
    # added with this weight (0: homographies of product photos only). On by default: trained on
    # homographies alone the network matches patches far better (held-out FPR95 0.070 -> 0.0004)
    # yet retrieves worse than untrained (300-product val subset, raw VLAD, mAP@20 none/hp
    # 0.198/0.230 against 0.201/0.299); with these defaults it retrieves better (full val split,
    # 0.157/0.191 against 0.120/0.180) and matches patches as the untrained one does (FPR95 0.066).
    garment_pairs_weight: float = 1.0
    garment_pairs_per_image: int = 24
    # "hardnet"/"infonce": patch to patch at the same box position; "image": the worn garment's patches,
    # averaged, against the product's, averaged (InfoNCE over the batch's garments; no positions needed)
    garment_loss: str = "infonce"
    garment_temperature: float = 0.1
    # Weight of the homography patch loss; 0 leaves it out (and its cost).
    homography_weight: float = 1.0
    # End to end through the aggregation (`vlad_loss`): the street photo's soft-assignment VLAD must pick
    # its own product's VLAD among the batch's products (InfoNCE), the objective retrieval is scored on.
    vlad_weight: float = 0.0
    vlad_keypoints: int = 64  # random subset of each image's keypoints per step (cost is linear in it)
    vlad_anchors: str = "both"  # street side: "photo" (raw), "cutout" (garment on white, as hp), "both" (coin flip)
    vlad_temperature: float = 0.1
    vlad_init_images: int = 64  # training photos whose descriptors seed the codebook (k-means)
    # Forward and backward in bfloat16 (torch.autocast): about 2x faster on CPUs with AVX512-BF16 or AMX
    # (1.24 s against 2.34 s for 1,024 patches here), and on GPUs; the aggregation and losses stay float32.
    bfloat16: bool = True
    checkpoint_every_s: float = 120.0  # how often last.pt is written (not in the run's config)


@dataclass(frozen=True)
class LFNetTrainConfig(L2NetTrainConfig):
    """`l2net`'s options with other defaults, plus LF-Net's detector training.

    KeyNet's forward and backward over both full views of 4 photos cost about as much as the patch
    network on their ~120 homography and ~85 garment pairs: a step took 1.75 s on the project's
    2-core CPU (bfloat16, another job running), so the default epoch over 640 photos (160 steps)
    takes about 5 minutes.
    """

    epochs: int = 1
    batch_size: int = 4
    pairs_per_image: int = 32
    max_images: Optional[int] = 640
    peaks_per_image: int = 64  # keypoints of LF-Net's clean target map g(w(S)) per view
    target_sigma: float = 1.0
    refine_window: int = 5
    image_loss_weight: float = 1.0


# A homography loss: (model, grey_a, grey_b, homographies, generator, config) -> (loss or None, logs).
HomographyLoss = Callable[..., Tuple[Optional[torch.Tensor], Dict[str, float]]]


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


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, step): a resumed run draws the same homographies."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


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


# ---- the loop ----------------------------------------------------------------------------------
def step_terms(
    model: LearnedPatchDescriptor,
    batch,
    worn_pairs: bool,
    head: Optional[SoftVLADHead],
    generator: torch.Generator,
    config: L2NetTrainConfig,
    homography_loss: HomographyLoss,
) -> Tuple[list, Dict[str, float]]:
    """The weighted loss terms of one training step, [(weight, loss or None)], and what to log.

    `batch` holds training-pair rows when the garment or VLAD objectives need the street photos
    (`worn_pairs`), else product photo paths.
    """
    size, device = tuple(model.conf["image_size"]), model.device
    terms, logs = [], {}
    if worn_pairs:
        worn = {k: v.to(device) for k, v in load_garment_pair_batch(batch, size).items()}
        grey_a = worn["product"]
    else:
        grey_a = rgb_to_grayscale(load_batch(batch, size)).to(device)
    if float(config.homography_weight) > 0:
        homographies = random_homographies(len(batch), size[0], size[1], generator).to(device)
        grey_b = photometric_jitter(warp_images(grey_a, homographies), generator)
        loss, logs = homography_loss(model, grey_a, grey_b, homographies, generator, config)
        terms.append((float(config.homography_weight), loss))
    if float(config.garment_pairs_weight) > 0:
        pairs = garment_patch_pairs(
            worn["product"],
            worn["product_mask"],
            worn["person"],
            worn["garment_mask"],
            int(config.garment_pairs_per_image),
            generator,
            min_contrast=float(model.conf["min_patch_contrast"]),
        )
        worn_loss, worn_logs = patch_pair_loss(model, pairs, config, config.garment_loss)
        logs.update({f"garment_{k}": v for k, v in worn_logs.items()})
        terms.append((float(config.garment_pairs_weight), worn_loss))
    if float(config.vlad_weight) > 0:
        aggregate_loss, aggregate_logs = vlad_loss(model, worn, head, generator, config)
        logs.update(aggregate_logs)
        terms.append((float(config.vlad_weight), aggregate_loss))
    return terms, logs


# What each model trains beside the shared objectives: the modules it optimises (checkpoint names, attributes
# of the model) and its homography loss. lfnet adds its KeyNet and LF-Net's score-map loss.
MODEL_TRAINING: Dict[str, Tuple[Tuple[str, ...], HomographyLoss]] = {
    "l2net": (("net",), l2net_homography_loss),
    "lfnet": (("net", "keynet"), lfnet_homography_loss),
}


@register_trainer("l2net", config=L2NetTrainConfig)
@register_trainer("lfnet", config=LFNetTrainConfig)
def train_patch_descriptor(
    model: LearnedPatchDescriptor,
    dataset,
    out_dir: Path,
    config: L2NetTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    time_budget_s: Optional[float] = None,
) -> Path:
    """Train a learned patch descriptor's networks (`MODEL_TRAINING`) with the three objectives; return final.pt.

    Each step reads ``batch_size`` training pairs (grey, ``image_size``) and optimises the weighted
    sum (Adam). An epoch is one pass over at most ``max_images`` pairs in a seeded order; every random
    draw comes from (seed, epoch, step), so a resumed run repeats exactly what it would have done.
    Writes ``out_dir``/{last.pt, final.pt, losses.csv, losses.png, config.json} via `TrainingRun`.
    The codebook and whitening are not learned here: `fit` after training (the engine does).

    Args:
        dataset: a RetrievalSet with training pairs (and parse maps for the garment and VLAD objectives).
        out_dir: run directory (resumes from its last.pt).
        config: `L2NetTrainConfig`, or `LFNetTrainConfig` for lfnet.
    """
    module_names, homography_loss = MODEL_TRAINING[model.name]
    if dataset.train is None or dataset.train.empty:
        raise ValueError(f"{dataset.name} has no training pairs to train {model.name} on")
    homography_weight = float(config.homography_weight)
    garment_weight = float(config.garment_pairs_weight)
    vlad_weight = float(config.vlad_weight)
    if config.garment_loss not in GARMENT_LOSSES:
        raise ValueError(f"garment_loss must be one of {GARMENT_LOSSES}, got {config.garment_loss!r}")
    if config.vlad_anchors not in VLAD_ANCHORS:
        raise ValueError(f"vlad_anchors must be one of {VLAD_ANCHORS}, got {config.vlad_anchors!r}")
    if max(homography_weight, garment_weight, vlad_weight) <= 0:
        raise ValueError("nothing to train: homography_weight, garment_pairs_weight and vlad_weight are all 0")
    worn_pairs = garment_weight > 0 or vlad_weight > 0
    rows_by_product: Dict[str, Any] = {}
    if worn_pairs:
        usable = dataset.train.dropna(subset=["parse"]) if "parse" in dataset.train else dataset.train.iloc[:0]
        if usable.empty:
            raise ValueError(
                f"garment_pairs_weight > 0 and vlad_weight > 0 need person parse maps, and {dataset.name}'s "
                "training pairs have none: train with both at 0 (homographies only)"
            )
        rows_by_product = {str(r.product_image): r for r in usable.itertuples(index=False)}
        paths = sorted(rows_by_product)
    else:
        paths = sorted(dict.fromkeys(str(p) for p in dataset.train["product_image"]))
    if config.max_images is not None:
        paths = sample_paths(paths, int(config.max_images), seed)
    steps_per_epoch = -(-len(paths) // int(config.batch_size))
    size = tuple(model.conf["image_size"])

    modules = {name: getattr(model, name) for name in module_names}
    if vlad_weight > 0:
        # Seeded from the first pairs of the training order; a resumed run overwrites it from last.pt.
        init_rows = [rows_by_product[paths[i]] for i in np.random.default_rng([seed, 0]).permutation(len(paths))]
        modules["vlad_head"] = initial_vlad_head(model, init_rows, size, config, seed)
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=float(config.lr), weight_decay=float(config.weight_decay))
    # The run's config (a resume must match it) holds the options, as it always has, but not how often it checkpoints.
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every_s"}
    run = TrainingRun(
        out_dir,
        modules,
        {"adam": optimizer},
        config={"descriptor": model.name, "conf": model.config(), "n_images": len(paths), **settings},
        seed=seed,
        time_budget_s=time_budget_s,
        checkpoint_every_s=float(config.checkpoint_every_s),
        progress=f"train {model.name}" if progress else None,
        steps_per_epoch=steps_per_epoch,
    )
    model._bfloat16_training = bool(config.bfloat16)
    try:
        _train_epochs(model, run, paths, rows_by_product, worn_pairs, modules, optimizer, config, seed, homography_loss)
    finally:
        model._bfloat16_training = False
    model.eval()
    # Whatever codebook this instance held describes the old network: it must be fitted again.
    model._fitted.fill_(False)
    # final.pt holds no fit state: the codebook and whitening are fitted afterwards, with any
    # n_clusters / pca_dim.
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(FIT_STATE_PREFIXES)}
    return run.finish(weights=weights, extra={"descriptor": model.name})


def _train_epochs(
    model, run, paths, rows_by_product, worn_pairs, modules, optimizer, config, seed, homography_loss
) -> None:
    """`train_patch_descriptor`'s loop: seeded epochs of ``batch_size`` pairs, resumable step by step."""
    batch_size = int(config.batch_size)
    for epoch in run.epochs(int(config.epochs)):
        order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        chunks = [[paths[i] for i in order[start : start + batch_size]] for start in range(0, len(paths), batch_size)]
        for step, chunk in run.skip_done(enumerate(chunks)):
            generator = step_generator(seed, epoch, step)
            for module in modules.values():
                module.train()
            batch = [rows_by_product[p] for p in chunk] if worn_pairs else chunk
            head = modules.get("vlad_head")
            terms, logs = step_terms(model, batch, worn_pairs, head, generator, config, homography_loss)
            terms = [weight * term for weight, term in terms if term is not None]
            if terms:
                optimizer.zero_grad(set_to_none=True)
                torch.stack(terms).sum().backward()
                optimizer.step()
            run.log(logs)
            if run.out_of_time:
                return
