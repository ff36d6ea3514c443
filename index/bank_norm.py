"""Query-bank normalisation: per-product score offsets that demote "hub" products, and the exact search with them.

Some catalog vectors (hubs) sit close to many queries at once and crowd the top of rankings they do not belong
in; street photos, blurred and small, make it worse. The inverted softmax (Smith et al. 2017, "Offline
bilingual word vectors"; Bogolin et al. 2022, "Cross Modal Retrieval with Querybank Normalisation") scores a
query q against product g as exp(beta s(q, g)) / sum_b exp(beta s(b, g)) over a bank of typical queries b
(photos of the training split, never the evaluated ones), so a product close to many bank queries is demoted.
Ranking by that is ranking by ``s(q, g) - o(g)`` with the per-product offset

    o(g) = (1 / beta) log mean_b exp(beta s(b, g))

(a log-mean-exp: the bank's size does not shift the scores). The offsets are computed once per catalog vector
(`bank_offsets`), so a query costs one ordinary inner-product search whose candidates are re-sorted
(`offset_topk`, exact: it searches deeper until no product outside the candidates can reach the top k).
No library ships this for FAISS indexes, hence this module.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from .arrays import as_matrix, check_k

# chosen for a 1,500-photo bank on the even half of the validation queries, from 5/10/20/30/50 (README, query bank);
# a larger bank wants a larger beta: recipe street's whole training split (3,639 photos) takes 15
DEFAULT_BANK_BETA = 10.0
DEFAULT_BANK_SIZE = 1500  # photos drawn from each bank source; 0 takes all of its training split
_CHUNK = 2048  # catalog vectors per (chunk, bank) similarity block: 2048 x 4000 float32 is 33 MB


def bank_offsets(vectors: np.ndarray, bank: np.ndarray, beta: float = DEFAULT_BANK_BETA) -> np.ndarray:
    """The inverted-softmax offset of each catalog vector against a bank of query vectors.

    Both sides are L2-normalised first (as `ProductIndex` scores them), so ``s`` is the cosine.

    Args:
        vectors: catalog vectors, one per indexed image.
        bank: vectors of typical queries (embedded exactly as queries are: proxy, then descriptor).
        beta: inverse temperature; large beta approaches the bank's best similarity, small beta its mean.

    Shape:
        - vectors: :math:`(N, D)`; bank: :math:`(B, D)`.
        - Output: :math:`(N,)` float32.

    Raises:
        ValueError: bad matrices (`index.arrays.as_matrix`), an empty bank, different dims, beta <= 0.

    Example:
        >>> catalog = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> [round(float(o), 4) for o in bank_offsets(catalog, bank, beta=1.0)]  # log((2e + 1) / 3), log((2 + e) / 3)
        [0.7634, 0.4528]
    """
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    vectors = as_matrix(vectors, "catalog vectors", allow_empty=True)
    bank = as_matrix(bank, "query-bank vectors")
    if vectors.shape[1] != bank.shape[1]:
        raise ValueError(
            f"the query bank has dim {bank.shape[1]} but the catalog vectors {vectors.shape[1]}: embed the bank with "
            "the catalog's descriptor"
        )
    offsets = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), _CHUNK):
        logits = beta * (vectors[start : start + _CHUNK] @ bank.T)  # (chunk, B)
        peak = logits.max(axis=1, keepdims=True)
        mean_exp = np.exp(logits - peak).mean(axis=1)
        offsets[start : start + _CHUNK] = (peak[:, 0] + np.log(mean_exp)) / beta
    return offsets


def offset_topk(
    search: Callable[[np.ndarray, int], Tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    k: int,
    offsets: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray]:
    """The top ``k`` by ``score - offsets[label]``, exact with respect to ``search``'s ranking.

    ``search(queries, depth)`` returns the raw top ``depth`` (scores, labels; label -1 for none, score -inf).
    A product not among a query's ``depth`` candidates scores at most the depth-th raw score minus the smallest
    offset; when the k-th corrected score beats that bound, no unseen product can enter the top k. Rows that do
    not pass are searched again four times deeper, up to the whole catalog.

    Shape:
        - queries: :math:`(Q, D)`; offsets: :math:`(N,)`, one per label.
        - Output: corrected scores :math:`(Q, K)` float32 (``-inf`` where nothing was found) and labels
          :math:`(Q, K)` int64, :math:`K = \\min(k, N)`.
    """
    k = check_k(k)
    offsets = np.asarray(offsets, dtype=np.float32)
    total = len(offsets)
    if total == 0:
        raise ValueError("cannot search an empty index: add products first")
    k = min(k, total)
    lowest = float(offsets.min())
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_labels = np.full((len(queries), k), -1, dtype=np.int64)
    pending = np.arange(len(queries))
    depth = min(total, max(2 * k, k + 32))
    while len(pending):
        scores, labels = search(queries[pending], depth)
        found = labels >= 0
        corrected = np.where(found, scores - offsets[np.where(found, labels, 0)], -np.inf).astype(np.float32)
        order = np.argsort(-corrected, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(corrected, order, axis=1)
        # exhausted: the whole catalog was searched, or the index found fewer than depth (it has no more to give)
        exhausted = (depth >= total) | ~found[:, -1]
        bound = np.where(found[:, -1], scores[:, -1], -np.inf) - lowest
        done = exhausted | (best[:, -1] >= bound)
        out_scores[pending[done]] = best[done]
        out_labels[pending[done]] = np.where(np.isfinite(best[done]), np.take_along_axis(labels, order, 1)[done], -1)
        pending = pending[~done]
        depth = min(total, depth * 4)
    return out_scores, out_labels
