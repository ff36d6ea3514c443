"""Fitting VLAD (+ optional PCA-whitening) for any local descriptor, shared by sift, surf, l2net, lfnet.

`sample_local_descriptors` reads the training batches once and keeps a seeded subset per image;
`fit_vlad_and_whitening` learns the codebook from them and, when asked, the whitening of the images'
training VLADs. `pad_features` stacks variable-length per-image sets into a padded batch + mask.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from retrieval.aggregation import fit_codebook, vlad
from retrieval.types import LocalFeatures
from retrieval.whitening import fit_pca_whitening

logger = logging.getLogger("street2shop.retrieval")


def pad_features(rows: Sequence[np.ndarray], width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stack variable-length per-image arrays into one zero-padded batch plus its mask.

    Shape:
        - rows: B arrays of shape (N_b, width)
        - output: ((B, max N_b, width), (B, max N_b) bool)
    """
    n_max = max((len(r) for r in rows), default=0)
    padded = np.zeros((len(rows), n_max, width), dtype=np.float32)
    mask = np.zeros((len(rows), n_max), dtype=bool)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
        mask[i, : len(r)] = True
    return padded, mask


def sample_local_descriptors(
    extract: Callable[[torch.Tensor], LocalFeatures],
    batches: Iterable[torch.Tensor],
    per_image_cap: int,
    rng: np.random.Generator,
) -> List[np.ndarray]:
    """Extract local descriptors from training batches, at most `per_image_cap` per image (seeded subset).

    Returns:
        One (N_i, D) float32 array per image, in input order (N_i may be 0).
    """
    sampled: List[np.ndarray] = []
    for images in batches:
        features = extract(images)
        desc, mask = features.desc.float().cpu().numpy(), features.mask.cpu().numpy()
        for image_desc, image_mask in zip(desc, mask):
            real = image_desc[image_mask]
            if len(real) > per_image_cap:
                real = real[rng.choice(len(real), size=per_image_cap, replace=False)]
            sampled.append(real)
    return sampled


def fit_vlad_and_whitening(
    per_image: List[np.ndarray],
    n_clusters: int,
    pca_dim: Optional[int],
    seed: int = 0,
    max_points: int = 200_000,
    n_iterations: int = 20,
    chunk: int = 256,
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Learn a VLAD codebook from pooled local descriptors, then PCA-whitening of the images' VLADs.

    The same per-image descriptor sets give the VLAD vectors the whitening is learned from (so the
    training batches are read once). Images without descriptors give zero VLADs, which carry no
    information about the distribution, so they are left out of the whitening.

    Args:
        per_image: one (N_i, D) array per training image, from `sample_local_descriptors`.
        n_clusters: K of the codebook.
        pca_dim: output dims of the whitening, or None for no whitening.
        seed, max_points, n_iterations: see `retrieval.aggregation.fit_codebook`.
        chunk: images per padded VLAD batch (bounds memory).

    Returns:
        ``(centroids (K, D), mean (K*D,) or None, projection (K*D, pca_dim) or None)``, float32.

    Raises:
        ValueError: no images, or fewer descriptors than ``n_clusters`` (the message says what to do).
    """
    if not per_image:
        raise ValueError("fit got no training images")
    dim = per_image[0].shape[1]
    centroids = fit_codebook(
        np.concatenate(per_image), n_clusters=n_clusters, seed=seed, max_points=max_points, n_iterations=n_iterations
    )
    if pca_dim is None:
        return centroids, None, None
    with_features = [d for d in per_image if len(d)]
    centroids_tensor = torch.from_numpy(centroids)
    training_vlads = []
    for start in range(0, len(with_features), chunk):
        desc, mask = pad_features(with_features[start : start + chunk], dim)
        training_vlads.append(vlad(torch.from_numpy(desc), torch.from_numpy(mask), centroids_tensor).numpy())
    mean, projection = fit_pca_whitening(np.concatenate(training_vlads), int(pca_dim))
    return centroids, mean, projection


@torch.no_grad()
def fit_vlad_buffers(descriptor, batches: Iterable[torch.Tensor]) -> None:
    """Fit a VLAD descriptor's `centroids` (and `pca_mean` / `pca_projection` when ``pca_dim`` is set).

    The descriptor provides `extract` and the config keys seed, fit_descriptors_per_image, n_clusters,
    pca_dim, max_fit_descriptors and kmeans_iterations; its buffers are filled in place.
    """
    conf = descriptor.conf
    rng = np.random.default_rng(int(conf["seed"]))
    per_image = sample_local_descriptors(descriptor.extract, batches, int(conf["fit_descriptors_per_image"]), rng)
    if not per_image:
        raise ValueError(f"{descriptor.name}.fit got no training images")
    centroids, mean, projection = fit_vlad_and_whitening(per_image, pca_dim=conf["pca_dim"], **kmeans_options(conf))
    descriptor.centroids.copy_(torch.from_numpy(centroids))
    if mean is not None:
        descriptor.pca_mean.copy_(torch.from_numpy(mean))
        descriptor.pca_projection.copy_(torch.from_numpy(projection))


def kmeans_options(conf: Mapping[str, Any]) -> Dict[str, int]:
    """The codebook k-means settings of a VLAD config (n_clusters, seed, max_fit_descriptors,
    kmeans_iterations) under the names `fit_codebook` takes them."""
    return {
        "n_clusters": int(conf["n_clusters"]),
        "seed": int(conf["seed"]),
        "max_points": int(conf["max_fit_descriptors"]),
        "n_iterations": int(conf["kmeans_iterations"]),
    }
