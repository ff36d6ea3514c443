"""mAP@k against hand-computed rankings and a plain-loop reference."""

import numpy as np
import pandas as pd
import pytest

from retrieval.metrics import (
    average_precision_at_k,
    count_relevant,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
    relevance_matrix,
    top_k_accuracy,
)


def ap_at_k_loop(ranked, relevant, k):
    """The definition, written as plainly as possible."""
    hits, total = 0, 0.0
    for i, product in enumerate(ranked[:k], start=1):
        if product in relevant:
            hits += 1
            total += hits / i
    return total / min(len(relevant), k)


def test_hand_computed_two_relevant():
    # ranked a x b y, relevant {a, b}: P(1) = 1, P(3) = 2/3.
    ranked = np.array([["a", "x", "b", "y"]], dtype=object)
    truth = pd.DataFrame({"query_id": ["q", "q"], "product_id": ["a", "b"]})
    relevance = relevance_matrix(ranked, ["q"], truth)
    assert relevance.tolist() == [[True, False, True, False]]
    n_relevant = np.array([2])
    assert average_precision_at_k(relevance, n_relevant, 1) == pytest.approx([1.0])
    assert average_precision_at_k(relevance, n_relevant, 2) == pytest.approx([0.5])  # (1) / min(2, 2)
    assert average_precision_at_k(relevance, n_relevant, 4) == pytest.approx([(1 + 2 / 3) / 2])
    assert recall_at_k(relevance, n_relevant, 2) == pytest.approx([0.5])
    assert reciprocal_rank(relevance) == pytest.approx([1.0])


def test_single_relevant_is_reciprocal_rank_within_k():
    # R = 1: AP@k = 1/rank if rank <= k else 0 (PaintNet's convention).
    relevance = np.zeros((3, 20), dtype=bool)
    relevance[0, 0] = True
    relevance[1, 4] = True
    relevance[2, 15] = True
    n_relevant = np.ones(3, dtype=int)
    assert average_precision_at_k(relevance, n_relevant, 10) == pytest.approx([1.0, 0.2, 0.0])
    assert average_precision_at_k(relevance, n_relevant, 20) == pytest.approx([1.0, 0.2, 1 / 16])
    metrics = ranking_metrics(relevance, n_relevant, ks=(1, 5))
    assert metrics["mAP@1"] == pytest.approx(1 / 3)
    assert metrics["mAP@5"] == pytest.approx((1 + 0.2) / 3)
    assert metrics["recall@5"] == pytest.approx(2 / 3)


def test_matches_plain_loop_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    products = np.array([f"p{i}" for i in range(30)], dtype=object)
    n_queries, k = 50, 20
    ranked = np.stack([rng.permutation(products)[:k] for _ in range(n_queries)])
    rows = []
    relevant_sets = []
    for q in range(n_queries):
        relevant = set(rng.choice(products, size=rng.integers(1, 5), replace=False))
        relevant_sets.append(relevant)
        rows += [{"query_id": f"q{q}", "product_id": p} for p in relevant]
    truth = pd.DataFrame(rows)
    query_ids = [f"q{q}" for q in range(n_queries)]
    relevance = relevance_matrix(ranked, query_ids, truth)
    n_relevant = count_relevant(query_ids, truth, products)
    for cut in (1, 5, 10, 20):
        expected = [ap_at_k_loop(list(ranked[q]), relevant_sets[q], cut) for q in range(n_queries)]
        assert average_precision_at_k(relevance, n_relevant, cut) == pytest.approx(expected)
        # top-k accuracy: a query counts when any of its relevant products is in its top k
        hits = []
        for q in range(n_queries):
            found = 0.0
            for product in ranked[q][:cut]:
                if product in relevant_sets[q]:
                    found = 1.0
                    break
            hits.append(found)
        assert top_k_accuracy(relevance, cut).tolist() == hits
        assert ranking_metrics(relevance, n_relevant, (cut,))[f"acc@{cut}"] == pytest.approx(np.mean(hits))


def test_query_without_relevant_product_in_gallery_is_an_error():
    truth = pd.DataFrame({"query_id": ["q1", "q2"], "product_id": ["a", "zzz"]})
    with pytest.raises(ValueError, match="no relevant product"):
        count_relevant(["q1", "q2"], truth, ["a", "b"])


def test_short_gallery_and_padding_never_match():
    ranked = np.array([["a", None]], dtype=object)
    truth = pd.DataFrame({"query_id": ["q"], "product_id": ["a"]})
    relevance = relevance_matrix(ranked, ["q"], truth)
    assert average_precision_at_k(relevance, np.array([1]), 20) == pytest.approx([1.0])
