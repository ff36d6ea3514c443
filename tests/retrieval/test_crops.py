"""Crops by boxes, materialised once into the cache (retrieval.datasets.crops)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from retrieval.datasets import crop_images
from retrieval.datasets.crops import clip_box, crop_key
from retrieval.io import read_image


@pytest.fixture
def photo(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_crops_are_the_box_pixels_clipped_to_the_image(photo, tmp_path):
    path, pixels = photo
    inside, clipped = crop_images([path, path], [(5, 10, 25, 30), (-4, 30, 70.4, 55)], cache_dir=tmp_path / "cache")
    assert np.array_equal(read_image(inside), pixels[10:30, 5:25])
    assert np.array_equal(read_image(clipped), pixels[30:40, 0:60])  # clipped to the 60 x 40 image
    assert os.path.dirname(inside) == str((tmp_path / "cache" / "crops").resolve())
    assert clip_box((0.4, 0.6, 10.5, 9.49), 40, 60) == (0, 1, 10, 9)  # rounded to the nearest pixel edge


def test_an_empty_box_after_clipping_names_the_image_and_the_box(photo, tmp_path):
    path, _ = photo
    with pytest.raises(ValueError, match=r"photo\.png: the box .*\(70, 0, 90, 10\) is empty after clipping .*60 x 40"):
        crop_images([path], [(70, 0, 90, 10)], cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="is empty after clipping"):
        clip_box((10, 10, 10, 20), 40, 60)
    with pytest.raises(ValueError, match="one box per source"):
        crop_images([path], [], cache_dir=tmp_path / "cache")


def test_crops_are_made_once_and_redone_when_the_source_changes(photo, tmp_path):
    path, pixels = photo
    cache = tmp_path / "cache"
    first = crop_images([path, path], [(0, 0, 10, 10), (0, 0, 10, 10)], cache_dir=cache)
    assert first[0] == first[1] and len(os.listdir(cache / "crops")) == 1
    os.utime(first[0], ns=(1, 1))  # a crop made again would get a new mtime
    assert crop_images([path], [(0, 0, 10, 10)], cache_dir=cache) == first[:1]
    assert os.stat(first[0]).st_mtime_ns == 1
    old_key = crop_key(path, (0, 0, 10, 10))
    Image.fromarray(255 - pixels).save(path)  # an edited source: a new key, a new crop
    os.utime(path, ns=(10**18, 10**18))
    assert crop_key(path, (0, 0, 10, 10)) != old_key
    (again,) = crop_images([path], [(0, 0, 10, 10)], cache_dir=cache)
    assert again != first[0] and np.array_equal(read_image(again), 255 - pixels[:10, :10])
