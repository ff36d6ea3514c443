"""The load test tool: loopback only, bounded, padded catalogs that search like the original."""

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")

from retrieval.datasets import load_viton  # noqa: E402
from retrieval.descriptors import create_descriptor  # noqa: E402
from street2shop import Pipeline  # noqa: E402
from street2shop.engine import build_index  # noqa: E402
from street2shop.service.loadtest import pad_catalog, query_photos, run_loadtest  # noqa: E402


@pytest.fixture(scope="module")
def small_index(synthetic_root, tmp_path_factory):
    data = load_viton(synthetic_root, split="val")
    index_dir = tmp_path_factory.mktemp("loadtest") / "idx"
    build_index(data.catalog, create_descriptor("colorhist"), index_dir, progress=False, faiss_device="cpu")
    return index_dir, data


def test_padded_copy_searches_like_the_original_and_leaves_it_alone(small_index, tmp_path):
    index_dir, data = small_index
    assert pad_catalog(index_dir, tmp_path / "padded", 500) == 500
    original = Pipeline.load(index_dir, device="cpu")
    padded = Pipeline.load(tmp_path / "padded", device="cpu")
    assert original.ntotal == len(data.catalog) and padded.ntotal == 500
    photo = data.catalog["image"].iloc[2]
    assert padded.search(photo, k=1)[0].hits[0].product_id == str(data.catalog["product_id"].iloc[2])
    assert padded.product_image_path("synthetic-0000001").exists()


def test_the_load_test_refuses_other_hosts_and_unbounded_runs(small_index):
    index_dir, data = small_index
    photos = query_photos([data.queries["image"].iloc[0]])
    with pytest.raises(ValueError, match="loopback only"):
        run_loadtest(index_dir, photos, host="10.0.0.1")
    with pytest.raises(ValueError, match="duration"):
        run_loadtest(index_dir, photos, duration_s=3600)
    with pytest.raises(ValueError, match="bound of 256"):
        run_loadtest(index_dir, photos, concurrencies=(1, 1000))


@pytest.mark.slow
def test_a_short_load_test_with_reloads_has_no_failures(small_index, tmp_path):
    index_dir, data = small_index
    photos = query_photos([p for p in data.queries["image"]])
    reports = run_loadtest(
        index_dir, photos, concurrencies=(1, 4), duration_s=2.0, reload_during=True, log_path=tmp_path / "log"
    )
    assert [r.concurrency for r in reports] == [1, 4]
    assert all(r.requests > 0 and r.failed == 0 and r.reloads > 0 and r.reload_failures == 0 for r in reports)
