"""Step 1 of spatial verification (`retrieval.rerank`): mutual nearest-neighbour descriptor matches."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def mutual_nearest_neighbours(
    query_desc: torch.Tensor,
    query_mask: torch.Tensor,
    gallery_desc: torch.Tensor,
    gallery_mask: torch.Tensor,
    min_similarity: Optional[float] = None,
    ratio: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours by dot product between one query and C candidate images.

    Args:
        query_desc: the query's descriptors (unit rows for cosine similarity).
        query_mask: True for real query descriptors.
        gallery_desc: the candidates' descriptors, padded.
        gallery_mask: True for real candidate descriptors.
        min_similarity: also drop matches whose similarity is below this, or None.
        ratio: also apply Lowe's ratio test (for unit descriptors): keep a match only when its
            Euclidean distance is below ``ratio`` times that of the query descriptor's second
            nearest neighbour in the same candidate. It drops repetitive structure (plain
            backdrop, stripes), whose matches are mutual by accident and all agree on one layout.

    Returns:
        (match, valid): for every candidate c and query descriptor m, the index of its match in
        candidate c's descriptors, and whether that match is mutual, real and similar enough.

    Shape:
        - query_desc: (M, D), query_mask: (M,)
        - gallery_desc: (C, N, D), gallery_mask: (C, N)
        - output: ((C, M) int64, (C, M) bool)

    Example:
        >>> q = torch.eye(3)
        >>> g = torch.eye(3)[[2, 0, 1]][None]  # candidate's descriptors are a permutation
        >>> everywhere = torch.ones(3, dtype=torch.bool)
        >>> match, valid = mutual_nearest_neighbours(q, everywhere, g, everywhere[None])
        >>> match.tolist(), valid.all().item()
        ([[1, 2, 0]], True)
    """
    if query_desc.ndim != 2 or gallery_desc.ndim != 3 or query_desc.shape[-1] != gallery_desc.shape[-1]:
        raise ValueError(
            f"expected query (M, D) and gallery (C, N, D), "
            f"got {tuple(query_desc.shape)} and {tuple(gallery_desc.shape)}"
        )
    similarity = torch.einsum("md,cnd->cmn", query_desc.float(), gallery_desc.float())
    pair_valid = query_mask[None, :, None] & gallery_mask[:, None, :]
    similarity = similarity.masked_fill(~pair_valid, float("-inf"))
    if ratio is not None and similarity.shape[2] >= 2:
        top2, top2_index = similarity.topk(2, dim=2)  # (C, M, 2)
        best_for_query = top2_index[..., 0]
        distances = torch.sqrt(torch.clamp(2.0 - 2.0 * top2, min=0.0))  # unit vectors: |a-b|^2 = 2 - 2 a.b
        distinctive = distances[..., 0] < ratio * distances[..., 1]  # an -inf second (padding) gives inf: kept
    else:
        best_for_query = similarity.argmax(dim=2)  # (C, M)
        distinctive = None
    best_for_gallery = similarity.argmax(dim=1)  # (C, N)
    mutual = best_for_gallery.gather(1, best_for_query) == torch.arange(query_desc.shape[0], device=query_desc.device)
    best_similarity = similarity.gather(2, best_for_query[..., None])[..., 0]
    valid = mutual & torch.isfinite(best_similarity)
    if min_similarity is not None:
        valid &= best_similarity >= min_similarity
    if distinctive is not None:
        valid &= distinctive
    return best_for_query, valid
