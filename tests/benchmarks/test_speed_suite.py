"""Tests of the index benchmarks (benchmarks.search_speed, benchmarks.speed_suite): the descriptor-like
test vectors and smoke runs of the speed tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.search_speed import flat_search_speed, format_speed_table
from benchmarks.speed_suite import (
    BOUND_ROW,
    NUMPY_ROW,
    descriptor_like_vectors,
    format_speed_suite,
    index_speed_suite,
    write_speed_suite,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def test_search_speed_smoke():
    result = flat_search_speed(n=3000, dim=32, n_queries=40, k=5, n_single=5, bandwidth_bytes=1 << 22)
    assert result["numpy_topk_agreement"] >= 0.99  # float rounding may swap near-ties
    assert result["batched_qps"] > 0 and result["single_p99_ms"] >= result["single_p50_ms"]
    assert "queries/s" in format_speed_table(result)


def test_descriptor_like_vectors_are_seeded_clustered_unit_vectors():
    vectors, labels = descriptor_like_vectors(3000, 64, n_centres=30, seed=1)
    again, _ = descriptor_like_vectors(3000, 64, n_centres=30, seed=1)
    np.testing.assert_array_equal(vectors, again)
    assert vectors.shape == (3000, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarities = vectors[:300] @ vectors.T
    same = labels[:300, None] == labels[None, :]
    assert similarities[same].mean() > 0.5 > 0.1 > abs(similarities[~same].mean())
    # Power-law spectrum: a handful of directions carry most of the variance, unlike uniform noise.
    eigenvalues = np.linalg.eigvalsh(np.cov(vectors.T))[::-1]
    assert eigenvalues[:8].sum() / eigenvalues.sum() > 0.5


def test_index_speed_suite_smoke(tmp_path):
    frame = index_speed_suite(
        sizes=(3000,),
        dim=32,
        presets=("ivfpq", "hnsw"),
        n_queries=100,
        n_single=5,
        bandwidth_bytes=1 << 22,
        sgemm_size=128,
    )
    assert frame["preset"].tolist() == ["flat", BOUND_ROW, NUMPY_ROW, "ivfpq", "hnsw"]
    rows = frame.set_index("preset")
    assert rows.loc["flat", "recall_at_k"] == 1.0 and rows.loc[NUMPY_ROW, "recall_at_k"] >= 0.99
    assert rows.loc["ivfpq", "memory_vs_flat"] < 0.5 and rows.loc["ivfpq", "recall_at_k"] >= 0.9
    assert (rows.loc[["flat", "ivfpq", "hnsw"], "p99_ms"] >= rows.loc[["flat", "ivfpq", "hnsw"], "p50_ms"]).all()
    assert rows["gpu_qps"].isna().all() or frame["gpus"].iloc[0] > 0
    text = format_speed_suite(frame)
    assert "QPS batched" in text and "ONE faiss thread" in text and "N = 3,000" in text
    csv_path, md_path = write_speed_suite(frame, tmp_path)
    assert len(pd.read_csv(csv_path)) == len(frame) and md_path.read_text().count("| ivfpq |") == 1
