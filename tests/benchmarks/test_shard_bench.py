"""`street2shop bench-shards` end to end on a small catalog: both indexes measured in fresh processes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from street2shop.cli import cli

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def test_bench_shards_compares_the_on_disk_index_with_the_single_one(tmp_path):
    result = CliRunner().invoke(
        cli,
        ["bench-shards", "--n", "5000", "--dim", "32", "--shards", "3", "--queries", "100", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "shards.json").read_text())
    single, ondisk = report["single"], report["ondisk"]
    assert (single["layout"], ondisk["layout"]) == ("single", "ondisk")
    # Same preset, seed and search parameters: the same neighbours, so the same recall.
    assert ondisk["recall_at_k"] == single["recall_at_k"] > 0.8 and report["recall_gap"] == 0
    assert ondisk["shards_s"] > 0 and ondisk["disk_bytes"] > 0
    for row in (single, ondisk):
        assert row["cold_qps"] > 0 and row["warm_qps"] > 0 and 0 < row["rss_anon_mib"] <= row["vm_hwm_mib"]
    assert "3 shards merged on disk" in result.output and (tmp_path / "shards.md").is_file()
