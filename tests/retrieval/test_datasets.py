"""Tests of retrieval.datasets (its formats and their registry) and retrieval.synthetic on tiny trees built in
tmp_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import retrieval.datasets.base as datasets_base
import retrieval.datasets.viton_street as viton_street
import retrieval.synthetic.dataset as synthetic_dataset
from retrieval.datasets import (
    DATASETS,
    EXPECTED_LAYOUTS,
    RetrievalSet,
    dataset_spec_forms,
    default_cache_dir,
    list_dataset_formats,
    load_csv,
    load_dataset,
    load_viton,
    load_viton_street,
    query_bank_photos,
    register_dataset_format,
)
from retrieval.io import read_image, read_mask
from retrieval.synthetic import LABEL_UPPER_CLOTHES, SYNTHETIC_MARKER, make_synthetic_dataset
from tests.retrieval.official_layouts import (
    write_deepfashion2,
    write_deepfashion_c2s,
    write_lookbook,
    write_street2shop,
)

VITON_ROOT = Path(__file__).parents[3] / "shared" / "data" / "viton"


def _write_tiny(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 8), (value, value, value) if mode == "RGB" else value).save(path)


def _fake_viton(root: Path, half: str, ids, ext: str = "jpg", missing_product=(), try_on_pairs: bool = False):
    """A VITON-layout half with one pixel value per id, so tests can tell the images apart."""
    for number, pair_id in enumerate(ids):
        _write_tiny(root / half / "image" / f"{pair_id}_0.{ext}", number)
        if pair_id not in missing_product:
            _write_tiny(root / half / "cloth" / f"{pair_id}_1.{ext}", number)
            _write_tiny(root / half / "cloth-mask" / f"{pair_id}_1.{ext}", 255, mode="L")
        _write_tiny(root / half / "image-parse" / f"{pair_id}_0.png", 5, mode="L")
    # VITON's test_pairs.txt pairs each person with ANOTHER product (try-on); the loader must ignore it.
    partners = list(ids[1:]) + list(ids[:1]) if try_on_pairs else list(ids)
    lines = [f"{person}_0.{ext} {product}_1.{ext}" for person, product in zip(ids, partners)]
    (root / f"{half}_pairs.txt").write_text("\n".join(lines) + "\n")


def _ids(count: int, start: int = 1):
    return [f"{number:06d}" for number in range(start, start + count)]


def test_pairs_by_id_even_when_the_pairs_file_pairs_other_products(tmp_path):
    _fake_viton(tmp_path, "test", _ids(5), try_on_pairs=True)
    data = load_viton(tmp_path, split="all")
    assert len(data.catalog) == 5 and len(data.queries) == 5 and data.train is None
    for query in data.queries.itertuples():
        assert Path(query.image).name == f"{query.product_id}_0.jpg"
        product_image = data.catalog.set_index("product_id").loc[query.product_id, "image"]
        assert Path(product_image).name == f"{query.product_id}_1.jpg"
        assert Path(product_image).parent.name == "cloth"
        # Same id -> same pixel value in this fake tree: the pair really is the person's own product.
        assert read_image(query.image)[0, 0, 0] == read_image(product_image)[0, 0, 0]


def test_val_split_is_disjoint_from_training_pairs(tmp_path):
    _fake_viton(tmp_path, "train", _ids(30))
    data = load_viton(tmp_path, split="val", seed=3)
    val_ids = set(data.catalog["product_id"])
    train_ids = set(data.train["pair_id"])
    assert len(val_ids) == 10 and len(train_ids) == 20
    assert not val_ids & train_ids
    assert val_ids | train_ids == set(_ids(30))
    assert set(data.queries["product_id"]) == val_ids
    assert list(data.train.columns) == ["pair_id", "person_image", "product_image", "parse", "mask", "product_id"]
    train_split = load_viton(tmp_path, split="train", seed=3)
    assert set(train_split.catalog["product_id"]) == train_ids


def test_a_query_bank_is_a_seeded_sample_of_training_split_photos_only(tmp_path):
    _fake_viton(tmp_path, "train", _ids(30))
    spec = f"viton:{tmp_path}"
    evaluated = set(load_viton(tmp_path, split="val", seed=0).queries["image"].astype(str))
    every = query_bank_photos(spec, 100)
    assert len(every) == 20 and not set(every) & evaluated  # all 20 training photos, none of the 10 evaluated
    assert query_bank_photos(spec, 0) == every  # 0: all of them
    sample = query_bank_photos(spec, 5)
    assert len(sample) == 5 and sample == query_bank_photos(spec, 5)  # seeded
    assert sample == [photo for photo in every if photo in set(sample)]  # in the set's order
    assert query_bank_photos(spec, 5, seed=1) != sample
    with pytest.raises(ValueError, match="0 for all"):
        query_bank_photos(spec, -1)


def test_split_is_deterministic_for_a_seed(tmp_path):
    _fake_viton(tmp_path, "train", _ids(30))
    first = load_viton(tmp_path, split="val", seed=7)
    again = load_viton(tmp_path, split="val", seed=7)
    other = load_viton(tmp_path, split="val", seed=8)
    pd.testing.assert_frame_equal(first.catalog, again.catalog)
    assert set(first.catalog["product_id"]) != set(other.catalog["product_id"])


def test_missing_products_are_dropped_with_a_warning(tmp_path, caplog):
    _fake_viton(tmp_path, "train", _ids(6), missing_product={"000002", "000005"})
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        data = load_viton(tmp_path, split="all")
    assert sorted(data.catalog["product_id"]) == ["000001", "000003", "000004", "000006"]
    assert "dropped 2 of 6" in caplog.text


def test_both_halves_get_prefixed_ids(tmp_path):
    _fake_viton(tmp_path, "train", _ids(3))
    _fake_viton(tmp_path, "test", _ids(2), try_on_pairs=True)  # same numbers as train: must not collide
    data = load_viton(tmp_path, split="all")
    assert sorted(data.catalog["product_id"]) == [
        "test-000001",
        "test-000002",
        "train-000001",
        "train-000002",
        "train-000003",
    ]
    assert "train-000001_0" in set(data.queries["query_id"])


def test_png_layout_and_directory_listing_without_pairs_file(tmp_path):
    _fake_viton(tmp_path, "train", _ids(4), ext="png")
    (tmp_path / "train_pairs.txt").unlink()
    data = load_viton(tmp_path, split="all")
    assert len(data.catalog) == 4
    assert data.catalog["image"].str.endswith("_1.png").all()


def test_optional_parse_and_mask_paths(tmp_path):
    _fake_viton(tmp_path, "train", _ids(3))
    (tmp_path / "train" / "image-parse" / "000002_0.png").unlink()
    for seed in range(4):  # whichever split the pair without a parse map lands in
        data = load_viton(tmp_path, split="val", seed=seed, val_fraction=0.34)
        for pair_id, parse in zip(data.train["pair_id"], data.train["parse"]):
            assert (parse is None) == (pair_id == "000002")  # None, not NaN (which is truthy)
        assert data.train["mask"].notna().all()


def test_viton_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected the VITON layout"):
        load_viton(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_viton(tmp_path)
    _fake_viton(tmp_path, "train", _ids(3))
    with pytest.raises(ValueError, match="train, val, all"):
        load_viton(tmp_path, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        load_viton(tmp_path, val_fraction=1.5)


def test_malformed_pairs_file_names_the_line(tmp_path):
    _fake_viton(tmp_path, "train", _ids(2))
    (tmp_path / "train_pairs.txt").write_text("000001_0.jpg 000001_1.jpg\nbogus.jpg x.jpg\n")
    with pytest.raises(ValueError, match=r"train_pairs.txt:2"):
        load_viton(tmp_path)


def _write_csvs(tmp_path: Path):
    _write_tiny(tmp_path / "shop" / "a.jpg", 10)
    _write_tiny(tmp_path / "shop" / "b.jpg", 20)
    _write_tiny(tmp_path / "street" / "q.jpg", 30)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image,category\n007,shop/a.jpg,tee\n008,shop/b.jpg,tank\n")
    queries = tmp_path / "queries.csv"
    queries.write_text("query_id,image,product_id\nq1,street/q.jpg,007\nq1,street/q.jpg,008\n")
    return catalog, queries


def test_load_csv_resolves_relative_paths_and_keeps_string_ids(tmp_path):
    catalog, queries = _write_csvs(tmp_path)
    data = load_csv(catalog, queries)
    assert list(data.catalog["product_id"]) == ["007", "008"]
    assert data.catalog.loc[0, "image"] == str((tmp_path / "shop" / "a.jpg").resolve())
    assert read_image(data.queries.loc[0, "image"])[0, 0, 0] == 30
    assert "category" in data.catalog.columns
    assert "2 products, 1 queries (2 rows)" in data.describe()
    index_only = load_csv(catalog)
    assert index_only.queries.empty and index_only.train is None


def test_load_csv_missing_column_names_file_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,image\n1,a.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*'product_id'"):
        load_csv(bad)
    with pytest.raises(FileNotFoundError):
        load_csv(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    "rows, message",
    [
        ("007,shop/a.jpg\n,shop/b.jpg\n", r"catalog\.csv: row 2 after the header: product_id is empty \(1 such rows\)"),
        (
            "007,shop/a.jpg\n008 ,shop/b.jpg\n",
            r"row 2 after the header: product_id '008 ' has leading or trailing whitespace",
        ),
        (' 007,shop/a.jpg\n"  ",shop/b.jpg\n', r"row 1 after the header: product_id ' 007' has leading"),
        ('"  ",shop/a.jpg\n', r"row 1 after the header: product_id is only whitespace"),
    ],
)
def test_load_csv_refuses_empty_and_padded_product_ids(tmp_path, rows, message):
    _write_csvs(tmp_path)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image\n" + rows)
    with pytest.raises(ValueError, match=message + ".*without surrounding spaces"):
        load_csv(catalog)


@pytest.mark.parametrize(
    "rows, message",
    [
        ("q1 ,street/q.jpg,007\n", r"queries\.csv: row 1 after the header: query_id 'q1 ' has leading"),
        ("q1,street/q.jpg,\tq1\n", r"queries\.csv: row 1 after the header: product_id '\\tq1' has leading"),
        ("q1,street/q.jpg,007\n,street/q.jpg,008\n", r"queries\.csv: row 2 after the header: query_id is empty"),
    ],
)
def test_load_csv_refuses_empty_and_padded_query_ids(tmp_path, rows, message):
    catalog, queries = _write_csvs(tmp_path)
    queries.write_text("query_id,image,product_id\n" + rows)
    with pytest.raises(ValueError, match=message):
        load_csv(catalog, queries)


def test_load_csv_names_the_file_for_unparsable_or_odd_tables(tmp_path):
    catalog, _ = _write_csvs(tmp_path)
    catalog.write_bytes(b"product_id,image\n\xff\xfe,a.jpg\n")
    with pytest.raises(ValueError, match=r"catalog CSV .*catalog\.csv cannot be parsed.*UTF-8"):
        load_csv(catalog)
    catalog.write_text("")
    with pytest.raises(ValueError, match=r"catalog\.csv cannot be parsed"):
        load_csv(catalog)
    catalog.write_text('product_id,image\n1,"a.jpg\n')
    with pytest.raises(ValueError, match=r"catalog\.csv cannot be parsed"):
        load_csv(catalog)
    catalog.write_text("product_id, image,image \n1,a.jpg,b.jpg\n")
    with pytest.raises(ValueError, match=r"catalog\.csv has the column\(s\) \['image'\] more than once"):
        load_csv(catalog)
    catalog.write_text("product_id,image,category\n1,shop/a.jpg\n2\n")  # short rows: cells are empty, not NaN
    with pytest.raises(ValueError, match=r"1 rows have no image \(first at line 3\)"):
        load_csv(catalog)
    catalog.write_text("product_id,image\n1,a\x00.jpg\n")
    with pytest.raises(ValueError, match=r"catalog\.csv: row 1 after the header: image .* is not a usable path"):
        load_csv(catalog)


def test_load_csv_refuses_a_directory_or_fifo_as_the_csv(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match=r"dir\.csv is not a regular file \(a directory\)"):
        load_csv(tmp_path / "dir.csv")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.csv")
        with pytest.raises(ValueError, match=r"pipe\.csv is not a regular file \(a FIFO"):
            load_csv(tmp_path / "pipe.csv")  # would block forever waiting for a writer if opened plainly


def _table(**columns):
    return pd.DataFrame(columns)


def test_validate_errors():
    empty = RetrievalSet("empty", _table(product_id=[], image=[]), _table(query_id=[], image=[], product_id=[]))
    with pytest.raises(ValueError, match="empty"):
        empty.validate()
    several = RetrievalSet(
        "several",
        _table(product_id=["a", "a", "b"], image=["x", "y", "z"]),
        _table(query_id=[], image=[], product_id=[]),
    )
    assert several.validate().describe() == "several: 2 products (3 images), 0 queries, no training pairs"
    duplicated = RetrievalSet(
        "dup", _table(product_id=["a", "a", "b"], image=["x", "x", "z"]), _table(query_id=[], image=[], product_id=[])
    )
    with pytest.raises(ValueError, match=r"1 catalog rows repeat a \(product_id, image\) pair \(e.g. \('a', 'x'\)\)"):
        duplicated.validate()
    unknown = RetrievalSet(
        "unknown", _table(product_id=["a"], image=["x"]), _table(query_id=["q"], image=["y"], product_id=["zz"])
    )
    with pytest.raises(ValueError, match="'zz'"):
        unknown.validate()
    missing_column = RetrievalSet("cols", _table(product_id=["a"]), _table(query_id=[], image=[], product_id=[]))
    with pytest.raises(ValueError, match="'image'"):
        missing_column.validate()
    no_queries = _table(query_id=[], image=[], product_id=[])
    for bad, problem in (
        ("", "is empty"),
        (" a", "' a' has leading"),
        (None, "is missing"),
        (float("nan"), "is missing"),
    ):
        padded = RetrievalSet("ids", _table(product_id=["b", bad], image=["x", "y"]), no_queries)
        with pytest.raises(ValueError, match=f"ids: catalog: row 1: product_id {problem}"):
            padded.validate()
    padded_query = RetrievalSet(
        "ids", _table(product_id=["a"], image=["x"]), _table(query_id=["q\n"], image=["y"], product_id=["a"])
    )
    with pytest.raises(ValueError, match=r"ids: queries: row 0: query_id 'q\\n' has leading or trailing whitespace"):
        padded_query.validate()


def test_load_dataset_specs(tmp_path):
    catalog, queries = _write_csvs(tmp_path)
    assert len(load_dataset(f"csv:{catalog},{queries}").queries) == 2
    assert load_dataset(f"csv:{catalog}").queries.empty
    with pytest.raises(
        ValueError,
        match="registered formats: csv, deepfashion-c2s, deepfashion2, lookbook, street2shop, synthetic, viton, "
        "viton-street, viton-street-hr; "
        "valid forms: csv:CATALOG.csv",
    ):
        load_dataset("deepfashion:/x")
    with pytest.raises(ValueError, match="expected viton:ROOT"):
        load_dataset("viton:")
    with pytest.raises(ValueError, match="expected viton-street:ROOT"):
        load_dataset("viton-street:")
    with pytest.raises(ValueError, match="expected viton-street-hr:ROOT"):
        load_dataset("viton-street-hr:")
    with pytest.raises(ValueError, match="expected csv:CATALOG.csv, csv:CATALOG.csv,QUERIES.csv or"):
        load_dataset(f"csv:{catalog},{queries},{queries},{queries}")  # a third file is PAIRS.csv; a fourth is none
    with pytest.raises(ValueError, match=r"pairs CSV .*queries\.csv lacks column\(s\) 'person_image'"):
        load_dataset(f"csv:{catalog},{queries},{queries}", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="positive integer"):
        load_dataset("synthetic:zero", cache_dir=tmp_path)


def _viton_example(root: Path) -> str:
    _fake_viton(root, "train", _ids(6))
    return f"viton:{root}"


def _csv_example(root: Path) -> str:
    catalog, queries = _write_csvs(root)
    return f"csv:{catalog},{queries}"


DATASET_EXAMPLES = {
    "csv": _csv_example,
    "deepfashion-c2s": lambda root: f"deepfashion-c2s:{write_deepfashion_c2s(root)}",
    "deepfashion2": lambda root: f"deepfashion2:{write_deepfashion2(root)}",
    "lookbook": lambda root: f"lookbook:{write_lookbook(root)}",
    "street2shop": lambda root: f"street2shop:{write_street2shop(root)}",
    "synthetic": lambda root: "synthetic:4",  # generated into load_dataset's cache_dir
    "viton": _viton_example,
    "viton-street": lambda root: "viton-street:" + _viton_example(root).partition(":")[2],  # queries into cache_dir
    "viton-street-hr": lambda root: "viton-street-hr:" + _viton_example(root).partition(":")[2],
}
"""Format -> a function that writes a tiny example under a directory and returns its spec."""


@pytest.mark.parametrize("name", list_dataset_formats())
def test_every_registered_format_loads_a_tiny_example(name, tmp_path):
    """Contract over the dataset registry: each format loads a tiny set as a validated RetrievalSet of
    absolute paths to files that exist, and is listed with its spec forms."""
    assert name in DATASET_EXAMPLES, f"dataset format {name!r} has no tiny example: add one to DATASET_EXAMPLES"
    (tmp_path / "data").mkdir()
    spec = DATASET_EXAMPLES[name](tmp_path / "data")
    data = load_dataset(spec, split="all", seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(data, RetrievalSet) and data.validate() is data
    assert len(data.catalog) > 0 and data.name
    for image in list(data.catalog["image"]) + list(data.queries["image"]):
        assert Path(image).is_absolute() and Path(image).is_file()
    assert [form for form in dataset_spec_forms() if form.split(":")[0] == name]
    assert EXPECTED_LAYOUTS[name], f"dataset format {name!r} records no expected layout (layout.expected_layout)"
    with pytest.raises(ValueError, match=f"registered formats: .*{name}"):
        load_dataset("no-such-format:x")


def test_a_new_format_is_one_registration(monkeypatch, tmp_path):
    """A format that indexes a folder of product images (no queries): one decorated loader."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # forgotten after the test
    monkeypatch.setattr(datasets_base, "_SPEC_FORMS", dict(datasets_base._SPEC_FORMS))

    @register_dataset_format("folder", "folder:DIR")
    def folder_spec(argument, *, spec, split, seed, cache_dir):
        images = sorted(Path(argument).resolve().glob("*.jpg"))
        catalog = pd.DataFrame({"product_id": [path.stem for path in images], "image": list(map(str, images))})
        queries = pd.DataFrame({"query_id": [], "image": [], "product_id": []}, dtype=str)
        return RetrievalSet(f"folder:{argument}", catalog, queries).validate()

    _write_tiny(tmp_path / "a.jpg", 1)
    _write_tiny(tmp_path / "b.jpg", 2)
    assert "folder" in list_dataset_formats() and "folder:DIR" in dataset_spec_forms()
    assert load_dataset(f"FOLDER:{tmp_path}").catalog["product_id"].tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset_format("folder")(folder_spec)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("STREET2SHOP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "street2shop"


def _all_bytes(root: Path):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_is_deterministic_and_loadable(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", n_products=6, seed=4, size=(64, 48))
    second = make_synthetic_dataset(tmp_path / "b", n_products=6, seed=4, size=(64, 48))
    assert _all_bytes(first) == _all_bytes(second)
    other_seed = make_synthetic_dataset(tmp_path / "c", n_products=6, seed=5, size=(64, 48))
    assert _all_bytes(other_seed) != _all_bytes(first)

    data = load_viton(first, split="all")
    assert len(data.catalog) == 6 and len(data.queries) == 6
    assert read_image(data.catalog.loc[0, "image"]).shape == (64, 48, 3)
    pair = load_viton(first, split="val", seed=4, val_fraction=0.5).train.iloc[0]
    parse = read_mask(pair["parse"])
    assert LABEL_UPPER_CLOTHES in np.unique(parse)
    assert set(np.unique(parse)) <= {0, 2, 5, 9, 13, 14, 15}
    assert Image.open(pair["parse"]).mode == "P"
    product_mask = read_mask(pair["mask"])
    assert 0 < (product_mask > 127).mean() < 1
    # A shop photo is on white: the corners are white.
    assert read_image(pair["product_image"])[0, 0].min() == 255


def test_synthetic_street_image_differs_from_its_product(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", n_products=2, seed=0, size=(64, 48))
    data = load_viton(root, split="all")
    street = read_image(data.queries.loc[0, "image"]).astype(int)
    product = read_image(data.catalog.loc[0, "image"]).astype(int)
    assert np.abs(street - product).mean() > 20


def test_synthetic_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    real_draw = synthetic_dataset.make_synthetic_product

    def failing_draw(index, **kwargs):
        if index == 3:
            raise RuntimeError("interrupted")
        return real_draw(index, **kwargs)

    monkeypatch.setattr(synthetic_dataset, "make_synthetic_product", failing_draw)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_synthetic_dataset(tmp_path / "set", n_products=4, size=(64, 48))
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging directory is left


def test_synthetic_spec_generates_once_then_reuses(tmp_path):
    data = load_dataset("synthetic:6", split="all", seed=1, cache_dir=tmp_path)
    root = tmp_path / "synthetic-6-seed1"
    marker = root / SYNTHETIC_MARKER
    assert marker.is_file() and len(data.catalog) == 6
    stamp = marker.stat().st_mtime_ns
    again = load_dataset("synthetic:6", split="val", seed=1, cache_dir=tmp_path)
    assert marker.stat().st_mtime_ns == stamp
    assert len(again.catalog) == 2 and len(again.train) == 4


def test_synthetic_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        make_synthetic_dataset(tmp_path / "busy", n_products=2, size=(64, 48))


def test_viton_street_is_viton_with_street_queries(tmp_path):
    root = make_synthetic_dataset(tmp_path / "viton", n_products=9, seed=0, size=(64, 48))
    studio = load_viton(root, split="val", seed=2)
    street = load_viton_street(root, split="val", seed=2, cache_dir=tmp_path / "cache")
    assert street.name.startswith("viton-street:") and street.root == studio.root
    pd.testing.assert_frame_equal(street.catalog, studio.catalog)
    pd.testing.assert_frame_equal(street.train, studio.train)  # training pairs stay studio photos
    pd.testing.assert_frame_equal(street.queries.drop(columns="image"), studio.queries.drop(columns="image"))
    for image, original in zip(street.queries["image"], studio.queries["image"]):
        assert image.startswith(str((tmp_path / "cache" / "viton-street").resolve())) and image.endswith(".jpg")
        assert read_image(image).shape == read_image(original).shape
        parse = Path(image).parent.parent / "image-parse" / f"{Path(image).stem}.png"  # beside it, VITON-style
        assert set(np.unique(read_mask(parse))) <= set(
            np.unique(read_mask(original.replace("/image/", "/image-parse/")))
        )
    # The street photo of a query depends on (seed, query id): the "all" split makes the same bytes.
    everything = load_viton_street(root, split="all", seed=2, cache_dir=tmp_path / "cache")
    by_id = dict(zip(everything.queries["query_id"], everything.queries["image"]))
    assert all(by_id[query] == image for query, image in zip(street.queries["query_id"], street.queries["image"]))
    other_seed = load_viton_street(root, split="all", seed=3, cache_dir=tmp_path / "cache")
    assert Path(other_seed.queries["image"][0]).read_bytes() != Path(everything.queries["image"][0]).read_bytes()


def test_viton_street_hr_keeps_the_person_at_the_studio_resolution_in_a_larger_frame(tmp_path):
    root = make_synthetic_dataset(tmp_path / "viton", n_products=6, seed=0, size=(64, 48))
    low = load_viton_street(root, split="all", seed=2, cache_dir=tmp_path / "cache")
    high = load_dataset(f"viton-street-hr:{root}", split="all", seed=2, cache_dir=tmp_path / "cache")
    assert high.name.startswith("viton-street-hr:")
    pd.testing.assert_frame_equal(high.queries.drop(columns="image"), low.queries.drop(columns="image"))
    for small, large in zip(low.queries["image"], high.queries["image"]):
        assert read_image(small).shape == (64, 48, 3) and read_image(large).shape == (192, 144, 3)
        parse = Path(large).parent.parent / "image-parse" / f"{Path(large).stem}.png"
        assert read_mask(parse).shape == (192, 144)
    # Another variant beside the frame-1 one, whose folder keeps its old name (its cached photos stay valid).
    folders = sorted(path.name for path in (tmp_path / "cache" / "viton-street").iterdir())
    assert len(folders) == 2 and sum("-frame3x-" in name for name in folders) == 1


def test_viton_street_generates_once_then_reuses(tmp_path, monkeypatch):
    _fake_viton(tmp_path / "viton", "train", _ids(4))
    first = load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "cache")
    stamps = [Path(image).stat().st_mtime_ns for image in first.queries["image"]]

    def no_drawing(*args, **kwargs):
        raise AssertionError("a complete variant must not be drawn again")

    monkeypatch.setattr(viton_street, "_make_street_photo", no_drawing)
    again = load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "cache")
    assert list(again.queries["image"]) == list(first.queries["image"])
    assert [Path(image).stat().st_mtime_ns for image in again.queries["image"]] == stamps
    # Other root contents are another variant (the folder is keyed by the names and sizes of the photos).
    noisy = np.random.default_rng(0).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "viton" / "train" / "image" / "000001_0.jpg")
    with pytest.raises(AssertionError, match="drawn again"):
        load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "viton-street").iterdir())) == 2


def test_viton_street_interrupted_generation_is_redone(tmp_path, monkeypatch):
    _fake_viton(tmp_path / "viton", "train", _ids(6))
    real_make = viton_street._make_street_photo
    made = []

    def failing_make(seed, query_id, *args):
        if query_id == "000004_0":
            raise RuntimeError("interrupted")
        made.append(query_id)
        return real_make(seed, query_id, *args)

    monkeypatch.setattr(viton_street, "_make_street_photo", failing_make)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "cache")
    (variant,) = (tmp_path / "cache" / "viton-street").iterdir()
    assert not list(variant.glob("COMPLETE-*"))  # an interrupted generation never looks complete
    assert not list(variant.rglob("*.tmp"))
    done_before = set(made)
    assert "000004_0" not in done_before

    monkeypatch.setattr(viton_street, "_make_street_photo", real_make)
    data = load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "cache")
    assert (variant / "COMPLETE-all.json").is_file() and len(data.queries) == 6
    assert all(Path(image).is_file() for image in data.queries["image"])
    # What was redone is byte for byte what an uninterrupted generation makes.
    fresh = load_viton_street(tmp_path / "viton", split="all", cache_dir=tmp_path / "fresh")
    assert [Path(image).read_bytes() for image in data.queries["image"]] == [
        Path(image).read_bytes() for image in fresh.queries["image"]
    ]


@pytest.mark.viton
def test_real_viton_counts_and_split():
    if not VITON_ROOT.is_dir():
        pytest.skip(f"real VITON data not found at {VITON_ROOT}")
    everything = load_viton(VITON_ROOT, split="all")
    assert len(everything.catalog) == 5459 and len(everything.queries) == 5459
    data = load_viton(VITON_ROOT, split="val", seed=0)
    assert abs(len(data.catalog) - 5459 / 3) <= 1
    assert len(data.catalog) + len(data.train) == 5459
    assert not set(data.catalog["product_id"]) & set(data.train["pair_id"])
    assert read_image(data.queries.loc[0, "image"]).shape == (256, 192, 3)
    assert LABEL_UPPER_CLOTHES in np.unique(read_mask(data.train.loc[0, "parse"]))


def test_street_training_pairs_append_street_copies_of_every_pair(synthetic_root, tmp_path):
    from retrieval.datasets.viton_street import street_training_pairs

    data = load_viton(synthetic_root, split="val")
    pairs = street_training_pairs(data, copies=1, seed=0, cache_dir=tmp_path)
    n = len(data.train)
    assert len(pairs) == 2 * n
    assert list(pairs["person_image"][:n]) == list(data.train["person_image"])  # the studio pairs first
    street = pairs.iloc[n:]
    assert (street["product_image"].to_numpy() == data.train["product_image"].to_numpy()).all()
    assert all(str(tmp_path) in p and Path(p).is_file() for p in street["person_image"])
    assert all(Path(p).is_file() for p in street["parse"])  # the parse map moved with the person
    again = street_training_pairs(data, copies=1, seed=0, cache_dir=tmp_path)
    assert list(again["person_image"]) == list(pairs["person_image"])  # generated once, reused
    assert "seed1000" in street["person_image"].iloc[0]  # apart from the validation variant's draws
