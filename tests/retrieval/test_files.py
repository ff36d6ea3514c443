"""Tests of retrieval.files: atomic writers and file hashes (the checked cache bytes are tested with the feature
cache, in test_features_cache.py; the regular-file guard file_sha1 shares with the readers, in test_io.py)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from retrieval.files import file_sha1, write_image_atomic
from retrieval.io import read_image, read_mask


def _noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_file_sha1_matches_hashlib(tmp_path):
    path = tmp_path / "bytes.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # several chunks
    path.write_bytes(payload)
    assert file_sha1(path) == hashlib.sha1(payload).hexdigest()


def test_write_image_atomic_roundtrips_and_leaves_no_temporary(tmp_path):
    image = _noise_image(10, 7)
    target = tmp_path / "sub" / "out.png"
    write_image_atomic(target, image)
    np.testing.assert_array_equal(read_image(target), image)
    grey = image[..., 0]
    write_image_atomic(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), grey)
    labels = np.array([[0, 5], [13, 2]], np.uint8)
    write_image_atomic(tmp_path / "parse.png", labels, palette=[0] * 3 + [255, 0, 0] * 19)
    assert Image.open(tmp_path / "parse.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "parse.png"), labels)
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["grey.png", "out.png", "parse.png"]


def test_write_image_atomic_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_image_atomic(tmp_path / "out.unknown", _noise_image(4, 4))
