"""Tests of index.tuning (the pure tuner functions) against a brute-force numpy reference, and of the preset
entries of index.presets that say what the tuner sweeps."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import index.presets as presets
import index.tuning as tuning
from index import ProductIndex, list_index_presets
from index.presets import IndexPlan, index_preset, plan_index, register_index_preset
from index.tuning import (
    _TUNING_K_FACTORS,
    SWEEPS,
    catalog_tuning_queries,
    faiss_search_params,
    nprobe_steps,
    recall_per_query,
    sweep_ivf,
    tune_search_params,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def unit_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny():
    """3,000 catalog vectors in 30 seeded clusters (16-d) and 200 fresh queries from the same clusters."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((30, 16))
    database = unit_rows(centres[rng.integers(0, 30, 3000)] + 0.4 * rng.standard_normal((3000, 16)))
    queries = unit_rows(centres[rng.integers(0, 30, 200)] + 0.4 * rng.standard_normal((200, 16)))
    return database, queries


def numpy_top_k(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k labels by brute force in numpy (the reference the tuner's recall is checked against)."""
    return np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :k]


def numpy_recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.array([len(set(f[f >= 0]) & set(e)) / len(e) for f, e in zip(found, exact)])


def built_index(factory: str, database: np.ndarray) -> faiss.Index:
    cpu_index = faiss.index_factory(database.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    cpu_index.train(database)
    cpu_index.add(database)
    return cpu_index


def test_recall_per_query_matches_sets():
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(40)])
    found = np.stack([rng.permutation(50)[:10] for _ in range(40)])
    found[::7, -3:] = -1  # faiss pads missing results with -1: never a hit
    np.testing.assert_allclose(recall_per_query(found, exact), numpy_recall(found, exact))
    assert recall_per_query(exact, exact).tolist() == [1.0] * 40


def test_catalog_tuning_queries_are_seeded_unit_vectors_near_their_sources(tiny):
    database, _ = tiny
    queries, cosine = catalog_tuning_queries(database, 300, seed=1)
    again, _ = catalog_tuning_queries(database, 300, seed=1)
    np.testing.assert_array_equal(queries, again)
    assert queries.shape == (300, 16) and queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # Each query sits at the catalog's median nearest-neighbour cosine from one catalog vector.
    nearest = np.sort(database @ database.T, axis=0)[-2]
    assert cosine == pytest.approx(np.median(nearest), abs=0.01)
    assert np.all((queries @ database.T).max(axis=1) >= cosine - 1e-4)  # its source is at least that close
    assert len(catalog_tuning_queries(database[:50], 1000, seed=0)[0]) == 50  # never more than N


@pytest.mark.parametrize("kind, factory", [("hnsw", "HNSW32,Flat"), ("ivf", "IVF64,PQ8x4fs,Refine(SQ8)")])
def test_tuned_setting_reaches_recall_at_10_against_numpy(kind, factory, tiny):
    database, queries = tiny
    cpu_index = built_index(factory, database)
    before = bytes(faiss.serialize_index(cpu_index))
    report = tune_search_params(cpu_index, kind, database, queries, target_recall=0.9, k=10)
    assert report["met"] and report["recall"] - 2 * report["recall_se"] >= 0.9
    assert report["queries"] == "caller's queries" and report["n_queries"] == 200 and report["k"] == 10
    swept = {"ivf": {"nprobe", "k_factor", "min_candidates"}, "hnsw": {"efSearch"}}[kind]
    assert set(report["search_params"]) == swept
    # The reported recall is the brute-force recall of the chosen setting on the same queries.
    params = faiss_search_params(kind, report["search_params"], 10)
    _, found = cpu_index.search(queries, 10, params=params)
    recall = numpy_recall(found, numpy_top_k(queries, database, 10))
    assert report["recall"] == pytest.approx(recall.mean(), abs=1e-5)
    # Pure: the tuner only searched the index (no nprobe / k_factor / efSearch left set on it).
    assert bytes(faiss.serialize_index(cpu_index)) == before


def test_tuning_on_catalog_queries_and_reconstructed_vectors(tiny):
    database, _ = tiny
    graph = built_index("HNSW32,Flat", database)
    report = tune_search_params(graph, "hnsw", None, None, target_recall=0.95, k=5, n_queries=150, seed=2)
    assert report["met"] and report["n_queries"] == 150
    assert report["queries"].startswith("catalog vectors moved off themselves to cosine")
    # efSearch sweeps upwards and stops at the first value that reaches the target.
    values = [row["efSearch"] for row in report["sweep"]]
    assert values == sorted(values) and report["search_params"]["efSearch"] == values[-1]


def test_sweep_ivf_walks_the_frontier(monkeypatch):
    """A made-up recall surface (grows with nprobe and re-rank depth) shows the walk, without timing noise."""
    monkeypatch.setattr(tuning, "faiss_search_params", lambda kind, params, k: dict(params))
    database = unit_rows(np.random.default_rng(1).standard_normal((2000, 8)))
    cpu_index = built_index("IVF32,PQ4x4fs,Refine(SQ8)", database)
    calls = []

    def measure(params):
        nprobe, k_factor = params["nprobe"], params["k_factor"]
        calls.append((nprobe, k_factor))
        return min(1.0, nprobe / 8) * min(1.0, k_factor / 6), 0.0, float(nprobe * (4 + k_factor))

    sweep, reaching = sweep_ivf(cpu_index, measure, target_recall=0.9, k=10)
    depths = [row["k_factor"] for row in sweep]
    probes = [row["nprobe"] for row in sweep]
    assert depths == sorted(depths, reverse=True) and depths[0] == 64
    assert probes == sorted(probes) and probes[0] == 1
    assert reaching and all(row["recall"] >= 0.9 for row in reaching)
    cheapest = min(reaching, key=lambda row: row["ms_per_query"])
    assert (cheapest["nprobe"], cheapest["k_factor"]) == (8, 6)  # full lists, shallowest full re-rank
    assert len(calls) == len(sweep) < len(nprobe_steps(32)) * len(_TUNING_K_FACTORS)


def test_flat_unknown_kind_and_tiny_index():
    flat = built_index("Flat", unit_rows(np.eye(4, dtype=np.float32)))
    report = tune_search_params(flat, "flat", None, None, target_recall=0.9, k=10)
    assert report["met"] and report["search_params"] == {} and report["recall"] == 1.0
    with pytest.raises(ValueError, match="flat, hnsw, ivf"):
        tune_search_params(flat, "lsh", None, None, target_recall=0.9, k=10)
    single = built_index("HNSW32,Flat", unit_rows(np.ones((1, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="at least 2"):
        tune_search_params(single, "hnsw", None, None, target_recall=0.9, k=10)


def test_tuning_grid_steps_by_1_5x():
    assert nprobe_steps(1) == [1] and nprobe_steps(3) == [1, 2, 3]
    assert nprobe_steps(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]
    assert nprobe_steps(2048)[-3:] == [1024, 1536, 2048]
    assert _TUNING_K_FACTORS == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


# ---- the preset entries --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list_index_presets())
def test_every_preset_names_the_sweep_of_the_index_it_builds(preset, tiny):
    """Contract over the preset registry: the sweep a preset declares is the one its index gets tuned with,
    and its fallback to Flat on a tiny catalog declares none."""
    database, _ = tiny
    entry = index_preset(preset)
    assert entry.name == preset and entry.description
    assert entry.sweep is None or entry.sweep in SWEEPS
    plan = plan_index(preset, database.shape[1], len(database))
    assert plan.preset == preset and plan.sweep == entry.sweep
    built = ProductIndex.build(database, [f"p{i}" for i in range(len(database))], preset=preset, target_recall=None)
    assert built._kind == (plan.sweep or "flat") and built.factory_string == plan.factory_string
    small = plan_index(preset, 16, 50)
    assert small.sweep == (None if small.factory_string == "Flat" else entry.sweep)


def test_a_new_preset_is_one_registration(monkeypatch, tiny):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # forgotten after the test

    @register_index_preset("hnsw8", "HNSW graph of 8 links per node (HNSW8,Flat)", sweep="hnsw")
    def plan_hnsw8(preset, dim, n_train):
        return IndexPlan(preset.name, "HNSW8,Flat", {"efSearch": 16}, sweep=preset.sweep)

    assert "hnsw8" in list_index_presets() and index_preset("hnsw8").approximate
    database, queries = tiny
    built = ProductIndex.build(database, [f"p{i}" for i in range(len(database))], preset="hnsw8", target_recall=0.9)
    assert built.factory_string == "HNSW8,Flat" and built.tuning["met"]
    assert set(built.search_params) == {"efSearch"}
    with pytest.raises(ValueError, match="registered twice"):
        register_index_preset("hnsw8", "again")(plan_hnsw8)
