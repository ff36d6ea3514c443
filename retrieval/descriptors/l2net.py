"""L2-Net patch descriptors at DoG keypoints, trained in this project on synthetic homographies, VLAD-aggregated.

L2-Net (Tian, Fan & Wu, "L2-Net: Deep learning of discriminative patch descriptor in Euclidean
space", CVPR 2017) describes a 32x32 grey patch with seven 3x3/8x8 convolutions (32-32-64-64-128-
128-128 channels, BatchNorm without affine parameters, stride 2 at the third and fifth) and an
L2-normalised 128-d output. kornia has no `L2Net` class; its `HardNet` *is* this architecture
(HardNet, Mishchuk et al. NeurIPS 2017, kept L2-Net's network and changed the loss) plus a 0.3
dropout before the last convolution; L2-Net's optional central-surround second stream and its
final local response normalisation are not included. We build `kornia.feature.HardNet(pretrained=
False)`, so no weights are ever downloaded: the network starts from random initialisation and is
trained (`train_on`, `retrieval.training.patch`) with HardNet's hardest-in-batch triplet loss on patch
pairs cut from VITON product photos and random homographies of them (`retrieval.patches`), and by
default also with an InfoNCE loss on product <-> worn-garment patch pairs (`garment_pairs_weight`,
`garment_loss`: without them the network matches patches far better yet retrieves worse than
untrained); optionally end to end through a soft-assignment VLAD of street photo against product
(`vlad_weight`, `retrieval.aggregation.soft_vlad`). The network trains in bfloat16 autocast
(`bfloat16`), about twice as fast on CPUs with AVX512-BF16.

Keypoints come from OpenCV's SIFT detector (difference of Gaussians, no learning), with its
position, size and orientation; each becomes a local affine frame (kornia convention) whose 32x32
patch is sampled from the scale pyramid. Descriptors are aggregated exactly like `sift`: VLAD
over a k-means codebook, raw by default, PCA-whitened with ``pca_dim`` (`retrieval.aggregation`,
`retrieval.whitening`). final.pt holds the networks only; the codebook is fitted afterwards.

`LearnedPatchDescriptor` (`retrieval.descriptors.learned_patch`) holds everything but the detector,
so `lfnet` (KeyNet + the same patch network, trained jointly) shares the description and aggregation.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import cv2
import numpy as np
import torch
from kornia.feature import laf_from_center_scale_ori

from retrieval.descriptors.base import DESCRIPTORS
from retrieval.descriptors.learned_patch import PATCH_DESCRIPTOR_CONF, LearnedPatchDescriptor
from retrieval.descriptors.sift import rgb_to_grey_uint8
from retrieval.vlad_fitting import pad_features


def dog_keypoints(detector: "cv2.SIFT", grey: np.ndarray, max_keypoints: int, upright: bool) -> np.ndarray:
    """OpenCV SIFT (DoG) keypoints of one image, strongest first: (N, 5) x, y, size, angle, response.

    With `upright`, SIFT's extra orientations at one position are dropped (they would all give the
    same upright patch and count it several times in VLAD), keeping the strongest.

    Shape:
        - grey: (H, W) uint8
        - output: (N, 5) float32, N <= max_keypoints
    """
    keypoints = detector.detect(grey, None)
    if not keypoints:
        return np.zeros((0, 5), np.float32)
    # OpenCV hands keypoints back only as Python objects: unpacking their fields is the one per-keypoint step.
    attributes = np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in keypoints], dtype=np.float32)
    attributes = attributes[np.argsort(-attributes[:, 4], kind="stable")]
    if upright:
        _, first = np.unique(np.round(attributes[:, :3], 2), axis=0, return_index=True)
        attributes = attributes[np.sort(first)]
    return attributes[:max_keypoints]


def keypoints_to_lafs(
    attributes: torch.Tensor, patch_scale: float, min_radius: float, max_radius: float, upright: bool
) -> torch.Tensor:
    """SIFT keypoint attributes -> kornia LAFs of half side ``clamp(patch_scale * size)``.

    OpenCV's ``size`` is twice the keypoint's sigma, so ``patch_scale = 3`` gives the half side
    ``6 sigma`` that kornia's DoG + HardNet pipeline uses. OpenCV's angle turns clockwise in image
    coordinates where kornia's turns the other way, hence the sign flip (checked on rotated images).

    Shape:
        - attributes: (B, N, 5) x, y, size, angle, response
        - output: (B, N, 2, 3)
    """
    radius = (patch_scale * attributes[..., 2]).clamp(min_radius, max_radius)
    angle = torch.zeros_like(attributes[..., 3]) if upright else -attributes[..., 3]
    return laf_from_center_scale_ori(attributes[..., :2].contiguous(), radius[..., None, None], angle[..., None])


@DESCRIPTORS.register("l2net")
class L2Net(LearnedPatchDescriptor):
    """L2-Net descriptors of 32x32 patches at OpenCV DoG keypoints, VLAD + PCA-whitened.

    The network is kornia's `HardNet(pretrained=False)`, which is the L2-Net architecture (see the
    module docstring); `train_on` trains it with the HardNet loss on homography patch pairs of the
    training product photos, keypoints from the same DoG detector. Untrained, it is a random
    network, still a valid (weak) descriptor.

    Config (``default_conf``), beyond the shared ones (image_size, max_keypoints, upright,
    n_clusters, pca_dim, fit_descriptors_per_image, max_fit_descriptors, kmeans_iterations,
    describe_chunk: patches per network call, min_patch_contrast: flatter patches are not described, seed):
        n_octave_layers, contrast_threshold, edge_threshold, sigma: cv2.SIFT_create detector settings
            (contrast threshold 0.02 as `sift`, for small low-contrast garments).
        patch_scale: half side of the patch in units of OpenCV's keypoint size (3 = 6 sigma).
        min_patch_radius, max_patch_radius: clamp of that half side, in pixels.
    """

    default_conf: Dict[str, Any] = {
        **PATCH_DESCRIPTOR_CONF,
        "n_octave_layers": 3,
        "contrast_threshold": 0.02,
        "edge_threshold": 10.0,
        "sigma": 1.6,
        "patch_scale": 3.0,
        "min_patch_radius": 4.0,
        "max_patch_radius": 32.0,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.eval()

    def _detector(self) -> "cv2.SIFT":
        # A fresh detector per batch (microseconds): no cv2 object on the module (not picklable).
        return cv2.SIFT_create(
            nfeatures=int(self.conf["max_keypoints"]) * (1 if self.conf["upright"] else 2),
            nOctaveLayers=int(self.conf["n_octave_layers"]),
            contrastThreshold=float(self.conf["contrast_threshold"]),
            edgeThreshold=float(self.conf["edge_threshold"]),
            sigma=float(self.conf["sigma"]),
        )

    def detect(self, images: torch.Tensor, grey: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DoG keypoints of each image (OpenCV takes one image per call) as LAFs.

        Shape:
            - images: (B, 3, H, W); grey: (B, 1, H, W)
            - output: lafs (B, N, 2, 3), scores (B, N) DoG response, mask (B, N) bool
        """
        detector = self._detector()
        per_image = [
            dog_keypoints(detector, g, int(self.conf["max_keypoints"]), bool(self.conf["upright"]))
            for g in rgb_to_grey_uint8(images)
        ]
        attributes, mask = pad_features(per_image, 5)
        attributes = torch.from_numpy(attributes).to(grey.device)
        lafs = keypoints_to_lafs(
            attributes,
            float(self.conf["patch_scale"]),
            float(self.conf["min_patch_radius"]),
            float(self.conf["max_patch_radius"]),
            bool(self.conf["upright"]),
        )
        return lafs.to(grey.dtype), attributes[..., 4], torch.from_numpy(mask).to(grey.device)
