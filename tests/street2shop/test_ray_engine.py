"""`street2shop index --engine ray` on a local 2-CPU Ray cluster: the same vectors and the same top-10 as the
single-process engine, and a job cut short resumes from its Parquet shards without embedding them again.

The 24-product synthetic set (tests/conftest.py) and the cheap colorhist descriptor: this is about the engine,
not the descriptor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray", reason='--engine ray needs the distributed extra: pip install -e ".[distributed]"')

from retrieval.datasets import load_viton  # noqa: E402
from retrieval.descriptors import create_descriptor  # noqa: E402
from retrieval.files import file_sha1  # noqa: E402
from street2shop import Pipeline  # noqa: E402
from street2shop.cli import cli  # noqa: E402
from street2shop.distributed import RayEmbedder, read_shards, shard_directory  # noqa: E402
from street2shop.engine import build_index, embed_locally  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; its workers import this checkout, as the driver does."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return load_viton(synthetic_root, split="all")


def test_ray_index_gives_the_vectors_and_top10_of_the_local_one(cluster, dataset, synthetic_root, tmp_path):
    common = ["--catalog", f"viton:{synthetic_root}", "--split", "all", "--descriptor", "colorhist"]
    common += ["--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    for engine in ("local", "ray"):
        result = CliRunner().invoke(cli, ["index", *common, "--engine", engine, "--out", str(tmp_path / engine)])
        assert result.exit_code == 0, result.output
    descriptor = create_descriptor("colorhist")
    paths = list(dataset.catalog["image"])
    local = embed_locally(descriptor, paths, batch_size=32, cache_dir=None, progress=False)
    shards = read_shards(shard_directory(tmp_path / "cache" / "features", descriptor), descriptor.dim)
    on_ray = np.stack([shards[file_sha1(p)] for p in paths])
    assert np.abs(on_ray - local).max() < 1e-5
    queries = list(dataset.queries["image"]) + paths[:4]
    by_local = Pipeline.load(tmp_path / "local", device="cpu").search(queries, k=10)
    by_ray = Pipeline.load(tmp_path / "ray", device="cpu").search(queries, k=10)
    for expected, got in zip(by_local, by_ray):
        assert [h.product_id for h in got.hits] == [h.product_id for h in expected.hits]


def test_a_job_cut_short_resumes_without_embedding_its_shards_again(cluster, dataset, tmp_path):
    descriptor = create_descriptor("colorhist")
    first = RayEmbedder(shard_rows=4)  # 24 photos -> 6 shards of 4
    build_index(dataset.catalog, descriptor, tmp_path / "first", cache_dir=tmp_path / "cache", embed_catalog=first)
    directory = shard_directory(tmp_path / "cache", descriptor)
    written = sorted(directory.glob("part-*.parquet"))
    assert first.embedded == len(dataset.catalog) and len(written) == 6
    # What a job killed half-way leaves: half of its shards (each written whole, atomically).
    lost, kept = written[::2], {path: path.stat().st_mtime_ns for path in written[1::2]}
    lost_keys = {key for path in lost for key in pq.read_table(path).column("key").to_pylist()}
    for path in lost:
        path.unlink()
    again = RayEmbedder(shard_rows=4)
    build_index(dataset.catalog, descriptor, tmp_path / "again", cache_dir=tmp_path / "cache", embed_catalog=again)
    assert (
        again.embedded == len(lost_keys) == 12 < len(dataset.catalog)
    )  # only the photos of the lost shards were embedded
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # the other shards untouched
    new = set(directory.glob("part-*.parquet")) - set(kept)
    assert {key for path in new for key in pq.read_table(path).column("key").to_pylist()} == lost_keys
    photos = list(dataset.queries["image"])
    for a, b in zip(*(Pipeline.load(tmp_path / d, device="cpu").search(photos, k=10) for d in ("first", "again"))):
        assert [h.product_id for h in a.hits] == [h.product_id for h in b.hits]
