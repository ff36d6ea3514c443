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
