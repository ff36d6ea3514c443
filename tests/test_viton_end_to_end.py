"""Slow: the whole bench path on real VITON pairs (pytest -m slow; skipped, saying why, without the data).

Chance level on a 200-product gallery is mAP@20 = (1/200) * sum_{r<=20} 1/r = 0.018. Measured on this seeded
subset: colorhist 0.412, gem 0.347; the floors (0.30, 0.25) leave room for numeric drift and are far above
chance, so the test fails on a broken pipeline, not on noise.
"""

import pytest

from benchmarks.runner import run_benchmark
from retrieval.datasets import load_viton, subset_products

pytestmark = [pytest.mark.slow, pytest.mark.viton]


def test_real_pairs_score_well_above_chance(viton_root, tmp_path):
    data = subset_products(load_viton(viton_root, split="val"), 200, seed=0)
    result = run_benchmark(
        data,
        ["colorhist", "gem"],
        ["none"],
        ks=(1, 20),
        progress=False,
        cache_dir=tmp_path,
        fit_max_images=200,
        protocol_draws=0,
        bootstrap=200,
    )
    scores = result.summary.set_index("descriptor")["mAP@20"]
    assert len(result.per_query) == 2 * len(data.queries.drop_duplicates("query_id"))
    assert scores["colorhist"] > 0.30 and scores["gem"] > 0.25, scores
