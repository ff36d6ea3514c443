"""SURF local features (our torch implementation, `retrieval.surf`), aggregated with VLAD + PCA-whitening.

OpenCV's PyPI wheels leave SURF out (patented, in opencv-contrib's non-free module only), so the
features come from `retrieval.surf`, a batched torch implementation of Bay et al. (CVIU 2008) that
runs on the images' device. Aggregation is the same as the `sift` descriptor's: a k-means VLAD
codebook and a PCA-whitening of the VLAD vectors, both learned by `fit` and kept as buffers.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from kornia.color import rgb_to_grayscale

from retrieval.descriptors.base import DESCRIPTORS, check_images
from retrieval.descriptors.vlad_base import VLAD_CONF, VLADDescriptor
from retrieval.surf import DEFAULT_HESSIAN_THRESHOLD, surf
from retrieval.types import InputSpec, LocalFeatures


# ---- the descriptor ------------------------------------------------------------------------------
@DESCRIPTORS.register("surf")
class SURF(VLADDescriptor):
    """SURF keypoints and descriptors (torch, batched), VLAD-aggregated and PCA-whitened for indexing.

    Fitted like `sift`: the codebook and the optional whitening are buffers learned by `fit`.

    Config (``default_conf``):
        image_size: (H, W) the loader resizes to; extraction itself works at any size.
        hessian_threshold: minimum det(H) of a keypoint, for grey levels in [0, 1] and box filters
            normalised by their area (the paper's units; OpenCV's ``hessianThreshold`` is in other
            units). 5e-5 gives ~150-250 keypoints on 256x192 garment photos, a little more than
            `sift` finds; on a 150-product VITON subset mAP@20 was flat from 1e-5 to 5e-5 and fell
            above it (0.194 at 2e-4, 0.161 at 1e-3).
        n_octaves: octaves of the box-filter scale space (4 filters each).
        initial_step: sampling step of the first octave in pixels (doubles every octave). 1, like
            OpenCV's SURF; the paper's 2 halves the first octave's cost and keypoints.
        extended: 128-d SURF descriptors instead of 64-d.
        upright: U-SURF (no orientation): faster, not rotation-invariant.
        max_keypoints: keep at most this many keypoints per image, the strongest by det(H).
        n_clusters: K, VLAD codebook size; the raw VLAD is K * 64 (or K * 128) dims.
        pca_dim: output dims after PCA-whitening of the VLAD vector, or None for raw VLAD.
        fit_descriptors_per_image, max_fit_descriptors, kmeans_iterations, seed: as for `sift`.

    Shape:
        - embed input: (B, 3, H, W) float RGB in [0, 1]
        - embed output: (B, dim), dim = pca_dim or n_clusters * (64 or 128)

    Example:
        >>> SURF(n_clusters=8, pca_dim=None).dim
        512
    """

    trainable = False
    default_conf: Dict[str, Any] = {
        "image_size": (256, 192),
        "hessian_threshold": DEFAULT_HESSIAN_THRESHOLD,
        "n_octaves": 4,
        "initial_step": 1,
        "extended": False,
        "upright": False,
        "max_keypoints": 1000,
        **VLAD_CONF,  # raw VLAD, as for sift: whitening 4096-d VLAD from ~1k images is rank-deficient
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        if int(self.conf["n_clusters"]) < 1 or int(self.conf["max_keypoints"]) < 1 or int(self.conf["n_octaves"]) < 1:
            raise ValueError(f"n_clusters, max_keypoints and n_octaves must be >= 1, got conf {self.conf}")
        if not float(self.conf["hessian_threshold"]) >= 0:
            raise ValueError(f"hessian_threshold must be >= 0, got {self.conf['hessian_threshold']}")
        self._register_vlad_buffers()

    # ---- contract -------------------------------------------------------------------------
    @property
    def local_dim(self) -> int:
        """Dimension of one SURF descriptor: 64, or 128 when extended."""
        return 128 if self.conf["extended"] else 64

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), grey=True)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> LocalFeatures:
        """Detect and describe SURF features in every image of the batch, on the images' device.

        Returns:
            LocalFeatures padded to the batch's largest keypoint count: keypoints xy in pixels,
            scales = SURF scale s in pixels (1.2 L / 9 for box filter side L; a Gaussian sigma, not
            a diameter like SIFT's), orientations in degrees [0, 360) of atan2(dy, dx) in image
            axes (0 when upright), scores = det(H), desc unit-L2 rows. An image without keypoints
            (e.g. flat) has an all-False mask row.

        Shape:
            - images: (B, 3, H, W) float RGB in [0, 1]
            - desc: (B, N, 64 or 128), keypoints (B, N, 2), scores/scales/orientations/mask (B, N)
        """
        check_images(images)
        grey = rgb_to_grayscale(images.float().clamp(0.0, 1.0))[:, 0]
        features = surf(
            grey,
            hessian_threshold=float(self.conf["hessian_threshold"]),
            n_octaves=int(self.conf["n_octaves"]),
            initial_step=int(self.conf["initial_step"]),
            max_keypoints=int(self.conf["max_keypoints"]),
            extended=bool(self.conf["extended"]),
            upright=bool(self.conf["upright"]),
        )
        return LocalFeatures(
            keypoints=features.keypoints,
            desc=features.descriptors,
            scores=features.responses,
            mask=features.mask,
            scales=features.scales,
            orientations=torch.rad2deg(features.orientations),
            image_size=(int(images.shape[2]), int(images.shape[3])),
        )
