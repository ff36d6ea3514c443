"""Learned PCA-whitening of global vectors (Jégou & Chum, 2012), shared by VLAD and R-MAC.

`fit_pca_whitening` (numpy, once) and `apply_pca_whitening` (batched torch) are pure functions;
`PCAWhitening` holds the result as buffers so it travels with a descriptor's state dict.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.aggregation import signed_sqrt, vlad

logger = logging.getLogger("street2shop.retrieval")


def fit_pca_whitening(
    vectors: np.ndarray, out_dim: int, shrinkage: float = 0.1, power: float = 0.5, rank_tolerance: float = 1e-6
) -> Tuple[np.ndarray, np.ndarray]:
    """Learn PCA-whitening (mean and projection) from training vectors, e.g. VLAD vectors.

    With fewer training vectors than dimensions (the usual case for VLAD, D = K * 128) it is an SVD
    of the centred data (float64, cost ``M * D * M``); with more (R-MAC regions: 10^5 x 1280) the
    eigendecomposition of the D x D covariance, whose cost is one GEMM plus ``D^3``.

    With M training vectors the covariance has rank at most ``M - 1``. Components beyond the rank
    (eigenvalue below ``rank_tolerance`` times the largest) carry no training variance; whitening
    them would divide by ~0 and blow up noise, so their projection columns are set to zero
    (the output keeps ``out_dim`` coordinates, the trailing ones constant 0) and a warning is logged.
    The kept small eigenvalues are still noisy estimates, so they are shrunk towards the mean kept
    eigenvalue before dividing (as `retrieval.whitening` does), which caps their amplification.

    Args:
        vectors: training vectors, one per row.
        out_dim: number of whitened components to keep.
        shrinkage: in [0, 1]; 0 keeps the eigenvalues as they are, 1 replaces them by their mean.
        power: eigenvalue exponent; 0.5 whitens, 0 is plain PCA (rotation only).
        rank_tolerance: relative eigenvalue below which a component counts as degenerate.

    Returns:
        ``(mean, projection)`` as float32; apply with `apply_pca_whitening`.

    Shape:
        - vectors: (M, D)
        - mean: (D,)
        - projection: (D, out_dim)
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (M, D), got shape {vectors.shape}")
    n_vectors, dim = vectors.shape
    if not 1 <= out_dim <= dim:
        raise ValueError(f"out_dim must be in [1, {dim}], got {out_dim}")
    if n_vectors < 2:
        raise ValueError(f"PCA-whitening needs at least 2 training vectors, got {n_vectors}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mean = vectors.mean(axis=0)
    centred = vectors - mean
    if n_vectors <= dim:
        _, singular_values, components = np.linalg.svd(centred, full_matrices=False)
        eigenvalues = singular_values**2 / (n_vectors - 1)  # descending
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (n_vectors - 1))
        eigenvalues, components = np.clip(eigenvalues[::-1], 0, None), eigenvectors[:, ::-1].T
    projection = np.zeros((dim, out_dim), dtype=np.float64)
    n_available = min(out_dim, len(eigenvalues))
    valid = eigenvalues[:n_available] > rank_tolerance * max(eigenvalues[0], np.finfo(float).tiny)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("PCA-whitening training vectors are all identical: nothing to learn")
    kept = eigenvalues[:n_valid]
    regularised = (1.0 - shrinkage) * kept + shrinkage * kept.mean()
    projection[:, :n_valid] = components[:n_valid].T / regularised**power
    if n_valid < out_dim:
        logger.warning(
            "PCA-whitening to %d dims learned from %d vectors has only %d informative components; "
            "the remaining %d output coordinates are always 0 (fit on more images or lower pca_dim)",
            out_dim,
            n_vectors,
            n_valid,
            out_dim - n_valid,
        )
    return mean.astype(np.float32), projection.astype(np.float32)


def apply_pca_whitening(
    vectors: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, power_norm: bool = True
) -> torch.Tensor:
    """Centre, project and whiten, then (optionally) signed square root, and L2 (Jegou & Chum 2012).

    Whitening equalises the variance of all components, which re-amplifies bursty ones; the power
    normalisation after it damps them again. An all-zero input (image without features) would be
    mapped to ``-mean @ projection``, a made-up vector, so zero rows are kept zero instead.

    Shape:
        - vectors: (B, D)
        - mean: (D,)
        - projection: (D, out_dim)
        - output: (B, out_dim)
    """
    if vectors.ndim != 2 or vectors.shape[1] != mean.shape[0] or projection.shape[0] != mean.shape[0]:
        raise ValueError(
            f"shapes disagree: vectors {tuple(vectors.shape)}, mean {tuple(mean.shape)}, "
            f"projection {tuple(projection.shape)}"
        )
    mean = mean.to(device=vectors.device, dtype=vectors.dtype)
    projection = projection.to(device=vectors.device, dtype=vectors.dtype)
    whitened = (vectors - mean) @ projection
    has_evidence = vectors.abs().sum(dim=1, keepdim=True) > 0
    zero = torch.zeros((), dtype=whitened.dtype, device=whitened.device)
    whitened = torch.where(has_evidence, whitened, zero)
    return F.normalize(signed_sqrt(whitened) if power_norm else whitened, dim=-1)


class PCAWhitening(nn.Module):
    """A learned whitening as buffers; `forward` whitens and L2-normalises (no power law).

    Shape:
        - Input: (..., in_dim)
        - Output: (..., out_dim), unit L2 norm (zero rows stay zero).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("projection", torch.zeros(in_dim, out_dim))

    def fit(self, vectors: torch.Tensor, power: float = 0.5, shrinkage: float = 0.1) -> "PCAWhitening":
        mean, projection = fit_pca_whitening(vectors.cpu().numpy(), self.projection.shape[1], shrinkage, power)
        self.mean.copy_(torch.from_numpy(mean))
        self.projection.copy_(torch.from_numpy(projection))
        return self

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        flat = vectors.reshape(-1, vectors.shape[-1])
        out = apply_pca_whitening(flat, self.mean, self.projection, power_norm=False)
        return out.reshape(*vectors.shape[:-1], -1)


def whitened_vlad(
    desc: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor, whitening: Optional[Tuple[torch.Tensor, ...]]
) -> torch.Tensor:
    """`vlad` of the descriptors (as float32), then `apply_pca_whitening` with ``whitening`` = (mean,
    projection) when there is one: the global vector of every VLAD descriptor.

    Shape:
        - desc: (B, N, D); mask: (B, N) bool; centroids: (K, D)
        - output: (B, K * D), or (B, projection's columns) whitened
    """
    vectors = vlad(desc.float(), mask, centroids)
    return vectors if whitening is None else apply_pca_whitening(vectors, *whitening)
