"""The engine end to end on the generated set: index -> save -> query, the CLI, caches and refusals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmarks.runner import run_grid
from index import IndexCorruptError, IndexMismatchError
from index.manifest import manifest_checksum
from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.features import FeatureCache, extract_features
from retrieval.io import ImageReadError
from street2shop.cli import cli
from street2shop.engine import Searcher, build_index

SMALL = {"image_size": (96, 64)}


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return load_viton(synthetic_root, split="val")


def test_index_save_query_roundtrip(dataset, tmp_path):
    descriptor = create_descriptor("colorhist")
    built = build_index(dataset.catalog, descriptor, tmp_path / "idx", progress=False)
    assert built.ntotal == len(dataset.catalog)
    searcher = Searcher(tmp_path / "idx", device="cpu")
    # a product photo queried against its own catalog comes back first with cosine 1
    results = searcher.search(list(dataset.catalog["image"][:3]), k=2)
    top = results[results["rank"] == 1]
    assert list(top["product_id"]) == [str(p) for p in dataset.catalog["product_id"][:3]]
    assert np.allclose(top["score"], 1.0, atol=1e-5)


def test_fitted_descriptor_state_travels_with_the_index(dataset, tmp_path):
    descriptor = create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL)
    train = list(dataset.train["product_image"][:8])
    build_index(dataset.catalog, descriptor, tmp_path / "idx", fit_paths=train, progress=False)
    searcher = Searcher(tmp_path / "idx", device="cpu")
    assert searcher.descriptor.fingerprint() == descriptor.fingerprint()
    first = dataset.catalog["image"].iloc[0]
    results = searcher.search([first], k=1)
    assert results["product_id"].iloc[0] == str(dataset.catalog["product_id"].iloc[0])


def test_fitted_state_is_cached_by_weights_config_and_images(dataset, tmp_path, monkeypatch):
    from retrieval.batching import fit_descriptor, fitted_state_path

    train = list(dataset.train["product_image"][:8])
    fitted = fit_descriptor(
        create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL), train, progress=False, cache_dir=tmp_path
    )
    stored = fitted_state_path(create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL), train, tmp_path)
    assert stored.exists() and set(torch.load(stored, weights_only=True)) == {"centroids", "_fitted"}
    # the same unfitted descriptor on the same images: loaded, not fitted (fit would raise here)
    monkeypatch.setattr(type(fitted), "fit", lambda *args, **kwargs: pytest.fail("fitted again despite the cache"))
    again = fit_descriptor(
        create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL), train, progress=False, cache_dir=tmp_path
    )
    assert again.fitted and again.fingerprint() == fitted.fingerprint()
    # another config or other images give another key; a damaged file is refitted, not trusted
    assert fitted_state_path(create_descriptor("sift", n_clusters=5, pca_dim=None, **SMALL), train, tmp_path) != stored
    assert (
        fitted_state_path(create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL), train[:7], tmp_path) != stored
    )
    monkeypatch.undo()
    stored.write_bytes(b"not a checkpoint")
    refitted = fit_descriptor(
        create_descriptor("sift", n_clusters=4, pca_dim=None, **SMALL), train, progress=False, cache_dir=tmp_path
    )
    assert refitted.fingerprint() == fitted.fingerprint() and torch.load(stored, weights_only=True)["_fitted"]


def test_query_with_other_descriptor_is_refused(dataset, tmp_path):
    build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)
    with pytest.raises(IndexMismatchError, match="colorhist.*gem|gem.*colorhist"):
        Searcher(tmp_path / "idx", device="cpu", descriptor="gem")
    # a tampered descriptor config no longer reproduces the stored fingerprint
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"]["descriptor_config"]["bins"] = [4, 4, 4]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="manifest_checksum"):  # the manifest seals itself
        Searcher(tmp_path / "idx", device="cpu")
    # a re-sealed manifest still fails: the descriptor it describes does not reproduce the fingerprint
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        Searcher(tmp_path / "idx", device="cpu")


def test_empty_catalog_and_duplicate_ids_are_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_index(dataset.catalog.iloc[:0], create_descriptor("colorhist"), tmp_path / "a", progress=False)
    doubled = pd.concat([dataset.catalog, dataset.catalog.head(2)], ignore_index=True)  # same product, same image
    with pytest.raises(ValueError, match=r"repeats 2 \(product_id, image\) rows"):
        build_index(doubled, create_descriptor("colorhist"), tmp_path / "b", progress=False)


def test_corrupt_catalog_image_names_the_file_and_loses_nothing(dataset, tmp_path):
    catalog = dataset.catalog.copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    catalog.loc[catalog.index[-1], "image"] = str(broken)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        build_index(catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists(), "a failed build must not leave a half-written index"


def test_interrupted_extraction_resumes_from_the_cache(dataset, tmp_path):
    descriptor = create_descriptor("colorhist")
    paths = list(dataset.catalog["image"])
    size = descriptor.input_spec.size
    calls = {"n": 0}

    def crashing_embed(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
        return descriptor.embed(images)

    cache = FeatureCache(tmp_path / "cache", "colorhist-test")
    with pytest.raises(KeyboardInterrupt):
        extract_features(crashing_embed, paths, size, batch_size=2, chunk_size=4, cache=cache)
    assert len(list(cache.directory.glob("*.npy"))) == 4, "the first finished chunk's 4 images are on disk"

    def counting_embed(images):
        calls["resumed"] = calls.get("resumed", 0) + len(images)
        return descriptor.embed(images)

    resumed = extract_features(counting_embed, paths, size, batch_size=2, chunk_size=4, cache=cache)
    assert calls["resumed"] == len(paths) - 4, "the cached chunk is not recomputed"
    fresh = extract_features(descriptor.embed, paths, size, batch_size=2, chunk_size=4)
    assert np.allclose(resumed, fresh)


def test_grid_scores_are_real(dataset):
    """On the generated set a colour histogram ranks far above chance, and mAP is bounded by recall."""
    results = run_grid(dataset, ["colorhist"], progress=False)
    row = results.iloc[0]
    assert row["gallery"] == len(dataset.catalog) and row["queries"] == len(dataset.queries)
    chance_map20 = np.mean([1 / r for r in range(1, 21)]) * 20 / row["gallery"] if row["gallery"] > 20 else None
    assert row["mAP@20"] > 0.2 and row["recall@20"] >= row["mAP@20"]
    assert chance_map20 is None or row["mAP@20"] > 2 * chance_map20


def test_cli_index_query_bench(synthetic_root, tmp_path):
    runner = CliRunner()
    spec = f"viton:{synthetic_root}"
    cache = str(tmp_path / "cache")
    out = runner.invoke(
        cli,
        ["index", "--catalog", spec, "--descriptor", "colorhist", "--out", str(tmp_path / "idx"), "--cache-dir", cache],
    )
    assert out.exit_code == 0, out.output
    assert "wrote" in out.output
    banked = ["--query-bank", spec, "--query-bank-size", "5", "--bank-beta", "10"]
    out = runner.invoke(
        cli,
        ["index", "--catalog", spec, "--descriptor", "colorhist", "--out", str(tmp_path / "qb"), "--cache-dir", cache]
        + banked,
    )
    assert out.exit_code == 0, out.output
    assert f"query bank: 5 training-split photos of {spec}, beta 10" in out.output
    photo = str(sorted((synthetic_root / "train" / "image").glob("*.png"))[0])
    out = runner.invoke(cli, ["query", "--index", str(tmp_path / "idx"), photo, "--k", "3", "--format", "json"])
    assert out.exit_code == 0, out.output
    parsed = json.loads(out.output)
    assert len(parsed) == 1 and len(parsed[0]["results"]) == 3
    out = runner.invoke(cli, ["query", "--index", str(tmp_path / "idx"), photo, "--descriptor", "gem"])
    assert out.exit_code == 2 and "rebuild the index" in out.output
    out = runner.invoke(cli, ["query", "--index", str(tmp_path / "qb"), photo, "--k", "3", "--format", "json"])
    assert out.exit_code == 0, out.output
    normalised = json.loads(out.output)[0]["results"]
    assert len(normalised) == 3 and normalised != parsed[0]["results"]  # same products maybe, other scores
    out = runner.invoke(
        cli,
        [
            "bench",
            "--dataset",
            spec,
            "--descriptors",
            "colorhist",
            "--out",
            str(tmp_path / "res"),
            "--cache-dir",
            cache,
        ]
        + banked,
    )
    assert out.exit_code == 0, out.output
    assert "mAP@20" in out.output and (tmp_path / "res" / "results.csv").exists()
    report = (tmp_path / "res" / "report.md").read_text()
    assert "| none | colorhist |" in report and "| none | colorhist+qb |" in report


def test_cli_errors_are_one_line_messages(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["bench", "--dataset", "nope:x", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "error:" in out.output and "Traceback" not in out.output
    out = runner.invoke(
        cli,
        [
            "bench",
            "--dataset",
            "synthetic:24",
            "--descriptors",
            "nope",
            "--cache-dir",
            str(tmp_path),
            "--out",
            str(tmp_path),
        ],
    )
    assert out.exit_code == 2 and "matches no descriptor" in out.output
    out = runner.invoke(cli, ["bench", "--k", "0", "--out", str(tmp_path)])
    assert out.exit_code == 2


@pytest.mark.parametrize("package", ["retrieval", "generation", "index", "benchmarks", "street2shop"])
def test_generic_top_level_names_are_ours(package):
    """`index`, `retrieval`, ... are common names: make sure the imported ones are this project's."""
    import importlib
    from pathlib import Path

    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parents[1] == Path(__file__).resolve().parents[2]
