"""Behaviour guard for refactors: a small fixed grid's rankings and scores, frozen in tests/golden/.

What is frozen (all seeded, no training needed):
- ``bench_ranks.csv``: `run_benchmark` on the 24-product synthetic set, every descriptor that needs no
  training behind the `none` proxy, flat index: each query's rank of its product and its top 5.
- ``engine_top5.csv``: `build_index` + `Searcher` (the app path) for gem and sift: top 5 ids and scores.
- ``index_top10.csv``: every index preset on 3,000 seeded clustered vectors (enough for ivfpq and hnsw
  to be themselves, not their small-set fallback), untuned, one faiss thread: top 10 ids and scores of
  20 queries.

A code move must leave these identical: ids exactly, scores to 1e-4 (BLAS kernels differ in the last
digits between CPUs). A change that is meant to alter results regenerates them, and its commit says why:

    STREET2SHOP_REGENERATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.runner import run_benchmark
from index import ProductIndex, list_index_presets
from retrieval.datasets import load_dataset
from retrieval.descriptors import create_descriptor
from street2shop.engine import Searcher, build_index

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("STREET2SHOP_REGENERATE_GOLDEN") == "1"
UNTRAINED_DESCRIPTORS = ("colorhist", "sift", "rmac", "gem", "surf")
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def grid_set(synthetic_root):
    return load_dataset(f"viton:{synthetic_root}", split="all")


def check_against_golden(name: str, frame: pd.DataFrame, score_columns=()) -> None:
    """Compare ``frame`` with tests/golden/NAME (or write it there when regenerating)."""
    path = GOLDEN / name
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        frame.to_csv(path, index=False, float_format="%.6f")
        pytest.skip(f"regenerated {path}")
    expected = pd.read_csv(path, dtype=str, keep_default_na=False)
    actual = pd.read_csv(
        pd.io.common.StringIO(frame.to_csv(index=False, float_format="%.6f")), dtype=str, keep_default_na=False
    )
    assert list(actual.columns) == list(expected.columns)
    assert len(actual) == len(expected), f"{name}: {len(actual)} rows, golden has {len(expected)}"
    exact = [c for c in expected.columns if c not in score_columns]
    mismatch = (actual[exact] != expected[exact]).any(axis=1)
    assert not mismatch.any(), (
        f"{name}: rows differ from the golden file:\n{actual[mismatch].head()}\ngolden:\n{expected[mismatch].head()}"
    )
    for column in score_columns:
        got = np.array([[float(v) for v in s.split(";")] for s in actual[column]])
        want = np.array([[float(v) for v in s.split(";")] for s in expected[column]])
        np.testing.assert_allclose(got, want, atol=SCORE_TOLERANCE, rtol=0, err_msg=f"{name}: {column}")


def joined(values, fmt="{}") -> str:
    return ";".join(fmt.format(v) for v in values)


def test_bench_rankings_unchanged(grid_set):
    result = run_benchmark(
        grid_set,
        list(UNTRAINED_DESCRIPTORS),
        ["none"],
        presets=("flat",),
        ks=(1, 5, 10),
        progress=False,
        protocol_draws=0,
        bootstrap=0,
    )
    frame = result.per_query[["proxy", "descriptor", "index", "query_id", "product_id", "rank", "top5"]]
    check_against_golden("bench_ranks.csv", frame.astype(str))


@pytest.mark.parametrize("descriptor_name", ["gem", "sift"])
def test_engine_results_unchanged(grid_set, tmp_path, descriptor_name):
    descriptor = create_descriptor(descriptor_name).eval()
    build_index(grid_set.catalog, descriptor, tmp_path / "index", progress=False)
    queries = grid_set.queries.drop_duplicates("query_id").head(12)
    results = Searcher(tmp_path / "index", device="cpu").search(list(queries["image"]), k=5)
    rows = [
        {"query_id": query_id, "top5": joined(group["product_id"]), "scores": joined(group["score"], "{:.6f}")}
        for query_id, (_, group) in zip(queries["query_id"], results.groupby("query", sort=False))
    ]
    check_against_golden(f"engine_top5_{descriptor_name}.csv", pd.DataFrame(rows), score_columns=("scores",))


def test_index_presets_unchanged(one_faiss_thread):  # HNSW's graph depends on thread interleaving
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 32))
    vectors = (centres[rng.integers(0, 30, 3000)] + 0.35 * rng.standard_normal((3000, 32))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(3000, 20, replace=False)] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = [f"p{i:05d}" for i in range(3000)]
    rows = []
    for preset in list_index_presets():
        # Untuned: the tuner keeps the *fastest* setting that reaches its recall target, which is a
        # matter of timing; the presets' default search parameters are a matter of code.
        index = ProductIndex.build(vectors, ids, preset=preset, device="cpu", target_recall=None)
        scores, found = index.search(queries, 10)
        rows += [
            {"preset": preset, "query": q, "top10": joined(found[q]), "scores": joined(scores[q], "{:.6f}")}
            for q in range(len(queries))
        ]
    check_against_golden("index_top10.csv", pd.DataFrame(rows), score_columns=("scores",))
