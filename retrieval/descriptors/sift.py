"""SIFT (OpenCV) local features, RootSIFT, aggregated with VLAD (+ optional PCA-whitening).

The classic hand-crafted baseline of the street-to-shop tables: keypoints from the difference of
Gaussians, 128-d gradient histograms, Hellinger kernel via RootSIFT (Arandjelovic & Zisserman,
"Three things everyone should know to improve object retrieval", CVPR 2012), one global vector per
image via `retrieval.aggregation.vlad`.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import cv2
import numpy as np
import torch

from retrieval.descriptors.base import DESCRIPTORS, check_images
from retrieval.descriptors.vlad_base import VLAD_CONF, VLADDescriptor
from retrieval.types import InputSpec, LocalFeatures
from retrieval.vlad_fitting import pad_features

SIFT_DIM = 128
# ITU-R BT.601 luma, the weights cv2.COLOR_RGB2GRAY uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def rgb_to_grey_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float RGB in [0, 1] -> (B, H, W) uint8 luminance, what OpenCV SIFT reads.

    Shape:
        - images: (B, 3, H, W)
        - output: (B, H, W)
    """
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    grey = torch.einsum("bchw,c->bhw", images, weights)
    return (grey.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def root_sift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT: L1-normalise then element-wise sqrt, so that dot products compute the Hellinger kernel.

    The rows come out non-negative with unit L2 norm (sum of squares = L1 norm before sqrt = 1).

    Shape:
        - desc: (N, D) non-negative
        - output: (N, D)
    """
    l1 = np.abs(desc).sum(axis=1, keepdims=True)
    return np.sqrt(desc / np.maximum(l1, eps)).astype(np.float32)


@DESCRIPTORS.register("sift")
class SIFT(VLADDescriptor):
    """OpenCV SIFT keypoints + (Root)SIFT descriptors, VLAD-aggregated for indexing.

    `fit` learns the VLAD codebook (and, when ``pca_dim`` is set, a PCA-whitening of the VLAD
    vectors) from training images; both are buffers, so they travel in ``state_dict``. The VLAD
    settings and their defaults are `VLAD_CONF`'s.

    Config (``default_conf``):
        image_size: (H, W) the loader resizes to; extraction itself works at any size.
        max_keypoints: keep at most this many keypoints per image, the strongest by response.
        root_sift: RootSIFT (Hellinger) instead of L2-normalised SIFT.
        n_clusters: K, VLAD codebook size; the raw VLAD is K * 128 dims.
        pca_dim: output dims after PCA-whitening of the VLAD vector, or None for raw K * 128.
        fit_descriptors_per_image: descriptors kept per training image in `fit` (random subset),
            which bounds fit memory to about n_images * this * 512 bytes.
        max_fit_descriptors: at most this many descriptors train the k-means.
        kmeans_iterations: Lloyd iterations of the codebook k-means.
        seed: seeds the subsampling and k-means.
        n_octave_layers, contrast_threshold, edge_threshold, sigma: cv2.SIFT_create parameters.
            The contrast threshold is below OpenCV's 0.04 because garments at 256x192 are small and
            low-contrast; 0.04 leaves many of them with a few dozen keypoints.

    Shape:
        - embed input: (B, 3, H, W) float RGB in [0, 1]
        - embed output: (B, dim), dim = pca_dim or n_clusters * 128

    Example:
        >>> sift = SIFT(n_clusters=8, pca_dim=None)
        >>> sift.dim
        1024
    """

    trainable = False
    default_conf: Dict[str, Any] = {
        "image_size": (256, 192),
        "max_keypoints": 1000,
        "root_sift": True,
        **VLAD_CONF,
        "n_octave_layers": 3,
        "contrast_threshold": 0.02,
        "edge_threshold": 10.0,
        "sigma": 1.6,
    }

    local_dim = SIFT_DIM

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        if int(self.conf["n_clusters"]) < 1 or int(self.conf["max_keypoints"]) < 1:
            raise ValueError(f"n_clusters and max_keypoints must be >= 1, got conf {self.conf}")
        self._register_vlad_buffers()

    # ---- contract -------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), grey=True)

    def _detector(self) -> "cv2.SIFT":
        # A fresh detector per batch (microseconds): the module holds no cv2 object, which could
        # not be deep-copied or pickled, and concurrent extract calls share no state.
        return cv2.SIFT_create(
            # OpenCV keeps the best nfeatures by response, but ties can exceed it; we cut exactly below.
            nfeatures=int(self.conf["max_keypoints"]),
            nOctaveLayers=int(self.conf["n_octave_layers"]),
            contrastThreshold=float(self.conf["contrast_threshold"]),
            edgeThreshold=float(self.conf["edge_threshold"]),
            sigma=float(self.conf["sigma"]),
        )

    def _extract_one(self, detector: "cv2.SIFT", grey: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """One uint8 (H, W) image -> (attributes (N, 5): x, y, size, angle, response; desc (N, 128))."""
        keypoints, desc = detector.detectAndCompute(grey, None)
        if desc is None or len(keypoints) == 0:  # flat image: OpenCV returns () and None
            return np.zeros((0, 5), np.float32), np.zeros((0, SIFT_DIM), np.float32)
        # OpenCV hands keypoints back only as Python objects; unpacking their five fields is the
        # one per-keypoint step (a few microseconds each, negligible next to detection).
        attributes = np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in keypoints], dtype=np.float32)
        strongest = np.argsort(-attributes[:, 4], kind="stable")[: int(self.conf["max_keypoints"])]
        attributes, desc = attributes[strongest], desc[strongest].astype(np.float32)
        if self.conf["root_sift"]:
            desc = root_sift(desc)
        else:
            desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        return attributes, desc

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> LocalFeatures:
        """Detect and describe SIFT keypoints in every image of the batch.

        Returns:
            LocalFeatures padded to the batch's largest keypoint count, on the images' device:
            keypoints xy in pixels, scales = keypoint diameter in pixels (``KeyPoint.size``),
            orientations in degrees [0, 360), scores = DoG response, desc (Root)SIFT with unit L2 rows.
            An image without keypoints (e.g. flat) has an all-False mask row.

        Shape:
            - images: (B, 3, H, W) float RGB in [0, 1]
            - desc: (B, N, 128), keypoints (B, N, 2), scores/scales/orientations/mask (B, N)
        """
        check_images(images)
        grey = rgb_to_grey_uint8(images)
        detector = self._detector()
        per_image = [self._extract_one(detector, g) for g in grey]  # OpenCV SIFT takes one image per call
        attributes, mask = pad_features([a for a, _ in per_image], 5)
        desc, _ = pad_features([d for _, d in per_image], SIFT_DIM)

        def to_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(images.device)

        return LocalFeatures(
            keypoints=to_tensor(attributes[..., 0:2].copy()),
            desc=to_tensor(desc),
            scores=to_tensor(attributes[..., 4].copy()),
            mask=to_tensor(mask),
            scales=to_tensor(attributes[..., 2].copy()),
            orientations=to_tensor(attributes[..., 3].copy()),
            image_size=(int(images.shape[2]), int(images.shape[3])),
        )
