"""deepfashion-c2s:ROOT on a tiny tree in the published layout (tests/retrieval/official_layouts.py)."""

from __future__ import annotations

import logging

import pytest

from retrieval.datasets import load_dataset
from retrieval.io import read_image
from tests.retrieval.official_layouts import check_crops, write_deepfashion_c2s

ITEM1, ITEM2 = "img/TOPS/Summer_Wear/id_00000001/", "img/TROUSERS/Pants/id_00000002/"


def test_val_partition_gallery_queries_boxes_and_training_pairs(tmp_path, caplog):
    root = write_deepfashion_c2s(tmp_path / "c2s")
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        data = load_dataset(f"deepfashion-c2s:{root}", split="val", cache_dir=tmp_path / "cache")
    catalog, queries = data.catalog, data.queries
    assert list(catalog["product_id"]) == ["id_00000001", "id_00000001", "id_00000002"]
    assert [path[len(str(root.resolve())) + 1 :] for path in catalog["source_image"]] == [
        ITEM1 + "shop_01.jpg",
        ITEM1 + "shop_02.jpg",  # a second shop image of the same item: a second gallery row of its product
        ITEM2 + "shop_01.jpg",
    ]
    assert catalog[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[20, 5, 80, 75], [5, 5, 50, 60], [15, 15, 65, 70]]
    assert list(catalog["clothes_type"]) == [1, 1, 2]
    assert "2 products (3 images), 3 queries" in data.describe()
    assert list(queries["query_id"]) == [
        ITEM1 + "comsumer_01.jpg",
        ITEM2 + "comsumer_01.jpg",
        ITEM2 + "comsumer_02.jpg",
    ]
    assert list(queries["product_id"]) == ["id_00000001", "id_00000002", "id_00000002"]
    assert queries[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[10, 10, 60, 70], [30, 12, 90, 76], [0, 0, 40, 50]]
    check_crops(catalog)
    check_crops(queries)
    assert "left out" not in caplog.text
    train = data.train
    assert list(train["product_id"]) == ["id_00000004"]
    assert list(train["pair_id"]) == [
        "img/TOPS/Blouse/id_00000004/comsumer_01.jpg|img/TOPS/Blouse/id_00000004/shop_01.jpg"
    ]
    assert read_image(train["person_image"][0]).shape == (50, 50, 3)  # the consumer box (12, 14, 62, 64)
    assert read_image(train["product_image"][0]).shape == (60, 50, 3)  # the shop box (8, 8, 58, 68)
    assert train["parse"].tolist() == [None]


def test_test_and_all_splits(tmp_path):
    root = write_deepfashion_c2s(tmp_path / "c2s")
    test = load_dataset(f"deepfashion-c2s:{root}", split="test", cache_dir=tmp_path / "cache")
    assert list(test.catalog["product_id"]) == ["id_00000003"] and len(test.queries) == 1
    everything = load_dataset(f"deepfashion-c2s:{root}", split="all", cache_dir=tmp_path / "cache")
    assert (len(everything.catalog), everything.catalog["product_id"].nunique()) == (5, 4)
    assert everything.queries["query_id"].nunique() == 5 and everything.train is None
    with pytest.raises(ValueError, match="unknown split 'validation'; valid splits: val, test, train, all"):
        load_dataset(f"deepfashion-c2s:{root}", split="validation", cache_dir=tmp_path / "cache")


def test_a_wrong_layout_names_the_missing_file_and_shows_the_tree(tmp_path):
    root = write_deepfashion_c2s(tmp_path / "c2s")
    (root / ITEM2 / "comsumer_02.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)id_00000002/comsumer_02\.jpg.*Anno/list_bbox_consumer2shop"):
        load_dataset(f"deepfashion-c2s:{root}", cache_dir=tmp_path / "cache")
    bbox = root / "Anno" / "list_bbox_consumer2shop.txt"
    bbox.unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)Anno/list_bbox_consumer2shop\.txt not found.*ROOT/\n  Eval/"):
        load_dataset(f"deepfashion-c2s:{root}", cache_dir=tmp_path / "cache")
    bbox.write_text("1\nimage_name source_type\nimg/x.jpg 1\n")
    with pytest.raises(
        ValueError, match=r"list_bbox_consumer2shop\.txt:2: expected the header 'image_name clothes_type"
    ):
        load_dataset(f"deepfashion-c2s:{root}", cache_dir=tmp_path / "cache")
