"""street2shop:ROOT[,CATEGORY] on a tiny tree in the published layout (tests/retrieval/official_layouts.py)."""

from __future__ import annotations

import logging

import pytest

from retrieval.datasets import load_dataset
from retrieval.io import read_image
from tests.retrieval.official_layouts import check_crops, write_street2shop


def test_all_categories_gallery_queries_boxes_and_training_pairs(tmp_path, caplog):
    root = write_street2shop(tmp_path / "s2s")
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        data = load_dataset(f"street2shop:{root}", split="val", cache_dir=tmp_path / "cache")
    catalog, queries = data.catalog, data.queries
    assert list(catalog["product_id"]) == ["101", "101", "102", "105", "103", "104"]  # 101 has two shop photos
    assert list(catalog["category"]) == ["dresses", "dresses", "dresses", "dresses", "skirts", "skirts"]
    assert [path.rsplit("/", 1)[1] for path in catalog["image"]] == [
        "11.jpg",
        "12.jpg",
        "13.jpg",
        "16.jpg",
        "14.jpg",
        "15.jpg",
    ]
    assert "5 products (6 images), 3 queries" in data.describe()
    assert list(catalog["image"]) == list(catalog["source_image"])  # shop photos are not cropped
    assert list(queries["query_id"]) == ["1@10,12,40,50", "2@40,5,50,60", "2@5,20,30,50"]
    assert list(queries["product_id"]) == ["101", "102", "103"]
    assert queries[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[10, 12, 50, 62], [40, 5, 90, 65], [5, 20, 35, 70]]
    check_crops(queries)
    assert "extra shop images" not in caplog.text  # photo 12 of product 101 is kept
    assert "left out 1 street rows whose photo is not under images/ (e.g. photo 9)" in caplog.text
    train = data.train
    assert list(train["pair_id"]) == ["4@15,15,45,55/105", "3@20,10,55,60/104"]
    assert read_image(train["person_image"][0]).shape == (55, 45, 3)
    assert train["product_image"][0].endswith("/images/16.jpg") and train["mask"].tolist() == [None, None]


def test_one_category_and_several_relevant_products(tmp_path):
    root = write_street2shop(tmp_path / "s2s")
    skirts = load_dataset(f"street2shop:{root},skirts", split="val", cache_dir=tmp_path / "cache")
    assert list(skirts.catalog["product_id"]) == ["103", "104"] and list(skirts.queries["product_id"]) == ["103"]
    assert skirts.name.endswith(",skirts [val]")
    # The same street photo and box listed with two products: one query, two relevant products (two rows).
    lists = root / "meta" / "json"
    (lists / "test_pairs_skirts.json").write_text(
        '[{"photo": 1, "product": 103, "bbox": {"width": 40, "top": 12, "height": 50, "left": 10}}]'
    )
    data = load_dataset(f"street2shop:{root}", split="val", cache_dir=tmp_path / "cache")
    rows = data.queries[data.queries["query_id"] == "1@10,12,40,50"]
    assert list(rows["product_id"]) == ["101", "103"] and rows["image"].nunique() == 1
    with pytest.raises(ValueError, match="unknown category 'hat'; the categories: bags, belts"):
        load_dataset(f"street2shop:{root},hat", cache_dir=tmp_path / "cache")


def test_a_wrong_layout_names_the_missing_file_and_shows_the_tree(tmp_path):
    root = write_street2shop(tmp_path / "s2s")
    (root / "meta" / "json" / "test_pairs_skirts.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"(?s)test_pairs_skirts\.json not found: .*ROOT/\n  meta/json/retrieval"
    ):
        load_dataset(f"street2shop:{root}", cache_dir=tmp_path / "cache")
    for name in ("retrieval_dresses.json", "retrieval_skirts.json"):
        (root / "meta" / "json" / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"a category's retrieval list not found: .*retrieval_<category>\.json"):
        load_dataset(f"street2shop:{root}", cache_dir=tmp_path / "cache")
