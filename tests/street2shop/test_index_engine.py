"""The engine over the versioned index layout: it still finds its attachments at ``<dir>/<name>``, and
a tampered manifest is refused before the descriptor is rebuilt from it."""

import json

import pytest

from index import IndexCorruptError, IndexMismatchError
from index.manifest import manifest_checksum
from index.storage import live_version_dir
from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from street2shop.engine import Searcher, build_index


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return load_viton(synthetic_root, split="val")


def test_engine_reads_attachments_through_the_stable_links(dataset, tmp_path):
    build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)
    build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)  # overwrite
    assert (tmp_path / "idx" / "descriptor.pt").is_symlink()
    assert (tmp_path / "idx" / "descriptor.pt").read_bytes() == (
        live_version_dir(tmp_path / "idx") / "descriptor.pt"
    ).read_bytes()
    searcher = Searcher(tmp_path / "idx", device="cpu")
    first = dataset.catalog["image"].iloc[0]
    assert searcher.search([first], k=1)["product_id"].iloc[0] == str(dataset.catalog["product_id"].iloc[0])


def test_edited_manifest_is_refused_and_a_resealed_one_still_fails_the_fingerprint(dataset, tmp_path):
    """What tests/street2shop/test_engine.py::test_query_with_other_descriptor_is_refused should expect now."""
    build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"]["descriptor_config"]["bins"] = [4, 4, 4]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="manifest_checksum"):
        Searcher(tmp_path / "idx", device="cpu")
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        Searcher(tmp_path / "idx", device="cpu")


def test_build_index_never_deletes_a_users_file(dataset, tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "idx", progress=False)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["notes.txt"]
