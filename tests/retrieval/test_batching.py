"""retrieval/batching.py: the fitted-state cache is verified before it is trusted."""

import logging

import pytest
import torch

from retrieval.batching import fit_descriptor, fitted_state_path
from retrieval.datasets import load_dataset
from retrieval.descriptors import create_descriptor


def small_sift():
    return create_descriptor("sift", n_clusters=4, pca_dim=None, image_size=(96, 64))


@pytest.mark.parametrize("damage", ["flip", "nan"])
def test_a_damaged_fitted_state_is_refitted_not_used(synthetic_root, tmp_path, caplog, damage):
    """torch.load reads a checkpoint with one flipped byte without complaint: the checksum footer catches it."""
    train = list(load_dataset(f"viton:{synthetic_root}", split="val").train["product_image"][:8])
    fitted = fit_descriptor(small_sift(), train, progress=False, cache_dir=tmp_path)
    stored = fitted_state_path(small_sift(), train, tmp_path)
    if damage == "flip":
        payload = bytearray(stored.read_bytes())
        payload[len(payload) // 2] ^= 0x01
        stored.write_bytes(bytes(payload))
    else:  # a well-formed file whose codebook holds NaN: sealed, but not a usable state
        import io

        from retrieval.files import write_checked_bytes

        buffer = io.BytesIO()
        torch.save(
            {"centroids": torch.full_like(fitted.centroids, float("nan")), "_fitted": torch.tensor(True)}, buffer
        )
        write_checked_bytes(stored, buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        refitted = fit_descriptor(small_sift(), train, progress=False, cache_dir=tmp_path)
    assert "fitting again" in caplog.text
    torch.testing.assert_close(refitted.centroids, fitted.centroids, rtol=0, atol=0)
