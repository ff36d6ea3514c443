"""N shards kept apart and searched together (``index.shards``, ``faiss.IndexShards``): the results of one index
over the whole catalog, saved and loaded through the versioned, checksummed, crash-safe storage, placed one
shard per GPU where there are several (the plan and the copy tested here without a GPU).

The seeded clustered 4000 x 32 set of ``test_ondisk``: big enough for the IVF preset, a second to build."""

from __future__ import annotations

import json
import os
from typing import List

import faiss
import numpy as np
import pytest

from index import ProductIndex
from index import device as placement
from index.faiss_index import shard_parts
from index.shards import check_separate_layout
from index.storage import live_version_dir
from tests.index.test_ondisk import (
    IDS,
    QUERIES,
    VECTORS,
    assert_missing_or_damaged_file_refused,
    saves_killed_at_every_step,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py

SHARD_SIZES = [1333, 1334, 1333]


def build(preset: str, shards=None, target_recall=None, **options) -> ProductIndex:
    """``preset`` over VECTORS, one index or 3 separate shards; target_recall None: the preset's fixed settings."""
    return ProductIndex.build(
        VECTORS,
        IDS,
        preset=preset,
        device="cpu",
        target_recall=target_recall,
        metadata={"descriptor": "gem", "fingerprint": "f0", "dim": 32},
        shards=shards,
        shard_layout="separate",
        **options,
    )


def exhaustive(index: ProductIndex) -> ProductIndex:
    """Probe every list and re-rank every candidate: an IVF index searches exactly, so shards must agree."""
    if index.factory_string.startswith("IVF"):
        nlist = faiss.extract_index_ivf(shard_parts(index._cpu_index)[0]).nlist
        index.use_search_params({"nprobe": nlist, "k_factor": 400, "min_candidates": 4000})
    return index


def assert_same_top(index: ProductIndex, reference: ProductIndex, k: int = 10) -> None:
    scores, ids = index.search(QUERIES, k)
    expected_scores, expected_ids = reference.search(QUERIES, k)
    assert ids.tolist() == expected_ids.tolist()
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def flat_pair():
    return build("flat"), build("flat", shards=3)


@pytest.mark.parametrize("preset", ["flat", "ivfpq-rflat"])
def test_separate_shards_give_the_single_index_top_10(preset, flat_pair):
    single, separate = flat_pair if preset == "flat" else (build(preset), build(preset, shards=3))
    assert separate.layout == {"kind": "separate", "shards": 3, "shard_sizes": SHARD_SIZES}
    assert isinstance(separate._cpu_index, faiss.IndexShards) and separate.ntotal == len(VECTORS)
    if preset != "flat":  # the same seeded training: every shard holds the single index's quantizer
        quantizer = faiss.extract_index_ivf(single._cpu_index).quantizer
        for part in shard_parts(separate._cpu_index):
            shard_quantizer = faiss.extract_index_ivf(part).quantizer
            assert np.array_equal(
                shard_quantizer.reconstruct_n(0, shard_quantizer.ntotal), quantizer.reconstruct_n(0, quantizer.ntotal)
            )
    assert_same_top(exhaustive(separate), exhaustive(single))
    assert_same_top(separate, single, k=37)


def test_a_tuned_separate_build_meets_its_target():
    tuned = build("ivfpq-rflat", shards=2, target_recall=0.9)
    assert tuned.tuning is not None and tuned.tuning["met"] and tuned.search_params["nprobe"] >= 1
    assert tuned.tune(0.9, vectors=None)["met"]  # vectors reconstructed shard after shard


def test_saved_separate_shards_are_checksummed_and_load_with_the_same_results(flat_pair, tmp_path):
    single, separate = flat_pair
    target = separate.save(tmp_path / "idx", attachments={"descriptor.pt": b"state"})
    version = live_version_dir(target)
    assert {"index.faiss", "shard-0001.faiss", "shard-0002.faiss"} <= set(os.listdir(version))
    assert not (target / "shard-0001.faiss").exists()  # read through the version folder, never linked
    manifest = json.loads((version / "manifest.json").read_text())
    assert sorted(manifest["index_files"]) == ["shard-0001.faiss", "shard-0002.faiss"]
    loaded = ProductIndex.load(target, device="cpu")
    assert loaded.layout == separate.layout and loaded.product_ids == IDS
    assert_same_top(loaded, single)
    assert loaded.serialized_size() == separate.serialized_size()


@pytest.mark.parametrize("name", ["index.faiss", "shard-0002.faiss"])
def test_damaged_or_missing_shard_files_are_refused(flat_pair, tmp_path, name):
    assert_missing_or_damaged_file_refused(flat_pair[1].save(tmp_path / "idx"), name)


def test_layout_records_that_do_not_fit_are_named():
    assert check_separate_layout({"kind": "separate", "shards": 2, "shard_sizes": [3, 4]}) is None
    assert "whole number" in check_separate_layout({"shards": "2", "shard_sizes": [3, 4]})
    assert "whole number" in check_separate_layout({"shards": 0, "shard_sizes": []})
    assert "list of 2 sizes" in check_separate_layout({"shards": 2, "shard_sizes": [3]})
    assert "counts >= 0" in check_separate_layout({"shards": 2, "shard_sizes": [3, -1]})


def test_add_goes_to_the_last_shard_and_remove_is_refused(tmp_path):
    separate, single = build("flat", shards=3), build("flat")
    new = VECTORS[:7] * 0.5 + QUERIES[:7] * 0.5
    new_ids = [f"new{i}" for i in range(7)]
    for index in (separate, single):
        index.add(new, new_ids)
    assert separate.layout["shard_sizes"] == [1333, 1334, 1340]
    loaded = ProductIndex.load(separate.save(tmp_path / "idx"), device="cpu")
    assert loaded.layout == separate.layout and loaded.ntotal == len(VECTORS) + 7
    assert_same_top(loaded, single)
    assert loaded.search(new[:1], 1)[1][0, 0] == "new0"
    for index in (separate, loaded):
        with pytest.raises(ValueError, match="cannot remove products from the 3-shard index.*build it again"):
            index.remove(["p1"])
    assert loaded.ntotal == len(VECTORS) + 7


def test_unknown_layouts_and_too_many_shards_are_refused_before_training():
    with pytest.raises(ValueError, match="shard layout must be one of merged, separate"):
        ProductIndex.build(VECTORS, IDS, preset="flat", shards=2, shard_layout="spread")
    with pytest.raises(ValueError, match="at most one shard per vector"):
        ProductIndex.build(VECTORS[:3], IDS[:3], preset="flat", shards=4, shard_layout="separate")


def test_kill_at_every_step_of_a_separate_save_leaves_old_or_new(flat_pair, tmp_path, monkeypatch):
    """A single index replaced by separate shards, killed at every crash point: the old or the new loads whole."""
    single, separate = flat_pair
    for step, loaded in saves_killed_at_every_step(single, separate, tmp_path, monkeypatch):
        assert loaded.layout["kind"] in ("single", "separate") and loaded.ntotal == len(VECTORS), step
        assert_same_top(loaded, single)


# ---------------------------------------------------------------------------------------------- GPU placement
def test_shard_gpu_plan_gives_each_shard_its_own_gpu_where_there_are_enough():
    assert placement.shard_gpu_plan(4, 4) == [0, 1, 2, 3]
    assert placement.shard_gpu_plan(2, 8) == [0, 1]
    assert placement.shard_gpu_plan(5, 2) == [0, 1, 0, 1, 0]
    assert placement.shard_gpu_plan(3, 0) == [None, None, None]
    with pytest.raises(ValueError):
        placement.shard_gpu_plan(0, 2)


def test_without_a_gpu_separate_shards_search_on_the_cpu(flat_pair, monkeypatch):
    monkeypatch.setattr(placement, "faiss_gpu_count", lambda: 0)
    separate = flat_pair[1]
    placed = placement.SearchPlacement(separate._cpu_index, "flat", "auto")
    assert placed.device == "cpu"
    assert placed.search_index(separate._cpu_index, {}) is separate._cpu_index
    assert separate.use_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        separate.use_device("cuda")
    with pytest.raises(RuntimeError, match="no GPU"):
        placement.gpu_shards_copy(shard_parts(separate._cpu_index), "flat", {}, 0)


def test_two_gpus_get_the_shards_round_robin_and_search_them_together(flat_pair, monkeypatch):
    """The multi-GPU path with faiss's GPU copy replaced by a CPU copy that records its GPU: what runs on GPUs
    here is only ``index_cpu_to_gpu`` (not run: this machine has none)."""
    single, separate = flat_pair
    sent: List[int] = []

    def fake_clone(cpu_index, gpu=0):
        sent.append(gpu)
        return faiss.clone_index(cpu_index)

    monkeypatch.setattr(placement, "clone_to_gpu", fake_clone)
    monkeypatch.setattr(placement, "faiss_gpu_count", lambda: 2)
    fanned, keep = placement.gpu_search_copy(separate._cpu_index, "flat", {})
    assert sent == [0, 1, 0] and isinstance(fanned, faiss.IndexShards) and fanned.ntotal == len(VECTORS)
    scores, labels = fanned.search(QUERIES, 10)
    expected_scores, expected_ids = single.search(QUERIES, 10)
    assert np.array(IDS, dtype=object)[labels].tolist() == expected_ids.tolist()
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)
