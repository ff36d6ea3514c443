"""Tests of retrieval.io: every image the datasets of this field throw at the reader, with golden values."""

from __future__ import annotations

import os
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval.io as rio
from retrieval.files import file_sha1
from retrieval.io import (
    MAX_PIXELS_ENV_VARIABLE,
    ImageReadError,
    get_max_pixels,
    images_to_tensor,
    read_image,
    read_mask,
    resize_image,
    set_max_pixels,
)
from tests.deadline import within


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


@pytest.mark.parametrize("reader", [read_image, read_mask, file_sha1])
def test_fifo_is_refused_without_blocking(tmp_path, reader):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes: opening it for reading without O_NONBLOCK would wait forever
    with pytest.raises(ImageReadError, match=r"pipe\.jpg is not a regular file \(a FIFO"):
        within(10, reader, fifo)


@pytest.mark.parametrize("reader", [read_image, file_sha1])
def test_dev_zero_is_refused_without_reading(reader):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this platform")
    with pytest.raises(ImageReadError, match=r"/dev/zero is not a regular file \(a character device"):
        within(10, reader, "/dev/zero")


def test_socket_and_directory_are_refused_by_file_sha1(tmp_path):
    with pytest.raises(ImageReadError, match="not a regular file \\(a directory"):
        file_sha1(tmp_path)
    if not hasattr(socket, "AF_UNIX"):
        return
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(ImageReadError, match="s.sock is not a regular file \\(a socket"):
            within(10, read_image, path)
    finally:
        server.close()
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        file_sha1(tmp_path / "absent.jpg")


def test_a_symlink_to_an_image_is_read(tmp_path):
    image = _noise_image(5, 4)
    Image.fromarray(image).save(tmp_path / "real.png")
    os.symlink(tmp_path / "real.png", tmp_path / "link.png")
    np.testing.assert_array_equal(read_image(tmp_path / "link.png"), image)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """A 12000x9000 (108 MP) JPEG, dark left half and bright right half; cheap to make (uniform blocks)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    image = Image.new("RGB", (12000, 9000), (20, 30, 40))
    image.paste((230, 200, 10), (6000, 0, 12000, 9000))
    image.save(path, quality=80)
    return path


def test_huge_jpeg_is_read_at_reduced_scale_quickly(huge_jpeg):
    """Over the limit (and over Pillow's own ~89 MP guard): drafted to 1/4 scale, not refused."""
    started = time.perf_counter()
    read = read_image(huge_jpeg)
    assert time.perf_counter() - started < 3.0
    assert read.shape == (2250, 3000, 3)  # the smallest DCT scale with >= 2048 px on the long side
    assert np.abs(read[:, :1400].astype(int) - (20, 30, 40)).max() <= 6
    assert np.abs(read[:, 1600:].astype(int) - (230, 200, 10)).max() <= 6
    small = read_image(huge_jpeg, min_size=(256, 192))  # what the descriptor needs: 1/8 scale
    assert small.shape == (1125, 1500, 3)
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3), "Pillow's global guard is left as it was"


def test_min_size_drafts_a_jpeg_but_never_below_the_size_asked_for(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((800, 600, 3), 128, np.uint8)).save(path)
    assert read_image(path).shape == (800, 600, 3)
    assert read_image(path, min_size=(256, 192)).shape == (400, 300, 3)  # 1/2: 1/4 would be 200x150 < 256x192
    assert read_image(path, min_size=(100, 75)).shape == (100, 75, 3)
    assert read_image(path, min_size=(1000, 1000)).shape == (800, 600, 3)
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 800 wide x 600 high, displayed 600 x 800
    Image.fromarray(np.full((600, 800, 3), 128, np.uint8)).save(sideways, exif=exif)
    assert read_image(sideways, min_size=(256, 192)).shape == (400, 300, 3)
    png = tmp_path / "photo.png"
    Image.fromarray(np.full((80, 60, 3), 128, np.uint8)).save(png)
    assert read_image(png, min_size=(8, 6)).shape == (80, 60, 3), "only JPEGs are drafted"


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height with 64 bytes of pixel data: a size check must come first."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))))
    return path


def test_too_large_non_jpeg_is_refused_before_decoding_saying_how_to_raise_the_limit(tmp_path, monkeypatch):
    path = _png_header_only(tmp_path / "scan.png", 14000, 14000)  # 196 MP: Pillow's own guard would raise
    with pytest.raises(ImageReadError, match=r"scan\.png is 14000x14000.*STREET2SHOP_MAX_PIXELS.*set_max_pixels"):
        read_image(path)
    # Raised, the limit lets the file through to decoding (which then finds no pixel data).
    monkeypatch.setenv(MAX_PIXELS_ENV_VARIABLE, "500000000")
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        read_image(path)
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        read_image(path, max_pixels=10**9)


def test_pixel_limit_follows_the_environment_and_set_max_pixels(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(_noise_image(20, 30)).save(path)
    monkeypatch.delenv(MAX_PIXELS_ENV_VARIABLE, raising=False)
    assert get_max_pixels() == rio.DEFAULT_MAX_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV_VARIABLE, "500")
    with pytest.raises(ImageReadError, match="max_pixels=500"):
        read_image(path)
    try:
        set_max_pixels(600)  # overrides the environment
        assert read_image(path).shape == (20, 30, 3)
        set_max_pixels(None)
        assert get_max_pixels() == 500
    finally:
        set_max_pixels(None)
    monkeypatch.setenv(MAX_PIXELS_ENV_VARIABLE, "lots")
    with pytest.raises(ValueError, match="STREET2SHOP_MAX_PIXELS='lots' is not a positive integer"):
        read_image(path)
    with pytest.raises(ValueError, match="positive"):
        set_max_pixels(0)


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
