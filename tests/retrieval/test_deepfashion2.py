"""deepfashion2:ROOT on a tiny tree in the published layout (tests/retrieval/official_layouts.py)."""

from __future__ import annotations

import json
import logging

import pytest

from retrieval.datasets import load_dataset
from retrieval.io import read_image
from tests.retrieval.official_layouts import DEEPFASHION2_IMAGES, check_crops, write_deepfashion2


def test_validation_partition_gallery_queries_boxes_and_training_pairs(tmp_path, caplog):
    root = write_deepfashion2(tmp_path / "df2")
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        data = load_dataset(f"deepfashion2:{root}", split="val", cache_dir=tmp_path / "cache")
    assert data.name == f"deepfashion2:{root.resolve()} [val]"
    catalog = data.catalog
    # pair 1 style 1 has two shop images (000002 and 000003): both are gallery rows of one product
    assert list(catalog["product_id"]) == [
        "pair1-style1",
        "pair1-style2",
        "pair1-style1",
        "pair2-style1",
        "pair2-style0-000005-item2",
    ]
    assert [name.rsplit("/", 3)[-3:] for name in catalog["source_image"]] == [
        ["validation", "image", "000002.jpg"],
        ["validation", "image", "000002.jpg"],
        ["validation", "image", "000003.jpg"],
        ["validation", "image", "000005.jpg"],
        ["validation", "image", "000005.jpg"],
    ]
    assert catalog[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [
        [5, 5, 45, 55],
        [50, 10, 95, 75],
        [20, 20, 60, 70],
        [8, 8, 56, 70],
        [60, 30, 96, 78],
    ]
    assert list(catalog["category_id"]) == [1, 10, 1, 10, 7]
    assert "4 products (5 images), 3 queries" in data.describe()
    queries = data.queries
    assert list(queries["query_id"]) == ["000001-item1", "000004-item1", "000006-item1"]
    assert list(queries["product_id"]) == ["pair1-style1", "pair2-style1", "pair1-style2"]
    assert queries[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [
        [10, 12, 50, 60],
        [30, 8, 80, 70],
        [15, 10, 70, 72],
    ]
    check_crops(catalog)
    check_crops(queries)
    # The user item of pair 3 (no shop item) is dropped, with a warning; no shop image is left out.
    assert "dropped 1 query rows" in caplog.text and "left out" not in caplog.text
    train = data.train
    assert list(train["pair_id"]) == ["000001-item1"] and list(train["product_id"]) == ["pair1-style1"]
    assert train["parse"].tolist() == [None] and train["mask"].tolist() == [None]
    person, product = read_image(train["person_image"][0]), read_image(train["product_image"][0])
    assert person.shape == (50, 40, 3) and product.shape == (60, 50, 3)  # the train partition's F boxes


def test_all_pools_the_partitions_with_prefixed_ids(tmp_path):
    root = write_deepfashion2(tmp_path / "df2")
    data = load_dataset(f"deepfashion2:{root}", split="all", cache_dir=tmp_path / "cache")
    assert "train/pair1-style1" in set(data.catalog["product_id"]) and data.train is None
    assert set(data.queries["query_id"]) == {
        "train/000001-item1",
        "validation/000001-item1",
        "validation/000004-item1",
        "validation/000006-item1",
    }


def test_a_wrong_layout_names_the_missing_file_and_shows_the_tree(tmp_path):
    root = write_deepfashion2(tmp_path / "df2")
    (root / "validation" / "image" / "000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)validation/image/000004\.jpg.*annos/NNNNNN\.json"):
        load_dataset(f"deepfashion2:{root}", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"(?s)root directory not found: .*nowhere; expected .*ROOT/"):
        load_dataset(f"deepfashion2:{tmp_path / 'nowhere'}", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)annotation folder not found: .*empty/validation/annos.*ROOT/"):
        load_dataset(f"deepfashion2:{tmp_path / 'empty'}", cache_dir=tmp_path / "cache")
    bad = root / "validation" / "annos" / "000001.json"
    bad.write_text(json.dumps({"source": "street", "pair_id": 1}))
    with pytest.raises(ValueError, match=r"000001\.json: not a DeepFashion2 annotation .*'user' or 'shop'"):
        load_dataset(f"deepfashion2:{root}", cache_dir=tmp_path / "cache")
    assert DEEPFASHION2_IMAGES["validation"][0][0] == "000001"
