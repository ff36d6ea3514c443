"""Shared fixtures: a tiny generated street-to-shop set and the path of the real VITON data."""

from pathlib import Path

import pytest

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
