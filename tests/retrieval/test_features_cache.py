"""The feature cache under damage and tampering: every entry is verified on read, a bad one is recomputed.

Each test builds a cache (one entry per image content), damages it the way a hostile tester did (a
flipped byte, an entry of the wrong shape, NaN, a FIFO in place of an entry), reruns, and checks that the
vectors equal a fresh computation, that only the bad entries were recomputed, and that the run said so in
exactly one warning.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from retrieval.features import FeatureCache, decode_feature_chunk, extract_features
from retrieval.files import DamagedCacheError, read_checked_bytes, write_checked_bytes
from retrieval.io import ImageReadError
from tests.deadline import within

SIZE = (16, 12)
N_IMAGES, CHUNK = 10, 4  # embedded 4, 4 and 2 images at a time, one cache entry per image
DIM = 6


def _embed(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 6): channel means and standard deviations, distinct per noise image."""
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


@pytest.fixture
def photos(tmp_path):
    paths = []
    for seed in range(N_IMAGES):
        image = np.random.default_rng(seed).integers(0, 256, size=(20, 15, 3), dtype=np.uint8)
        image[..., seed % 3] //= 2  # make the rows clearly different
        path = tmp_path / "photos" / f"{seed:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


class Counting:
    """`_embed` that counts the images it is asked to embed (what was recomputed)."""

    def __init__(self):
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return _embed(images)


def _run(paths, cache, **options):
    embed = Counting()
    vectors = extract_features(embed, paths, SIZE, batch_size=3, chunk_size=CHUNK, cache=cache, **options)
    return vectors, embed.images


def _chunk_files(cache):
    return sorted(cache.directory.glob("*.npy"))


def _entry_of(cache, paths, position):
    """The cache file of image `position` (keyed by its content, not by its position)."""
    from retrieval.files import file_sha1

    return cache.path(file_sha1(paths[position]))


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "street2shop.features"]


@pytest.fixture
def filled(photos, tmp_path):
    """A cache holding all three chunks, and the vectors of a fresh computation without cache."""
    cache = FeatureCache(tmp_path / "cache", "stage")
    fresh = extract_features(_embed, photos, SIZE, batch_size=3, chunk_size=CHUNK)
    vectors, computed = _run(photos, cache)
    assert computed == N_IMAGES and len(_chunk_files(cache)) == N_IMAGES
    np.testing.assert_array_equal(vectors, fresh)
    return cache, fresh


def test_chunks_are_written_with_a_checksum_and_stay_loadable(filled):
    cache, _ = filled
    for path in _chunk_files(cache):
        assert np.load(path).dtype == np.float32  # the footer follows the array: np.load still reads it
        decode_feature_chunk(read_checked_bytes(path))
    assert not list(cache.directory.glob("*.tmp")), "atomic writes leave no temporary file"


def test_intact_cache_is_read_without_recomputing_or_warning(filled, photos, caplog):
    cache, fresh = filled
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 0 and not _warnings(caplog)
    np.testing.assert_array_equal(vectors, fresh)


def test_one_flipped_byte_is_detected_and_only_that_entry_recomputed(filled, photos, caplog):
    cache, fresh = filled
    path = _entry_of(cache, photos, 4)
    data = bytearray(path.read_bytes())
    data[140] ^= 0x01  # inside the float data: np.load alone reads a slightly different, plausible vector
    path.write_bytes(bytes(data))
    assert not np.array_equal(np.load(path), fresh[4:5]), "the flip really changes the stored vector"
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 1
    np.testing.assert_array_equal(vectors, fresh)
    assert len(_warnings(caplog)) == 1 and str(cache.directory) in _warnings(caplog)[0].getMessage()
    _, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 0, "the recomputed entry was written back"


@pytest.mark.parametrize(
    "payload",
    [
        np.zeros((1, DIM + 1), np.float32),  # another width
        np.zeros((2, DIM), np.float32),  # another number of images
        np.zeros((1, DIM), np.float64),  # another dtype
        np.zeros((DIM,), np.float32),  # not 2-D
        np.full((1, DIM), np.nan, np.float32),  # NaN
        np.full((1, DIM), np.inf, np.float32),  # inf
    ],
    ids=["width", "rows", "float64", "1d", "nan", "inf"],
)
@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksummed", "plain-npy"])
def test_an_entry_of_the_wrong_kind_is_recomputed(filled, photos, caplog, payload, with_checksum):
    """With a valid checksum (what a buggy writer or a careful tamperer makes) and without (np.save)."""
    cache, fresh = filled
    buffer = io.BytesIO()
    np.save(buffer, payload)
    target = _entry_of(cache, photos, 0)
    if with_checksum:
        write_checked_bytes(target, buffer.getvalue())
    else:
        target.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 1
    np.testing.assert_array_equal(vectors, fresh)
    assert len(_warnings(caplog)) == 1


def test_many_damaged_entries_give_one_warning(filled, photos, caplog):
    cache, fresh = filled
    for path in _chunk_files(cache):
        path.write_bytes(path.read_bytes()[:-10])  # truncated: the footer is gone
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == N_IMAGES
    np.testing.assert_array_equal(vectors, fresh)
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert (
        len(messages) == 1 and f"{N_IMAGES} of {N_IMAGES} cached" in messages[0] and str(cache.directory) in messages[0]
    )


def test_cached_entries_of_another_width_are_recomputed_without_dim(filled, photos, caplog):
    """No `dim` given: a freshly computed image tells the width, and a checksummed entry of another width loses."""
    cache, fresh = filled
    _entry_of(cache, photos, 8).unlink()  # this image must be computed: it sets the width
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, DIM + 2), np.float32))
    write_checked_bytes(_entry_of(cache, photos, 0), buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 2
    np.testing.assert_array_equal(vectors, fresh)
    assert len(_warnings(caplog)) == 1


def test_cached_entries_disagreeing_on_width_are_settled_by_recomputing_the_first(filled, photos, caplog):
    cache, fresh = filled
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, DIM + 2), np.float32))
    write_checked_bytes(_entry_of(cache, photos, 4), buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 2, "the first image tells the width, then the odd one is recomputed"
    np.testing.assert_array_equal(vectors, fresh)
    assert len(_warnings(caplog)) == 1 and "width 8, expected 6" in _warnings(caplog)[0].getMessage()
    # With the width known, only the odd entry is recomputed.
    write_checked_bytes(_entry_of(cache, photos, 4), buffer.getvalue())
    vectors, computed = _run(photos, FeatureCache(cache.directory.parent, "stage"), dim=DIM)
    assert computed == 1
    np.testing.assert_array_equal(vectors, fresh)


def test_a_fifo_in_place_of_an_entry_is_recomputed_not_waited_on(filled, photos):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    cache, fresh = filled
    target = _entry_of(cache, photos, 4)
    target.unlink()
    os.mkfifo(target)
    vectors, computed = within(20, _run, photos, FeatureCache(cache.directory.parent, "stage"))
    assert computed == 1
    np.testing.assert_array_equal(vectors, fresh)


def test_non_finite_features_are_returned_but_never_cached(photos, tmp_path):
    cache = FeatureCache(tmp_path / "cache", "stage")

    def broken(images):
        out = _embed(images)
        out[0, 0] = float("nan")
        return out

    vectors = extract_features(broken, photos, SIZE, batch_size=3, chunk_size=CHUNK, cache=cache)
    finite = np.isfinite(vectors).all(axis=1)
    assert not finite.all() and finite.any()
    # an entry that every later read would refuse is not written; the finite ones are
    assert _chunk_files(cache) == sorted(_entry_of(cache, photos, i) for i in np.flatnonzero(finite))


def test_read_checked_bytes_refuses_damage(tmp_path):
    path = tmp_path / "entry.bin"
    write_checked_bytes(path, b"payload")
    assert read_checked_bytes(path) == b"payload"
    path.write_bytes(path.read_bytes().replace(b"payload", b"paYload"))
    with pytest.raises(DamagedCacheError, match="entry.bin.*checksum"):
        read_checked_bytes(path)
    path.write_bytes(b"payload")
    with pytest.raises(DamagedCacheError, match="no checksum footer"):
        read_checked_bytes(path)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_checked_bytes(tmp_path)


# --------------------------------------------------------------------------------------------------
# end to end: the index, the CLI
# --------------------------------------------------------------------------------------------------


def test_a_tampered_chunk_never_reaches_the_index(synthetic_root, tmp_path, caplog):
    """The hostile tester's case: a flipped byte made a product unfindable by its own photo."""
    from retrieval.datasets import load_viton
    from retrieval.descriptors import create_descriptor
    from retrieval.files import file_sha1
    from street2shop.engine import Searcher, build_index

    catalog = load_viton(synthetic_root, split="val").catalog
    descriptor = create_descriptor("colorhist")
    build_index(catalog, descriptor, tmp_path / "first", progress=False, cache_dir=tmp_path / "cache")
    (chunk,) = (tmp_path / "cache").rglob(f"{file_sha1(catalog['image'].iloc[0])}.npy")
    data = bytearray(chunk.read_bytes())
    stream = io.BytesIO(bytes(data))
    np.lib.format.read_array_header_1_0(stream) if np.lib.format.read_magic(stream) == (1, 0) else None
    header = stream.tell()  # row 0's floats start here
    data[header : header + 4 * descriptor.dim] = np.zeros(descriptor.dim, np.float32).tobytes()  # wipe product 0
    chunk.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        build_index(catalog, descriptor, tmp_path / "second", progress=False, cache_dir=tmp_path / "cache")
    assert len(_warnings(caplog)) == 1
    results = Searcher(tmp_path / "second", device="cpu").search([catalog["image"].iloc[0]], k=1)
    assert results["product_id"].iloc[0] == str(catalog["product_id"].iloc[0])


def _catalog_csv(tmp_path, synthetic_root, odd_path):
    from retrieval.datasets import load_viton

    catalog = load_viton(synthetic_root, split="val").catalog.iloc[:3]
    lines = ["product_id,image"] + [f"{p},{i}" for p, i in zip(catalog["product_id"], catalog["image"])]
    lines.append(f"odd,{odd_path}")
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev-zero"])
def test_index_refuses_a_directory_fifo_or_device_in_the_catalog_in_one_line(synthetic_root, tmp_path, kind):
    from street2shop.cli import cli

    if kind == "directory":
        odd = tmp_path / "a-directory.jpg"
        odd.mkdir()
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        odd = tmp_path / "a-fifo.jpg"
        os.mkfifo(odd)
    else:
        odd = "/dev/zero"
        if not os.path.exists(odd):
            pytest.skip("no /dev/zero on this platform")
    catalog = _catalog_csv(tmp_path, synthetic_root, odd)
    arguments = [
        "index",
        "--catalog",
        f"csv:{catalog}",
        "--descriptor",
        "colorhist",
        "--out",
        str(tmp_path / "idx"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    result = within(60, CliRunner().invoke, cli, arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"error: {odd} is not a regular file" in result.output
    assert not (tmp_path / "idx").exists()


class _Inverting(torch.nn.Module):
    """A proxy stand-in: 1 - x, counting the images it renders."""

    name = "invert"

    def __init__(self):
        super().__init__()
        self.images = 0

    def fingerprint(self) -> str:
        return "v1"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return 1 - images


def test_damaged_proxy_outputs_are_generated_again_with_one_warning(photos, tmp_path, caplog):
    from retrieval.features import materialize_proxy_outputs
    from retrieval.io import read_image

    proxy = _Inverting()
    outputs = materialize_proxy_outputs(proxy, photos, tmp_path / "outputs", size=SIZE)
    assert proxy.images == N_IMAGES
    first = [read_image(out) for out in outputs]
    flipped = bytearray(Path(outputs[0]).read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    Path(outputs[0]).write_bytes(bytes(flipped))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outputs[1], format="PNG")  # another size
    Path(outputs[2]).unlink()
    if hasattr(os, "mkfifo"):
        os.mkfifo(outputs[2])
    with caplog.at_level(logging.WARNING):
        again = within(30, lambda: materialize_proxy_outputs(proxy, photos, tmp_path / "outputs", size=SIZE))
    assert again == outputs and proxy.images == N_IMAGES + 3
    for out, image in zip(outputs, first):
        np.testing.assert_array_equal(read_image(out), image)
    messages = [r.getMessage() for r in caplog.records if r.name == "street2shop.features"]
    assert len(messages) == 1 and "3 stored images" in messages[0]
