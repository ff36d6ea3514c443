"""Evaluation protocols beyond "rank the whole gallery": the paper's 250-product draws, distractors.

The paper (PaintNet, Sec. 4.4) ranks each query against a gallery of 250 products. A single draw is
noisy, so we repeat seeded draws and report mean and spread. Sub-galleries are ranked exactly from
the query x gallery similarity matrix (brute force, chunked), not through an approximate index.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from retrieval.gallery import max_per_group


def relevant_ranks(
    query_vectors: np.ndarray,
    gallery_vectors: np.ndarray,
    relevant_index: np.ndarray,
    chunk: int = 1024,
    image_product: Optional[np.ndarray] = None,
    n_products: Optional[int] = None,
) -> np.ndarray:
    """Exact 1-based rank of each query's relevant product in the gallery (ties count against it).

    With ``image_product`` the gallery rows are images and a product scores its best image
    (`retrieval.gallery.max_per_group`).

    Shape:
        - query_vectors: (Q, D), gallery_vectors: (G, D), L2-normalised.
        - relevant_index: (Q,) column of the relevant product in the gallery (a product column with
          ``image_product``).
        - image_product: (G,) int product column of each gallery row, or None (one row per product);
          n_products: how many product columns then.
        - Output: (Q,) int.
    """
    ranks = np.empty(len(query_vectors), dtype=np.int64)
    for start in range(0, len(query_vectors), chunk):
        scores = query_vectors[start : start + chunk] @ gallery_vectors.T
        if image_product is not None:
            scores = max_per_group(scores, image_product, n_products)
        own = scores[np.arange(len(scores)), relevant_index[start : start + chunk]]
        # products scoring at least as high as the relevant one (itself included) = its rank
        ranks[start : start + chunk] = (scores >= own[:, None]).sum(axis=1)
    return ranks


def ap_from_rank(ranks: np.ndarray, k: int) -> np.ndarray:
    """AP@k for one relevant product per query: 1/rank within the top k, else 0 (DESIGN.md, R = 1)."""
    return np.where(ranks <= k, 1.0 / ranks, 0.0)


def sampled_gallery_protocol(
    query_vectors: np.ndarray,
    gallery_vectors: np.ndarray,
    query_products: Sequence[str],
    gallery_products: Sequence[str],
    gallery_size: int = 250,
    draws: int = 10,
    ks: Sequence[int] = (1, 5, 10, 20),
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's protocol: `draws` seeded galleries of `gallery_size` products; their queries ranked in them.

    Each draw picks `gallery_size` products among those that have queries, and evaluates every query
    of those products against that sub-gallery. Returns one row per draw (mAP@k, queries).
    ``gallery_products`` names the product of each gallery row; a product with several rows (images)
    is drawn with all of them and scored by its best image.
    """
    gallery_products = np.asarray(gallery_products, dtype=object)
    query_products = np.asarray(query_products, dtype=object)
    codes, products = pd.factorize(gallery_products)  # one code per product, several images may share it
    several = len(products) != len(gallery_products)
    column_of = {p: i for i, p in enumerate(products)}
    has_query = np.array(sorted({column_of[p] for p in query_products if p in column_of}))
    if len(has_query) < gallery_size:
        raise ValueError(f"only {len(has_query)} products have queries; cannot draw galleries of {gallery_size}")
    rng = np.random.default_rng(seed)
    rows: List[Dict] = []
    query_columns = np.array([column_of.get(p, -1) for p in query_products])
    for draw in range(draws):
        columns = np.sort(rng.choice(has_query, size=gallery_size, replace=False))
        position = np.full(len(products), -1)
        position[columns] = np.arange(gallery_size)
        chosen = np.flatnonzero((query_columns >= 0) & (position[np.maximum(query_columns, 0)] >= 0))
        relevant = position[query_columns[chosen]]
        if several:  # every image of the drawn products, each product scored by its best image
            images = np.flatnonzero(position[codes] >= 0)
            ranks = relevant_ranks(
                query_vectors[chosen],
                gallery_vectors[images],
                relevant,
                image_product=position[codes[images]],
                n_products=gallery_size,
            )
        else:
            ranks = relevant_ranks(query_vectors[chosen], gallery_vectors[columns], relevant)
        rows.append(
            {
                "draw": draw,
                "gallery": gallery_size,
                "queries": len(chosen),
                **{f"mAP@{k}": float(ap_from_rank(ranks, k).mean()) for k in ks},
            }
        )
    return pd.DataFrame(rows)


def summarise_draws(draws: pd.DataFrame, ks: Sequence[int] = (1, 5, 10, 20)) -> Dict[str, float]:
    """Mean and standard deviation over draws, as flat columns 'mAP@k' and 'mAP@k_std'."""
    out: Dict[str, float] = {}
    for k in ks:
        out[f"mAP@{k}"] = float(draws[f"mAP@{k}"].mean())
        out[f"mAP@{k}_std"] = float(draws[f"mAP@{k}"].std(ddof=1)) if len(draws) > 1 else 0.0
    return out
