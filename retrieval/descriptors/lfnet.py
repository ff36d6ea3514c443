"""LF-Net-style local features: KeyNet detector + HardNet descriptor trained jointly on homographies.

LF-Net (Ono, Trulls, Fua & Yi, "LF-Net: Learning Local Features from Images", NeurIPS 2018) is not
in kornia, and nothing here downloads weights, so this is the closest maintained equivalent whose
architecture kornia provides, trained in this project the way LF-Net trains:

- Detector: kornia's `KeyNet` response network (hand-crafted derivative filters + three learned
  5x5 convolutions, over a 3-level internal pyramid), built with ``pretrained=False``, inside
  kornia's `MultiResolutionDetector` (the base of `KeyNetDetector`: image pyramid, non-maxima
  suppression, top-k -> local affine frames). The response it reads is ``sigmoid`` of KeyNet's
  pre-ReLU output (`KeyNetScore`), the very map the training shapes; `KeyNetDetector` reads its ReLU,
  which is zero everywhere (no keypoints at all) whenever the logits are negative, as they are for
  a random KeyNet on many images and early in training.
- Orientation: kornia's `LAFOrienter` with its dominant-gradient histogram (no weights), or upright.
- Descriptor: kornia's `HardNet(pretrained=False)` (the L2-Net architecture) on 32x32 patches, the
  network `l2net` uses.
- Training (`_training_loss`), on a product photo A and its random homography B (`retrieval.patches`):
  (1) LF-Net's image-level loss: each view's score map must reproduce the other view's score map
  warped by the known homography, made sparse by non-maxima suppression and top-k, and blurred by a
  Gaussian (a clean keypoint target, LF-Net's ``g(w(S))``), as an MSE whose peak and background
  pixels are averaged separately (`balanced_mse`), in both directions;
  (2) the HardNet hardest-in-batch triplet loss on patches at the top-k score peaks of A and at their
  homography images in B, where the peaks are refined by a soft-argmax over a small window of the
  score map, so that, as in LF-Net, the descriptor loss also moves the detector towards distinctive
  places. LF-Net's learned scale and orientation estimation is replaced by KeyNet's scale pyramid and
  the dominant-gradient orientation.

By default each step also adds `l2net`'s InfoNCE loss on product <-> worn-garment patch pairs
(`garment_pairs_weight`). The descriptors are VLAD-aggregated like `sift` (through
`LearnedPatchDescriptor`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from kornia.feature import (
    KeyNet,
    LAFOrienter,
    MultiResolutionDetector,
    PassLAF,
    laf_from_center_scale_ori,
    laf_is_filled,
)
from kornia.filters import gaussian_blur2d, get_gaussian_kernel1d
from kornia.geometry.transform import pyrdown, warp_perspective
from torch import nn

from retrieval.descriptors.base import DESCRIPTORS
from retrieval.descriptors.l2net import PATCH_DESCRIPTOR_CONF, LearnedPatchDescriptor, seeded
from retrieval.patches import homography_patch_pairs


def keynet_logits(keynet: KeyNet, grey: torch.Tensor) -> torch.Tensor:
    """KeyNet's response before its final ReLU (``KeyNet(grey) == relu(keynet_logits(...))``).

    Training and detection read ``sigmoid(logits)`` (`KeyNetScore`): a ReLU map is flat zero
    wherever the logits are negative, where it has neither maxima nor gradient.

    Shape:
        - grey: (B, 1, H, W)
        - output: (B, 1, H, W)
    """
    height, width = grey.shape[-2:]
    features = [keynet.feature_extractor(grey)]
    level = grey
    for _ in range(1, keynet.num_levels):
        level = pyrdown(level, factor=1.2)
        coarse = keynet.feature_extractor(level)
        features.append(F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False))
    return keynet.last_conv[0](torch.cat(features, 1))


class KeyNetScore(nn.Module):
    """``sigmoid(keynet_logits(keynet, grey))``: the score map the detector reads and training shapes.

    Shape:
        - Input: (B, 1, H, W)
        - Output: (B, 1, H, W) in (0, 1)
    """

    def __init__(self, keynet: KeyNet):
        super().__init__()
        self.keynet = keynet

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(keynet_logits(self.keynet, grey))


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


@DESCRIPTORS.register("lfnet")
class LFNet(LearnedPatchDescriptor):
    """LF-Net-style: KeyNet detector + HardNet descriptor trained jointly on homographies.

    LF-Net itself is not in kornia; this is kornia's KeyNet in its `MultiResolutionDetector`
    (random init, trained here) with kornia's `HardNet` patch network (the L2-Net architecture),
    trained together with LF-Net's
    image-level score-map loss and a hardest-in-batch triplet loss at soft-argmax-refined peaks (see
    the module docstring), plus the garment-pair loss of `l2net`. Descriptors are VLAD-aggregated like `sift`.

    Config (``default_conf``), beyond the shared ones (image_size, max_keypoints, upright,
    n_clusters, pca_dim, fit_descriptors_per_image, max_fit_descriptors, kmeans_iterations,
    describe_chunk, min_patch_contrast, seed):
        num_filters, num_levels, kernel_size: KeyNet's architecture (kornia's defaults 8, 3, 5).
        nms_size: non-maxima suppression window of the detector, at every pyramid level.
        pyramid_levels, up_levels, scale_factor_levels: the detection pyramid. kornia's 4, 1, sqrt 2 run
            KeyNet on about 4x the image's pixels; 3 coarser levels and no upsampled one (1.9x) halve
            the detection time, and an upsampled 256x192 photo has little more to find.
        s_mult: half side of the described patch at the finest level, in pixels, scaled with the level
            (kornia's 22 is for megapixel photos; 16 gives a 32 px patch at 256x192).

    Example:
        >>> lfnet = LFNet(n_clusters=8, pca_dim=None)
        >>> lfnet.dim
        1024
    """

    default_conf: Dict[str, Any] = {
        **PATCH_DESCRIPTOR_CONF,
        "num_filters": 8,
        "num_levels": 3,
        "kernel_size": 5,
        "nms_size": 15,
        "pyramid_levels": 3,
        "up_levels": 0,
        "scale_factor_levels": math.sqrt(2.0),
        "s_mult": 16.0,
    }
    train_defaults: Dict[str, Any] = {
        **LearnedPatchDescriptor.train_defaults,
        # KeyNet's forward and backward over both full views of 4 photos cost about as much as the patch
        # network on their ~120 homography and ~85 garment pairs: a step took 1.75 s on the project's
        # 2-core CPU (bfloat16, another job running), so the default epoch over 640 photos (160 steps)
        # takes about 5 minutes.
        "epochs": 1,
        "batch_size": 4,
        "pairs_per_image": 32,
        "max_images": 640,
        "peaks_per_image": 64,  # keypoints of LF-Net's clean target map g(w(S)) per view
        "target_sigma": 1.0,
        "refine_window": 5,
        "image_loss_weight": 1.0,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        keynet_conf = {
            "num_filters": int(self.conf["num_filters"]),
            "num_levels": int(self.conf["num_levels"]),
            "kernel_size": int(self.conf["kernel_size"]),
            "Detector_conf": {
                "nms_size": int(self.conf["nms_size"]),
                "pyramid_levels": int(self.conf["pyramid_levels"]),
                "up_levels": int(self.conf["up_levels"]),
                "scale_factor_levels": float(self.conf["scale_factor_levels"]),
                "s_mult": float(self.conf["s_mult"]),
            },
        }
        orienter = PassLAF() if self.conf["upright"] else LAFOrienter(patch_size=32, num_angular_bins=36)
        # pretrained=False: random KeyNet weights (kornia's init), no download.
        with seeded(int(self.conf["seed"]) + 1):
            keynet = KeyNet(pretrained=False, keynet_conf=keynet_conf)
        self.detector = MultiResolutionDetector(
            KeyNetScore(keynet), int(self.conf["max_keypoints"]), keynet_conf["Detector_conf"], ori_module=orienter
        )
        self.eval()

    @property
    def keynet(self) -> KeyNet:
        return self.detector.model.keynet

    def detect(self, images: torch.Tensor, grey: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multi-resolution maxima of the KeyNet score (kornia's detector takes one image per call).

        Shape:
            - images: (B, 3, H, W); grey: (B, 1, H, W)
            - output: lafs (B, N, 2, 3), scores (B, N) KeyNet score in (0, 1), mask (B, N) bool, N = max_keypoints
        """
        detections = [self.detector(grey[i : i + 1]) for i in range(grey.shape[0])]
        lafs = torch.cat([lafs for lafs, _ in detections]).to(grey.dtype)
        responses = torch.cat([responses for _, responses in detections]).to(grey.dtype)
        return lafs, responses, laf_is_filled(lafs)

    def _training_modules(self) -> Dict[str, nn.Module]:
        return {"net": self.net, "keynet": self.keynet}

    def _training_loss(self, grey_a, grey_b, homographies, generator, options):
        """LF-Net's image-level loss (both directions) + HardNet loss at refined peaks of A."""
        keynet = self.keynet
        inverse = torch.linalg.inv(homographies)
        logits_a, logits_b = keynet_logits(keynet, torch.cat([grey_a, grey_b])).chunk(2)
        score_a, score_b = torch.sigmoid(logits_a), torch.sigmoid(logits_b)
        seen_in_b = _visible_region(homographies, grey_a, border=2)  # B pixels that see A
        seen_in_a = _visible_region(inverse, grey_a, border=2)  # A pixels that B sees
        peaks, nms, sigma = int(options["peaks_per_image"]), int(self.conf["nms_size"]), float(options["target_sigma"])
        with torch.no_grad():
            height, width = grey_a.shape[-2:]
            warp = lambda s, h: warp_perspective(s, h, (height, width), padding_mode="zeros", align_corners=True)  # noqa: E731
            target_b = peak_target(warp(score_a, homographies), seen_in_b, peaks, nms, sigma, generator)
            target_a = peak_target(warp(score_b, inverse), seen_in_a, peaks, nms, sigma, generator)
        image_loss = balanced_mse(score_b, target_b, seen_in_b) + balanced_mse(score_a, target_a, seen_in_a)

        # Keypoints of A whose whole patch both views see; the soft-argmax links their positions to
        # the score map.
        margin = int(math.ceil(float(self.conf["s_mult"]) * math.sqrt(2.0)))
        inner = _visible_region(inverse, grey_a, border=margin)
        inner[..., :margin, :] = inner[..., -margin:, :] = False
        inner[..., :, :margin] = inner[..., :, -margin:] = False
        indices, found = top_peaks(score_a, inner, int(options["pairs_per_image"]), nms, generator)
        centres = soft_refine(logits_a, indices, int(options["refine_window"]))
        scale = torch.full((*indices.shape, 1, 1), float(self.conf["s_mult"]), dtype=grey_a.dtype, device=grey_a.device)
        lafs = laf_from_center_scale_ori(centres, scale, torch.zeros_like(scale[..., 0]))
        pairs = homography_patch_pairs(
            grey_a, grey_b, lafs, found, homographies, min_contrast=float(self.conf["min_patch_contrast"])
        )
        desc_loss, logs = self._patch_pair_loss(pairs, options)
        weight = float(options["image_loss_weight"])
        loss = weight * image_loss if desc_loss is None else desc_loss + weight * image_loss
        logs["image_loss"] = float(image_loss.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs
