"""VLAD: local descriptors -> one global vector, plus the PCA-whitening that usually follows it.

Reusable by every local descriptor (SIFT, SURF, L2-Net, DELF): they learn a codebook with
`fit_codebook`, optionally a whitening with `fit_pca_whitening`, and aggregate with `vlad` (+
`apply_pca_whitening`). Pure functions: numpy in `fit_*` (training, once), batched torch in the
functions `embed` calls, so aggregation follows its inputs' device.

References:
    Jegou et al., "Aggregating local descriptors into a compact image representation", CVPR 2010.
    Arandjelovic & Zisserman, "All about VLAD", CVPR 2013 (intra-normalisation).
    Jegou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012
    (PCA-whitening of VLAD followed by power-law and L2 normalisation).
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def fit_codebook(
    descriptors: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    max_points: int = 200_000,
    n_iterations: int = 20,
) -> np.ndarray:
    """Learn a VLAD codebook with k-means (faiss).

    Plain (not spherical) k-means: VLAD assigns each descriptor to its nearest centroid in Euclidean
    distance and sums the residuals ``x - c``. The Euclidean mean of a cluster is exactly the point
    that makes those residuals sum to zero over the training set, so residual sums measure how an
    image departs from the average. Spherical k-means would push centroids onto the unit sphere;
    the mean of unit-norm (Root)SIFT vectors lies inside it, so every residual would carry a
    constant component along ``-c`` that swamps the informative part.

    Args:
        descriptors: local descriptors pooled from training images.
        n_clusters: K, the number of visual words.
        seed: seeds both the subsampling and the k-means initialisation.
        max_points: at most this many descriptors (drawn uniformly without replacement) are used;
            k-means cost is linear in it and a few thousand points per centroid are plenty.
        n_iterations: Lloyd iterations.

    Returns:
        Centroids, float32.

    Raises:
        ValueError: fewer descriptors than clusters, or descriptors that are not a 2-D array.

    Shape:
        - descriptors: (M, D)
        - output: (K, D)

    Example:
        >>> rng = np.random.default_rng(0)
        >>> fit_codebook(rng.normal(size=(500, 8)).astype("float32"), n_clusters=4).shape
        (4, 8)
    """
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise ValueError(f"descriptors must be (M, D), got shape {descriptors.shape}")
    n_points, dim = descriptors.shape
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n_points < n_clusters:
        raise ValueError(
            f"cannot train a codebook of {n_clusters} clusters from only {n_points} descriptors: "
            "fit on more (or more textured) images, raise max_keypoints, or lower n_clusters"
        )
    rng = np.random.default_rng(seed)
    if n_points > max_points:
        descriptors = descriptors[rng.choice(n_points, size=max_points, replace=False)]
    training = np.ascontiguousarray(descriptors, dtype=np.float32)
    kmeans = faiss.Kmeans(
        dim,
        n_clusters,
        niter=n_iterations,
        seed=int(seed),
        spherical=False,
        # We subsample ourselves (seeded, documented); stop faiss from subsampling again.
        max_points_per_centroid=math.ceil(len(training) / n_clusters) + 1,
        # We already refused M < K; few points per centroid is the caller's informed choice.
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(training)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32).reshape(n_clusters, dim)


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Power-law normalisation with exponent 1/2: ``sign(x) * sqrt(|x|)``.

    Damps the bursty components (repeated texture puts many descriptors in one cluster).
    Not differentiable at exactly 0; the aggregation is used under ``no_grad``.

    Shape:
        - x: (*)
        - output: (*)
    """
    return torch.sign(x) * torch.sqrt(torch.abs(x))


def vlad(desc: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Vector of Locally Aggregated Descriptors, batched, with hard assignment.

    For every image b and cluster k: ``V[b, k] = sum over real descriptors x assigned to k of
    (x - c_k)``; then per-cluster L2 (intra-normalisation), signed square root, and a final L2 over
    the flattened ``K * D`` vector.

    Padding rows (``mask`` False) are ignored even when they hold NaN or inf. An image with no
    descriptor at all (mask all False) gives the all-zero vector: there is no evidence to
    aggregate, and a zero vector scores 0 against every database vector under inner product,
    which is the honest answer (any non-zero fallback would invent a similarity). It is finite,
    and the L2-normalisation below (and the engine's) keeps it zero rather than dividing by 0.

    Args:
        desc: local descriptors, padded.
        mask: True for real descriptors.
        centroids: the codebook from `fit_codebook`.

    Returns:
        One L2-normalised (or all-zero) VLAD vector per image, in the dtype of ``desc``.

    Shape:
        - desc: (B, N, D)
        - mask: (B, N) bool
        - centroids: (K, D)
        - output: (B, K * D)

    Example:
        >>> desc = torch.tensor([[[2.0, 0.0], [0.5, -0.5], [0.0, 3.0]]])
        >>> mask = torch.ones(1, 3, dtype=torch.bool)
        >>> vlad(desc, mask, torch.eye(2)).round(decimals=4)
        tensor([[ 0.5412, -0.5412,  0.0000,  0.6436]])
    """
    if desc.ndim != 3:
        raise ValueError(f"desc must be (B, N, D), got {tuple(desc.shape)}")
    batch, n_desc, dim = desc.shape
    if mask.shape != (batch, n_desc):
        raise ValueError(f"mask must be {(batch, n_desc)} to match desc, got {tuple(mask.shape)}")
    if centroids.ndim != 2 or centroids.shape[1] != dim:
        raise ValueError(f"centroids must be (K, {dim}), got {tuple(centroids.shape)}")
    n_clusters = centroids.shape[0]
    mask = mask.to(device=desc.device, dtype=torch.bool)
    centroids = centroids.to(device=desc.device, dtype=desc.dtype)
    # torch.where, not a multiplication: 0 * NaN would leak garbage padding into the sums.
    desc = torch.where(mask[..., None], desc, torch.zeros((), dtype=desc.dtype, device=desc.device))

    # Squared distances up to the per-descriptor constant ||x||^2, which argmin ignores.
    scores = desc @ centroids.T - 0.5 * (centroids * centroids).sum(dim=1)  # (B, N, K)
    nearest = scores.argmax(dim=-1)  # (B, N)
    assignment = F.one_hot(nearest, n_clusters).to(desc.dtype) * mask[..., None].to(desc.dtype)

    # sum_n a[n, k] (x_n - c_k) = (A^T X)[k] - count_k * c_k: two dense ops instead of a scatter.
    residual_sums = assignment.transpose(1, 2) @ desc  # (B, K, D)
    counts = assignment.sum(dim=1)  # (B, K)
    residual_sums = residual_sums - counts[..., None] * centroids

    # F.normalize clamps the norm at eps, so empty clusters / empty images stay exactly zero.
    intra_normalised = F.normalize(residual_sums, dim=-1)
    flat = signed_sqrt(intra_normalised.reshape(batch, n_clusters * dim))
    return F.normalize(flat, dim=-1)


def soft_vlad(
    desc: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """NetVLAD's differentiable VLAD: soft assignment ``softmax_k(-alpha ||x - c_k||^2)``, for training.

    The training-time twin of `vlad` (Arandjelovic et al., "NetVLAD: CNN architecture for weakly
    supervised place recognition", CVPR 2016): the same residual sums, intra-normalisation and final
    L2, with each descriptor spread over the clusters by a softmax instead of given to the nearest
    one, so the loss of the aggregated vector reaches the descriptors and the centroids. As ``alpha``
    grows it becomes `vlad` without the signed square root, which is left out because its gradient
    is unbounded near zero (every soft residual sum is small somewhere).

    Shape:
        - desc: (B, N, D), mask: (B, N) bool, centroids: (K, D)
        - output: (B, K * D), unit rows (all-zero for an image without descriptors)

    Example:
        >>> desc = torch.tensor([[[2.0, 0.0], [0.5, -0.5], [0.0, 3.0]]])
        >>> soft_vlad(desc, torch.ones(1, 3, dtype=torch.bool), torch.eye(2), alpha=1e3).round(decimals=4)
        tensor([[ 0.5000, -0.5000,  0.0000,  0.7071]])
    """
    if desc.ndim != 3 or mask.shape != desc.shape[:2] or centroids.ndim != 2 or centroids.shape[1] != desc.shape[2]:
        raise ValueError(
            f"expected desc (B, N, D), mask (B, N), centroids (K, D); got {tuple(desc.shape)}, "
            f"{tuple(mask.shape)}, {tuple(centroids.shape)}"
        )
    batch = desc.shape[0]
    mask = mask.to(device=desc.device, dtype=torch.bool)
    desc = torch.where(mask[..., None], desc, torch.zeros((), dtype=desc.dtype, device=desc.device))
    # -alpha ||x - c||^2 up to the per-descriptor constant -alpha ||x||^2, which the softmax ignores.
    logits = alpha * (2.0 * desc @ centroids.T - (centroids * centroids).sum(dim=1))  # (B, N, K)
    assignment = torch.softmax(logits, dim=-1) * mask[..., None].to(desc.dtype)
    residual_sums = assignment.transpose(1, 2) @ desc - assignment.sum(dim=1)[..., None] * centroids  # (B, K, D)
    return F.normalize(F.normalize(residual_sums, dim=-1).reshape(batch, -1), dim=-1)
