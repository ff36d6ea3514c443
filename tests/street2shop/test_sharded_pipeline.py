"""A pipeline whose index is built as shards merged on disk (`street2shop index --shards N`): `Pipeline.load`,
`query` and the service's search give the results of the same pipeline with one in-memory index.

1200 small seeded random images (the IVF presets need >= 1000 products) and the cheap colorhist descriptor."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from index import ProductIndex
from retrieval.descriptors import create_descriptor
from street2shop import Pipeline
from street2shop.cli import cli
from street2shop.engine import build_index

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py

N_PRODUCTS = 1200


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> pd.DataFrame:
    """Product photos of a few random colour blobs on white, each product its own mix."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_PRODUCTS):
        photo = np.full((32, 24, 3), 255, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 24), rng.integers(0, 16)
            photo[y : y + 8, x : x + 8] = rng.integers(0, 256, size=3)
        path = folder / f"p{i:04d}.png"
        Image.fromarray(photo).save(path)
        rows.append({"product_id": f"p{i:04d}", "image": str(path)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def indexes(catalog, tmp_path_factory):
    """(single, sharded) index directories of the same colorhist pipeline, preset ivfpq-rflat."""
    root = tmp_path_factory.mktemp("indexes")
    for name, shards in (("single", None), ("sharded", 3)):
        build_index(
            catalog, create_descriptor("colorhist"), root / name, preset="ivfpq-rflat", progress=False, shards=shards
        )
    # Tuning picks the fastest setting that reaches the recall target, so two builds may pick different ones
    # (timing): the sharded index is pinned to the single one's setting, as `bench-shards` compares them.
    single, sharded = (Pipeline.load(root / name, device="cpu") for name in ("single", "sharded"))
    sharded.index.use_search_params(single.index.search_params)
    sharded.save()
    return root / "single", root / "sharded"


def test_sharded_pipeline_searches_like_the_single_one(indexes, catalog):
    single, sharded = (Pipeline.load(directory, device="cpu") for directory in indexes)
    assert sharded.index.layout["kind"] == "ondisk" and sharded.index.layout["shards"] == 3
    assert single.index.layout == {"kind": "single"}
    assert sharded.index.search_params == single.index.search_params  # pinned alike by the fixture
    photos = list(catalog["image"].iloc[::150])
    for expected, got in zip(single.search(photos, k=10), sharded.search(photos, k=10)):
        assert [hit.product_id for hit in got.hits] == [hit.product_id for hit in expected.hits]
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in expected.hits], atol=1e-6)
    assert sharded.product_image_path("p0042") == single.product_image_path("p0042")


def test_query_command_and_add_on_a_sharded_index(indexes, catalog):
    single, sharded = indexes
    photo = catalog["image"].iloc[7]
    answers = [
        CliRunner().invoke(cli, ["query", "--index", str(d), photo, "--k", "5", "--format", "json", "--device", "cpu"])
        for d in (single, sharded)
    ]
    assert all(answer.exit_code == 0 for answer in answers), answers[1].output
    assert json.loads(answers[1].output) == json.loads(answers[0].output)
    refused = CliRunner().invoke(cli, ["add", str(sharded), "--catalog", "synthetic:3", "--device", "cpu"])
    assert refused.exit_code == 2 and "read-only" in refused.output
    assert ProductIndex.load(sharded, device="cpu").ntotal == N_PRODUCTS


@pytest.fixture(scope="module")
def flat_indexes(catalog, tmp_path_factory):
    """(single, separate) colorhist pipelines of 300 products, preset flat: `index --shards 3 --shard-layout
    separate` through the CLI, the single one through `build_index`."""
    root = tmp_path_factory.mktemp("flat")
    subset = catalog.iloc[:300]
    build_index(subset, create_descriptor("colorhist"), root / "single", progress=False)
    csv = root / "catalog.csv"
    subset.to_csv(csv, index=False)
    built = CliRunner().invoke(
        cli,
        ["index", "--catalog", f"csv:{csv}", "--descriptor", "colorhist", "--out", str(root / "separate"),
         "--shards", "3", "--shard-layout", "separate", "--device", "cpu", "--cache-dir", str(root / "cache")],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    return root / "single", root / "separate"


def test_separate_shards_pipeline_query_and_add(flat_indexes, catalog):
    single, separate = (Pipeline.load(directory, device="cpu") for directory in flat_indexes)
    assert separate.index.layout == {"kind": "separate", "shards": 3, "shard_sizes": [100, 100, 100]}
    photos = list(catalog["image"].iloc[:300:40])
    for expected, got in zip(single.search(photos, k=10), separate.search(photos, k=10)):
        assert [hit.product_id for hit in got.hits] == [hit.product_id for hit in expected.hits]
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in expected.hits], atol=1e-5)
    answers = [
        CliRunner().invoke(
            cli, ["query", "--index", str(d), photos[1], "--k", "5", "--format", "json", "--device", "cpu"]
        )
        for d in flat_indexes
    ]
    assert all(answer.exit_code == 0 for answer in answers), answers[1].output
    assert json.loads(answers[1].output) == json.loads(answers[0].output)
    separate.add(["p0300", "p0301"], list(catalog["image"].iloc[300:302]))  # to the last shard
    separate.save()
    grown = Pipeline.load(flat_indexes[1], device="cpu")
    assert grown.index.layout["shard_sizes"] == [100, 100, 102]
    assert grown.search([catalog["image"].iloc[301]], k=1)[0].hits[0].product_id == "p0301"
    refused = CliRunner().invoke(cli, ["remove", str(flat_indexes[1]), "p0001"])
    assert refused.exit_code == 2 and "build it again" in refused.output


def test_shard_layout_without_shards_is_refused(tmp_path):
    answer = CliRunner().invoke(
        cli, ["index", "--catalog", "synthetic:3", "--shard-layout", "separate", "--out", str(tmp_path / "x")]
    )
    assert answer.exit_code == 2 and "needs --shards N" in answer.output
