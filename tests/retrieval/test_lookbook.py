"""lookbook:ROOT on a tiny folder in the published naming (tests/retrieval/official_layouts.py)."""

from __future__ import annotations

import logging

import pytest

from retrieval.datasets import load_dataset
from tests.retrieval.official_layouts import write_lookbook


def _stems(paths):
    return [path.rsplit("/", 1)[1].rsplit(".", 1)[0] for path in paths]


def test_seeded_split_by_product_gallery_queries_and_training_pairs(tmp_path, caplog):
    root = write_lookbook(tmp_path / "lookbook")
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        data = load_dataset(f"lookbook:{root}", split="val", seed=0)
    assert list(data.catalog["product_id"]) == ["000002", "000002", "000003"]  # PID000002 has two CLEAN1 photos
    assert _stems(data.catalog["image"]) == [
        "PID000002_CLEAN1_IID000006",
        "PID000002_CLEAN1_IID000007",
        "PID000003_CLEAN1_IID000010",
    ]
    assert list(data.queries["query_id"]) == [
        "PID000002_CLEAN0_IID000008",
        "PID000002_CLEAN0_IID000009",
        "PID000003_CLEAN0_IID000011",
        "PID000003_CLEAN0_IID000012",
    ]
    assert list(data.queries["product_id"]) == ["000002", "000002", "000003", "000003"]
    assert _stems(data.queries["image"]) == list(data.queries["query_id"])
    assert "left out 1 products that have no CLEAN1 product photo (e.g. PID000009)" in caplog.text
    train = data.train
    assert list(train["product_id"]) == ["000000", "000000", "000001", "000001", "000004", "000004", "000005", "000005"]
    assert _stems(train["person_image"])[:2] == ["PID000000_CLEAN0_IID000001", "PID000000_CLEAN0_IID000002"]
    assert _stems(train["product_image"])[:2] == ["PID000000_CLEAN1_IID000000"] * 2
    assert train["parse"].tolist() == [None] * 8
    other = load_dataset(f"lookbook:{root}", split="train", seed=0)
    assert set(other.catalog["product_id"]) == {"000000", "000001", "000004", "000005"}
    assert load_dataset(f"lookbook:{root}", split="all").catalog["product_id"].nunique() == 6


def test_a_wrong_layout_shows_the_expected_names(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "shirt.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"(?s)any LookBook photo not found: .*PID<product>_CLEAN1_IID<image>"):
        load_dataset(f"lookbook:{tmp_path / 'photos'}")
    with pytest.raises(ValueError, match="expected lookbook:ROOT"):
        load_dataset("lookbook:")
