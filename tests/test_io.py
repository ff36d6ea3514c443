"""Tests of retrieval.io: every image the datasets of this field throw at the reader, with golden values."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.io import (
    ImageReadError,
    file_sha1,
    images_to_tensor,
    read_image,
    read_mask,
    resize_image,
    write_image_atomic,
)


def _noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_rgb_png_roundtrip_is_exact(tmp_path):
    image = _noise_image(12, 8)
    path = tmp_path / "rgb.png"
    Image.fromarray(image).save(path)
    read = read_image(path)
    assert read.dtype == np.uint8 and read.shape == (12, 8, 3)
    np.testing.assert_array_equal(read, image)


def test_rgb_jpeg_is_close(tmp_path):
    image = np.full((16, 24, 3), (200, 40, 90), np.uint8)
    path = tmp_path / "rgb.jpg"
    Image.fromarray(image).save(path, quality=95)
    read = read_image(str(path))
    assert read.shape == (16, 24, 3)
    assert np.abs(read.astype(int) - image.astype(int)).max() <= 4


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    read = read_image(path)
    assert read.shape == (6, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(read[..., channel], grey)


def test_one_bit_image(tmp_path):
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(path)
    read = read_image(path)
    np.testing.assert_array_equal(read[..., 0], [[0, 255], [255, 0]])


def test_rgba_composites_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [0, 0, 255, 255]]], np.uint8)
    path = tmp_path / "alpha.png"
    Image.frombytes("RGBA", (3, 1), rgba.tobytes()).save(path)
    read = read_image(path).astype(int)
    np.testing.assert_array_equal(read[0, 0], [255, 255, 255])  # fully transparent -> white
    assert read[0, 1, 0] == 255 and abs(read[0, 1, 1] - 128) <= 1 and abs(read[0, 1, 2] - 128) <= 1
    np.testing.assert_array_equal(read[0, 2], [0, 0, 255])  # opaque stays as is


def test_grey_with_alpha_composites_over_white(tmp_path):
    path = tmp_path / "la.png"
    Image.frombytes("LA", (2, 1), bytes([0, 0, 0, 255])).save(path)
    np.testing.assert_array_equal(read_image(path)[0], [[255, 255, 255], [0, 0, 0]])


def test_palette_image_reads_palette_colours_and_mask_keeps_indices(tmp_path):
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    path = tmp_path / "palette.png"
    image = Image.frombytes("P", (2, 2), indices.tobytes())
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(path)
    np.testing.assert_array_equal(read_image(path)[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(read_image(path)[1, 0], [0, 255, 0])
    np.testing.assert_array_equal(read_mask(path), indices)


def test_palette_with_transparency_composites_over_white(tmp_path):
    path = tmp_path / "palette-transparent.png"
    image = Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([10, 20, 30, 0, 0, 255])
    image.save(path, transparency=0)
    np.testing.assert_array_equal(read_image(path)[0], [[255, 255, 255], [0, 0, 255]])


def test_sixteen_bit_png_is_scaled_by_range_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    read = read_image(path)[0, :, 0].astype(int)
    assert read[0] == 0 and abs(read[1] - 128) <= 1 and read[2] == 255


def test_float_image_in_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(path)
    read = read_image(path)[0, :, 0].astype(int)
    assert read[0] == 0 and abs(read[1] - 128) <= 1 and read[2] == 255


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path, quality=95)
    read = read_image(path)
    assert read.shape == (8, 8, 3)
    assert read.min() >= 250  # no ink = white


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide x 10 high, tagged "rotate 90 CW to display" (orientation 6): shown 10 wide x 20 high.
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = 255  # left half white in storage -> top half white once displayed
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    read = read_image(path)
    assert read.shape == (20, 10, 3)
    assert read[:8].mean() > 200 and read[12:].mean() < 50


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(_noise_image(64, 64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        read_image(path)


def test_truncated_png_raises(tmp_path):
    path = tmp_path / "truncated.png"
    Image.fromarray(_noise_image(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(path)


def test_random_bytes_raise(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="noise.jpg"):
        read_image(path)


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(path)


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        read_image(tmp_path / "nowhere.jpg")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


def test_too_many_pixels_raises_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_noise_image(20, 30)).save(path)
    with pytest.raises(ImageReadError, match=r"30x20.*max_pixels=500"):
        read_image(path, max_pixels=500)
    assert read_image(path, max_pixels=600).shape == (20, 30, 3)


def test_read_mask_of_grey_jpeg_keeps_grey_values(tmp_path):
    path = tmp_path / "mask.jpg"
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(path, quality=95)
    read = read_mask(path)
    assert read.shape == (16, 16) and read.dtype == np.uint8
    np.testing.assert_array_equal(read > 127, mask > 127)


def test_resize_shrinks_and_grows():
    image = _noise_image(40, 30)
    assert resize_image(image, (20, 15)).shape == (20, 15, 3)
    assert resize_image(image, (80, 60)).shape == (80, 60, 3)
    assert resize_image(image, (20, 60)).dtype == np.uint8
    with pytest.raises(ValueError):
        resize_image(image, (0, 10))
    with pytest.raises(ValueError, match="uint8"):
        resize_image(image.astype(np.float32), (10, 10))


def test_resize_of_constant_image_keeps_value():
    image = np.full((9, 7, 3), 77, np.uint8)
    assert np.all(resize_image(image, (3, 2)) == 77)


def test_images_to_tensor_shape_range_and_values():
    images = [np.zeros((4, 5, 3), np.uint8), np.full((4, 5, 3), 255, np.uint8)]
    images[0][1, 2] = (255, 0, 51)
    batch = images_to_tensor(images)
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == torch.float32
    assert float(batch.min()) == 0.0 and float(batch.max()) == 1.0
    assert torch.allclose(batch[0, :, 1, 2], torch.tensor([1.0, 0.0, 0.2]))
    assert batch.is_contiguous()


def test_images_to_tensor_rejects_mixed_sizes_and_empty():
    with pytest.raises(ValueError, match="same size"):
        images_to_tensor([np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(ValueError):
        images_to_tensor([])


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
