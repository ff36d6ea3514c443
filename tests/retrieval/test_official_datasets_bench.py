"""`street2shop bench` end to end on tiny trees in the published layouts: colorhist finds the right products."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from street2shop.cli import cli
from tests.retrieval.official_layouts import (
    write_deepfashion2,
    write_deepfashion_c2s,
    write_lookbook,
    write_street2shop,
)

FORMATS = [
    ("deepfashion2", write_deepfashion2),
    ("deepfashion-c2s", write_deepfashion_c2s),
    ("street2shop", write_street2shop),
    ("lookbook", write_lookbook),
]


@pytest.mark.parametrize("fmt, writer", FORMATS, ids=[fmt for fmt, _ in FORMATS])
def test_bench_finds_the_cropped_garments(fmt, writer, tmp_path, monkeypatch):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    root = writer(tmp_path / fmt)
    out = tmp_path / "results"
    args = ["bench", "--dataset", f"{fmt}:{root}", "--descriptors", "colorhist", "--protocol-draws", "0"]
    result = CliRunner().invoke(cli, args + ["--bootstrap", "10", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "results.csv")
    assert summary["mAP@1"].tolist() == [1.0], result.output


def test_several_relevant_products_are_scored_as_design_md_map(tmp_path):
    """A query with R = 2 relevant products (two query rows): run_benchmark's AP@k is DESIGN.md's, with
    denominator min(R, k), as a plain loop over its ranking computes it."""
    from benchmarks.runner import run_benchmark
    from retrieval.datasets import load_dataset
    from tests.retrieval.test_metrics import ap_at_k_loop

    root = write_street2shop(tmp_path / "s2s")
    (root / "meta" / "json" / "test_pairs_skirts.json").write_text(
        '[{"photo": 1, "product": 103, "bbox": {"width": 40, "top": 12, "height": 50, "left": 10}}]'
    )
    data = load_dataset(f"street2shop:{root}", split="val", cache_dir=tmp_path / "cache")
    assert len(data.queries) == 3 and data.queries["query_id"].nunique() == 2
    result = run_benchmark(data, ["colorhist"], ks=(1, 2, 5), progress=False, protocol_draws=0, bootstrap=10)
    per_query = result.per_query.set_index("query_id")
    relevant = data.queries.groupby("query_id")["product_id"].apply(set)
    for query_id, row in per_query.iterrows():
        ranked = row["top5"].split(";")
        for k in (1, 2, 5):
            assert row[f"AP@{k}"] == pytest.approx(ap_at_k_loop(ranked, relevant[query_id], k)), (query_id, k)
    both = per_query.loc["1@10,12,40,50"]
    assert both["AP@5"] < 1.0 or set(both["top5"].split(";")[:2]) == {"101", "103"}
    expected = per_query["AP@5"].mean()
    assert result.summary["mAP@5"].iloc[0] == pytest.approx(expected)
