"""The shared base of local descriptors that reach the index through VLAD: sift, surf, l2net, lfnet.

A subclass describes keypoints (`extract`, `local_dim`); this base owns what they all did alike: the
codebook and optional PCA-whitening buffers, `dim`, `aggregate` and `fit`. DELF is not one of them: it
reduces its descriptors with a PCA of its own before the codebook (see `retrieval/descriptors/delf.py`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

import torch

from retrieval.descriptors.base import Descriptor
from retrieval.types import LocalFeatures
from retrieval.vlad_fitting import fit_vlad_buffers
from retrieval.whitening import whitened_vlad

# The VLAD settings of every `VLADDescriptor` (see `fit_vlad_buffers`), with the defaults they all share;
# a subclass's ``default_conf`` spreads them among its own.
VLAD_CONF: Dict[str, Any] = {
    "n_clusters": 64,
    # Raw VLAD by default: a PCA-whitening of 8192-d VLAD learned from ~1,000 training images is
    # rank-deficient and amplifies noise (sift, VITON val subset of 600: mAP@20 0.089 with it, 0.184 without).
    "pca_dim": None,
    "fit_descriptors_per_image": 300,
    "max_fit_descriptors": 200_000,
    "kmeans_iterations": 20,
    "seed": 0,
}


class VLADDescriptor(Descriptor):
    """Local features -> VLAD (intra-norm, signed sqrt, L2) -> optional PCA-whitening.

    A subclass sets ``local_dim`` (width of one local descriptor), calls `_register_vlad_buffers` in
    its ``__init__`` and implements `extract`. Its ``default_conf`` holds `VLAD_CONF`'s n_clusters, pca_dim,
    seed, fit_descriptors_per_image, max_fit_descriptors and kmeans_iterations (see `fit_vlad_buffers`).

    Shape:
        - aggregate input: LocalFeatures with desc (B, N, local_dim)
        - output: (B, dim), dim = pca_dim or n_clusters * local_dim
    """

    kind = "local"
    needs_fit = True
    local_dim: int

    def _register_vlad_buffers(self) -> None:
        """The codebook (K, local_dim) and, with pca_dim, the whitening: shapes follow from conf alone,
        so a fresh instance can load_state_dict a fitted one."""
        n_clusters, pca_dim = int(self.conf["n_clusters"]), self.conf["pca_dim"]
        vlad_dim = n_clusters * self.local_dim
        if pca_dim is not None and not 1 <= int(pca_dim) <= vlad_dim:
            raise ValueError(
                f"pca_dim must be None or in [1, {vlad_dim}] (n_clusters * {self.local_dim}), got {pca_dim}"
            )
        self.register_buffer("centroids", torch.zeros(n_clusters, self.local_dim))
        if pca_dim is not None:
            self.register_buffer("pca_mean", torch.zeros(vlad_dim))
            self.register_buffer("pca_projection", torch.zeros(vlad_dim, int(pca_dim)))

    @property
    def dim(self) -> int:
        pca_dim = self.conf["pca_dim"]
        return int(pca_dim) if pca_dim is not None else int(self.conf["n_clusters"]) * self.local_dim

    @torch.no_grad()
    def aggregate(self, features: LocalFeatures) -> torch.Tensor:
        """VLAD (intra-norm, signed sqrt, L2), then PCA-whitening + signed sqrt + L2 when configured.

        An image without keypoints gives the zero vector (see `retrieval.aggregation.vlad`).

        Shape:
            - features.desc: (B, N, local_dim)
            - output: (B, dim)
        """
        whitening = (self.pca_mean, self.pca_projection) if self.conf["pca_dim"] is not None else None
        return whitened_vlad(features.desc, features.mask, self.centroids, whitening)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> "VLADDescriptor":
        """Learn the VLAD codebook (and PCA-whitening) from training image batches, in one pass.

        Each image contributes a seeded random subset of at most ``fit_descriptors_per_image``
        descriptors; the same subsets give the training VLADs the whitening is learned from, so
        `batches` may be a one-shot generator (see `retrieval.vlad_fitting`). A trained network is
        fitted in eval mode, and after its training: retraining invalidates the codebook.

        Args:
            batches: iterable of (B, 3, H, W) float RGB tensors in [0, 1] from a training set.

        Raises:
            ValueError: no images, or fewer descriptors than ``n_clusters``.
        """
        was_training = self.training
        self.eval()
        fit_vlad_buffers(self, batches)
        self._fitted.fill_(True)
        self.train(was_training)
        return self
