"""Query-bank normalisation (index.bank_norm): offsets against a plain-loop reference, and the offset search
against a brute-force ranking, through ProductIndex."""

from __future__ import annotations

import math

import numpy as np
import pytest

import index.bank_norm as bank_norm
from index import ProductIndex
from index.bank_norm import bank_offsets, offset_topk


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_offsets_are_the_hand_computed_log_mean_exp():
    catalog = np.array([[1.0, 0.0], [0.0, 2.0]])  # not normalised: offsets use cosines, as the index scores
    bank = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    offsets = bank_offsets(catalog, bank, beta=1.0)
    np.testing.assert_allclose(offsets, [math.log((2 * math.e + 1) / 3), math.log((2 + math.e) / 3)], rtol=1e-6)


def test_offsets_match_a_plain_loop_in_chunks(monkeypatch):
    monkeypatch.setattr(bank_norm, "_CHUNK", 7)  # several chunks, the last one short
    rng = np.random.default_rng(0)
    catalog, bank = normalised(rng.standard_normal((30, 8))), normalised(rng.standard_normal((11, 8)))
    beta = 20.0
    expected = [
        math.log(sum(math.exp(beta * float(g @ b)) for b in bank) / len(bank)) / beta for g in catalog
    ]  # no max-shift: fine at these magnitudes
    np.testing.assert_allclose(bank_offsets(catalog, bank, beta), expected, rtol=1e-5, atol=1e-6)


def test_large_beta_tends_to_the_best_bank_similarity_without_overflow():
    rng = np.random.default_rng(1)
    catalog, bank = normalised(rng.standard_normal((5, 4))), normalised(rng.standard_normal((9, 4)))
    offsets = bank_offsets(catalog, bank, beta=1e4)
    assert np.isfinite(offsets).all()
    np.testing.assert_allclose(offsets, (catalog @ bank.T).max(axis=1), atol=1e-3)


@pytest.mark.parametrize(
    "catalog, bank, beta, message",
    [
        (np.ones((3, 4)), np.ones((2, 5)), 20.0, "dim 5"),
        (np.ones((3, 4)), np.ones((0, 4)), 20.0, "no rows"),
        (np.ones((3, 4)), np.ones((2, 4)), 0.0, "beta"),
        (np.ones((3, 4)), np.ones((2, 4)), float("nan"), "beta"),
    ],
)
def test_bad_banks_are_refused(catalog, bank, beta, message):
    with pytest.raises(ValueError, match=message):
        bank_offsets(catalog, bank, beta)


@pytest.mark.parametrize("k", [1, 5, 60])
def test_offset_search_equals_brute_force_even_when_offsets_reorder_deeply(k):
    rng = np.random.default_rng(2)
    catalog, queries = normalised(rng.standard_normal((60, 16))), normalised(rng.standard_normal((9, 16)))
    offsets = rng.uniform(-1.0, 1.0, size=60).astype(np.float32)  # spread wider than the cosines: deep searches
    ids = [f"p{i}" for i in range(60)]
    scores, found = ProductIndex.build(catalog, ids, preset="flat").search(queries, k, offsets=offsets)
    corrected = queries @ catalog.T - offsets[None, :]
    order = np.argsort(-corrected, axis=1, kind="stable")[:, :k]
    assert found.tolist() == [[ids[j] for j in row] for row in order]
    np.testing.assert_allclose(scores, np.take_along_axis(corrected, order, axis=1), atol=1e-5)


def test_offset_search_stops_early_when_the_bound_proves_the_top_k():
    depths = []
    catalog = normalised(np.eye(50, 8, dtype=np.float32) + 0.01)

    def search(queries, depth):
        depths.append(depth)
        scores = queries @ catalog.T
        labels = np.argsort(-scores, axis=1)[:, :depth]
        return np.take_along_axis(scores, labels, axis=1), labels

    offsets = np.zeros(50, dtype=np.float32)  # no reordering: the first search proves itself
    offset_topk(search, catalog[:3], 2, offsets)
    assert depths == [34]  # max(2k, k + 32)


def test_offset_search_keeps_missing_slots_of_an_approximate_index_empty():
    def search(queries, depth):  # an index that finds only 2 products, whatever the depth
        scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), depth), -1, dtype=np.int64)
        scores[:, :2], labels[:, :2] = [0.9, 0.5], [3, 1]
        return scores, labels

    scores, labels = offset_topk(search, np.ones((1, 4), np.float32), 3, np.array([0, 0.6, 0, 0.0], np.float32))
    assert labels.tolist() == [[3, 1, -1]]
    np.testing.assert_allclose(scores[0, :2], [0.9, -0.1], atol=1e-6)
    assert scores[0, 2] == -np.inf


def test_product_index_refuses_offsets_that_do_not_cover_its_products():
    catalog = normalised(np.random.default_rng(3).standard_normal((10, 4)))
    built = ProductIndex.build(catalog, [f"p{i}" for i in range(10)], preset="flat")
    with pytest.raises(ValueError, match="10 finite numbers"):
        built.search(catalog[:1], 3, offsets=np.zeros(9))
    with pytest.raises(ValueError, match="10 finite numbers"):
        built.search(catalog[:1], 3, offsets=np.full(10, np.nan))
