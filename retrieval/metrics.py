"""Ranking metrics, stated once (DESIGN.md "mAP@k, stated once").

For one query with R relevant products and the ranked list r_1..r_k:

    AP@k = (1 / min(R, k)) * sum_{i <= k} P(i) * rel(i),   P(i) = precision at rank i,

and mAP@k is the mean over queries. With R = 1 this is 1/rank when the product is in the top k,
else 0 (the PaintNet paper's Table 4 convention). A query with no relevant product in the gallery is
an error, not a zero: it would silently pull every number down.

Everything here is vectorised over queries: a (Q, K) boolean relevance matrix in, (Q,) scores out.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np
import pandas as pd
import torch


def relevance_matrix(ranked_ids: np.ndarray, query_ids: Sequence, ground_truth: pd.DataFrame) -> np.ndarray:
    """Mark which ranked products are relevant, by a join rather than a loop.

    Args:
        ranked_ids: (Q, K) product ids, best first, row q for query_ids[q]. Padding (None, "") never matches.
        query_ids: (Q,) query ids.
        ground_truth: table with columns query_id, product_id (several rows for several relevant products).

    Returns:
        (Q, K) bool.
    """
    ranked_ids = np.asarray(ranked_ids, dtype=object)
    n_queries, k = ranked_ids.shape
    ranked = pd.DataFrame(
        {
            "row": np.repeat(np.arange(n_queries), k),
            "rank": np.tile(np.arange(k), n_queries),
            "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
            "product_id": ranked_ids.ravel(),
        }
    )
    truth = ground_truth[["query_id", "product_id"]].drop_duplicates()
    hits = ranked.merge(truth, on=["query_id", "product_id"], how="inner")
    relevance = np.zeros((n_queries, k), dtype=bool)
    relevance[hits["row"].to_numpy(), hits["rank"].to_numpy()] = True
    return relevance


def count_relevant(query_ids: Sequence, ground_truth: pd.DataFrame, gallery_ids: Iterable) -> np.ndarray:
    """R per query: how many of its relevant products are in the gallery. Raises if any R is 0."""
    gallery = pd.Index(pd.unique(np.asarray(list(gallery_ids), dtype=object)))
    truth = ground_truth[["query_id", "product_id"]].drop_duplicates()
    truth = truth[truth["product_id"].isin(gallery)]
    counts = truth.groupby("query_id").size()
    n_relevant = counts.reindex(pd.Index(np.asarray(query_ids, dtype=object))).fillna(0).to_numpy(dtype=np.int64)
    missing = np.asarray(query_ids, dtype=object)[n_relevant == 0]
    if len(missing):
        raise ValueError(
            f"{len(missing)} queries have no relevant product in the gallery (e.g. {list(missing[:5])}); "
            "mAP would count them as zeros. Add their products to the catalog or drop those queries."
        )
    return n_relevant


def average_precision_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query.

    Shape:
        - relevance: (Q, K) bool, K >= k or the whole (shorter) gallery.
        - n_relevant: (Q,) int, R per query, >= 1.
        - Output: (Q,) float64 in [0, 1].

    Example:
        >>> average_precision_at_k(np.array([[False, True, False]]), np.array([1]), k=3)
        array([0.5])
    """
    _check(relevance, n_relevant, k)
    rel = relevance[:, :k].astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    return (precision * rel).sum(axis=1) / np.minimum(n_relevant, k)


def recall_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Fraction of a query's relevant products found in the top k (= hit rate when R = 1). (Q,)."""
    _check(relevance, n_relevant, k)
    return relevance[:, :k].sum(axis=1) / n_relevant


def top_k_accuracy(relevance: np.ndarray, k: int) -> np.ndarray:
    """Top-k accuracy per query: 1 when ANY relevant product is in the top k, else 0 (Q,).

    The headline of DeepFashion consumer-to-shop, DeepFashion2 retrieval and Exact Street2Shop (per
    category), as their papers report it; equal to recall@k when every query has one relevant product.

    Example:
        >>> top_k_accuracy(np.array([[False, True, True], [False, False, False]]), k=2)
        array([1., 0.])
    """
    if relevance.ndim != 2 or k < 1:
        raise ValueError(f"relevance must be (Q, K) and k >= 1; got {relevance.shape} and k={k}")
    return relevance[:, :k].any(axis=1).astype(np.float64)


def reciprocal_rank(relevance: np.ndarray) -> np.ndarray:
    """1 / rank of the first relevant product within the ranked list, 0 when none is there. (Q,)."""
    first = relevance.argmax(axis=1)
    found = relevance.any(axis=1)
    return np.where(found, 1.0 / (first + 1), 0.0)


def ranking_metrics(
    relevance: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10, 20)
) -> Dict[str, float]:
    """mAP@k, recall@k and acc@k (top-k accuracy) for each k, and MRR (within the ranked list), as a flat dict
    of means."""
    out: Dict[str, float] = {}
    for k in ks:
        out[f"mAP@{k}"] = float(average_precision_at_k(relevance, n_relevant, k).mean())
    for k in ks:
        out[f"recall@{k}"] = float(recall_at_k(relevance, n_relevant, k).mean())
    for k in ks:
        out[f"acc@{k}"] = float(top_k_accuracy(relevance, k).mean())
    out[f"MRR@{relevance.shape[1]}"] = float(reciprocal_rank(relevance).mean())
    return out


def _check(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> None:
    if relevance.ndim != 2 or len(relevance) != len(n_relevant):
        raise ValueError(
            f"relevance must be (Q, K) with Q = len(n_relevant); got {relevance.shape} and {len(n_relevant)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.any(np.asarray(n_relevant) < 1):
        raise ValueError("every query needs at least one relevant product (n_relevant >= 1)")


def rank_of_truth(similarity: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's single relevant item, ties counted against the query.

    The project's tie rule for scores it ranks itself (training validation): a gallery item scoring
    exactly as high as the true one ranks before it, so a tie never flatters a model. The benchmark
    scores the order its FAISS index returned, and FAISS orders equal scores arbitrarily (heap order),
    so this rank is the worst that order can give: validation never reports more than the bench would.

    Shape:
        - similarity: (Q, G) query-to-gallery similarities; truth: (Q,) gallery index of the relevant item.
        - Output: (Q,) long.

    Example:
        >>> rank_of_truth(torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.5, 0.1]]), torch.tensor([0, 1])).tolist()
        [2, 2]
    """
    true_score = similarity.gather(1, truth[:, None])
    return (similarity >= true_score).sum(dim=1)


def single_relevant_metrics(ranks: torch.Tensor, k: int = 20) -> Dict[str, float]:
    """recall@1 and mAP@k when each query has exactly one relevant product: AP@k = 1/rank if rank <= k, else 0.

    DESIGN.md's AP@k with R = 1 (`average_precision_at_k` computes the general case).

    Example:
        >>> single_relevant_metrics(torch.tensor([1, 2, 40]), k=20)
        {'recall@1': 0.3333333333333333, 'mAP@20': 0.5}
    """
    ranks = ranks.double()
    ap = torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))
    return {"recall@1": float((ranks == 1).double().mean()), f"mAP@{k}": float(ap.mean())}
