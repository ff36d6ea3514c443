"""Shards merged into one memory-mapped on-disk index (``index.ondisk``): the same results as one in-memory
index, saved and loaded through the versioned, checksummed, crash-safe storage like any other index.

A seeded clustered set of 4000 x 32 vectors: big enough for the IVF preset (>= 1000 vectors), seconds to build."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from index import IndexCorruptError, ProductIndex, layout
from index.layout import INDEX_DATA_FILES, IVF_DATA_FILE, REFINE_FILE, SAVE_STEPS
from index.storage import live_version_dir
from tests.index.test_index_safety import run_in_child

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py

N, DIM = 4000, 32


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), size=n)] + 0.6 * rng.standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


VECTORS = clustered(N, seed=0)
QUERIES = clustered(50, seed=1)
IDS = [f"p{i}" for i in range(N)]


def build(shards=None, work_dir=None, target_recall=None) -> ProductIndex:
    """ivfpq-rflat over VECTORS; target_recall None: the preset's fixed nprobe, the same on both sides."""
    return ProductIndex.build(
        VECTORS,
        IDS,
        preset="ivfpq-rflat",
        device="cpu",
        target_recall=target_recall,
        metadata={"descriptor": "gem", "fingerprint": "f0", "dim": DIM},
        shards=shards,
        work_dir=work_dir,
    )


@pytest.fixture(scope="module")
def single() -> ProductIndex:
    return build()


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> ProductIndex:
    return build(shards=4, work_dir=tmp_path_factory.mktemp("work"))


def assert_same_results(index: ProductIndex, reference: ProductIndex, k: int = 10) -> None:
    scores, ids = index.search(QUERIES, k)
    expected_scores, expected_ids = reference.search(QUERIES, k)
    assert ids.tolist() == expected_ids.tolist()
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


def test_merged_shards_give_the_single_index_results(single, merged):
    assert merged.search_params == single.search_params and merged.factory_string == single.factory_string
    assert merged.layout == {"kind": "ondisk", "shards": 4, "shard_sizes": [1000, 1000, 1000, 1000]}
    assert single.layout == {"kind": "single"}
    assert_same_results(merged, single)
    assert_same_results(merged, single, k=37)
    timings = merged.build_timings
    assert timings["shards_s"] > 0 and timings["merge_s"] > 0


def test_saved_on_disk_index_loads_memory_mapped_with_the_same_results(single, merged, tmp_path):
    target = merged.save(tmp_path / "idx", attachments={"descriptor.pt": b"state"})
    version = live_version_dir(target)
    assert {IVF_DATA_FILE, REFINE_FILE} <= set(os.listdir(version))
    loaded = ProductIndex.load(target, device="cpu")
    assert loaded.layout == merged.layout and loaded.product_ids == IDS
    assert_same_results(loaded, single)
    mapped = Path("/proc/self/maps").read_text()
    assert str(version / IVF_DATA_FILE) in mapped and str(version / REFINE_FILE) in mapped
    # Saved again (a new version): the lists are hard-linked, not rewritten, and still load.
    loaded.save(target, attachments={"descriptor.pt": b"state 2"})
    assert live_version_dir(target) != version and not version.exists()
    assert_same_results(ProductIndex.load(target, device="cpu"), single)
    # Copies load from their own files (every name inside the folder is relative).
    subprocess.run(["cp", "-r", str(target), str(tmp_path / "copy")], check=True)
    shutil.rmtree(target)
    assert_same_results(ProductIndex.load(tmp_path / "copy", device="cpu"), single)


def test_on_disk_index_is_read_only(merged, tmp_path):
    loaded = ProductIndex.load(merged.save(tmp_path / "idx"), device="cpu")
    for index in (merged, loaded):
        with pytest.raises(ValueError, match="read-only.*build it again"):
            index.add(VECTORS[:2], ["new1", "new2"])
        with pytest.raises(ValueError, match="read-only"):
            index.remove(["p1"])
    assert loaded.ntotal == N


def test_tuned_sharded_build_searches_with_its_tuned_parameters(tmp_path):
    tuned = build(shards=3, work_dir=tmp_path, target_recall=0.9)
    assert tuned.tuning is not None and tuned.tuning["met"]
    loaded = ProductIndex.load(tuned.save(tmp_path / "idx"), device="cpu")
    assert loaded.search_params == tuned.search_params
    assert_same_results(loaded, tuned)


@pytest.mark.parametrize("name", INDEX_DATA_FILES)
def test_damaged_or_missing_on_disk_files_are_refused(merged, tmp_path, name):
    assert_missing_or_damaged_file_refused(merged.save(tmp_path / "idx"), name)


def assert_missing_or_damaged_file_refused(target: Path, name: str) -> None:
    """File ``name`` of the live version of ``target`` removed, then put back with one bit flipped: both refused."""
    path = live_version_dir(target) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.unlink()  # a hard link shared with the staging file: write a new file, not into the shared one
    with pytest.raises(FileNotFoundError, match=name):
        ProductIndex.load(target, device="cpu")
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=f"{name} does not match"):
        ProductIndex.load(target, device="cpu")


def test_shards_are_refused_before_training_where_they_cannot_work():
    with pytest.raises(ValueError, match="ivfpq-rflat"):
        ProductIndex.build(VECTORS, IDS, preset="ivfpq", device="cpu", shards=2)
    with pytest.raises(ValueError, match="ivfpq-rflat"):
        ProductIndex.build(VECTORS, IDS, preset="hnsw", device="cpu", shards=2)
    with pytest.raises(ValueError, match="cannot build 2 shards.*needs >= 1000 vectors"):
        ProductIndex.build(VECTORS[:500], IDS[:500], preset="ivfpq-rflat", device="cpu", shards=2)
    with pytest.raises(ValueError, match="shards must be a whole number"):
        ProductIndex.build(VECTORS, IDS, preset="ivfpq-rflat", device="cpu", shards=0)


def saves_killed_at_every_step(
    old: ProductIndex, new: ProductIndex, tmp_path: Path, monkeypatch
) -> Iterator[Tuple[str, ProductIndex]]:
    """For every crash point a save of ``new`` passes: ``old`` saved, a child killed at that point while saving
    ``new`` over it; yields (step, what then loads). Checks that the save passes every step but format 1's."""
    steps: List[str] = []
    monkeypatch.setattr(layout, "_crash_point", steps.append)
    new.save(tmp_path / "dry")
    monkeypatch.undo()
    assert sorted(set(steps), key=SAVE_STEPS.index) == [s for s in SAVE_STEPS if not s.startswith("flat-")]
    seen: Counter = Counter()
    for number, step in enumerate(steps):
        seen[step] += 1
        target = old.save(tmp_path / f"run{number}")

        def child(step: str = step, occurrence: int = seen[step], target: Path = target) -> None:
            passed: Counter = Counter()

            def crash_at(name: str) -> None:
                passed[name] += 1
                if name == step and passed[name] == occurrence:
                    os._exit(137)

            layout._crash_point = crash_at
            new.save(target)

        assert run_in_child(child) == 137, f"the save never reached {step}"
        yield step, ProductIndex.load(target, device="cpu")


def test_kill_at_every_step_of_an_on_disk_save_leaves_old_or_new(single, merged, tmp_path, monkeypatch):
    """An in-memory index replaced by the on-disk one, killed at every crash point: the old or the new loads."""
    expected_old, _ = single.search(QUERIES, 10)
    expected_new, _ = merged.search(QUERIES, 10)
    for step, loaded in saves_killed_at_every_step(single, merged, tmp_path, monkeypatch):
        scores, _ = loaded.search(QUERIES, 10)
        expected = expected_new if loaded.layout["kind"] == "ondisk" else expected_old
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6, err_msg=f"killed at {step}")


def test_search_params_taken_from_another_index(single, merged, tmp_path):
    copy = build(shards=2, work_dir=tmp_path)
    copy.use_search_params({"nprobe": 3, "k_factor": 2})
    assert copy.search_params["nprobe"] == 3
    reference = build()
    reference.use_search_params({"nprobe": 3, "k_factor": 2})
    assert_same_results(copy, reference)
    assert ProductIndex.load(copy.save(tmp_path / "idx"), device="cpu").search_params == copy.search_params
    with pytest.raises(ValueError, match="efSearch.*not a search parameter"):
        copy.use_search_params({"efSearch": 64})
    with pytest.raises(ValueError, match="positive integer"):
        copy.use_search_params({"nprobe": 0})
