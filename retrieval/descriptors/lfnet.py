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
- Training (`retrieval.training.patch_losses.lfnet_homography_loss`), on a product photo A and its random
  homography B (`retrieval.patches`):
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
from kornia.feature import KeyNet, LAFOrienter, MultiResolutionDetector, PassLAF, laf_is_filled
from kornia.geometry.transform import pyrdown
from torch import nn

from retrieval.descriptors.base import DESCRIPTORS
from retrieval.descriptors.learned_patch import PATCH_DESCRIPTOR_CONF, LearnedPatchDescriptor, seeded


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


@DESCRIPTORS.register("lfnet")
class LFNet(LearnedPatchDescriptor):
    """LF-Net-style: KeyNet detector + HardNet descriptor trained jointly on homographies.

    LF-Net itself is not in kornia; this is kornia's KeyNet in its `MultiResolutionDetector`
    (random init, trained in this project) with kornia's `HardNet` patch network (the L2-Net
    architecture), trained together (`retrieval.training.patch`) with LF-Net's image-level score-map
    loss and a hardest-in-batch triplet loss at soft-argmax-refined peaks (see the module docstring),
    plus the garment-pair loss of `l2net`. Descriptors are VLAD-aggregated like `sift`.

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
