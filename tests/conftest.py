"""Shared fixtures: a tiny generated street-to-shop set and the path of the real VITON data."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VITON_ROOT = REPO.parent / "shared" / "data" / "viton"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 24-product synthetic set in the VITON layout, generated once per test session."""
    from retrieval.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", n_products=24, seed=0)


@pytest.fixture
def viton_root():
    if not (VITON_ROOT / "train_pairs.txt").exists():
        pytest.skip(
            f"real VITON data not found at {VITON_ROOT} (it sits beside the repository as ../shared/data/viton)"
        )
    return VITON_ROOT


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each device the code must run on: the CPU always, CUDA where there is one (skipped, saying so, elsewhere)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path is checked on a machine with one (pytest -m gpu)")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """One OpenMP thread for faiss, restored after the module. These tests check results, not speed: two spinning
    threads on an oversubscribed CPU made k-means ~10x slower here; HNSW's graph depends on the threads'
    interleaving; and forked children must not inherit a thread pool."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
