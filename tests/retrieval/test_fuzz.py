"""Property-based fuzzing of the two doors bad input comes through: the image reader and the CSV loader.

The only outcomes allowed are a valid result (an (H, W, 3) uint8 RGB array; a validated RetrievalSet)
or the documented error (ImageReadError / FileNotFoundError; ValueError naming the CSV file): never a
hang, a crash or another exception type. Examples are derandomized so CI sees the same ones every run,
and the example database is off so no .hypothesis folder appears in the repository.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval.datasets import load_csv
from retrieval.io import ImageReadError, read_image, read_mask

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Pillow warns (rather than raises) about damaged EXIF blocks it then ignores: expected noise here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Corrupt EXIF data:UserWarning", "ignore:Truncated File Read:UserWarning"
)

FUZZ = settings(
    max_examples=200,
    deadline=2000,  # ms per example: a pathological decode shows up as a failure, not a slow suite
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Bounds the memory a mutated header may ask for; over it, the reader's refusal is what is tested.
MAX_PIXELS = 2_000_000
SECONDS_PER_EXAMPLE = 10


@contextlib.contextmanager
def _hang_guard(seconds: int = SECONDS_PER_EXAMPLE):
    """Turn a hang into a failure (SIGALRM, main thread on POSIX only; elsewhere the deadline reports it)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"the example ran for more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------
# the image reader
# --------------------------------------------------------------------------------------------------


def _seed_images() -> dict:
    """Small valid files of every format and most modes the reader converts, as bytes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    files = {}

    def save(name, image, **options):
        buffer = io.BytesIO()
        image.save(buffer, **options)
        files[name] = buffer.getvalue()

    save("rgb.png", Image.fromarray(rgb), format="PNG")
    save("rgba.png", Image.fromarray(np.dstack([rgb, grey])), format="PNG")
    palette = Image.fromarray(grey).convert("P")
    save("palette.png", palette, format="PNG", transparency=0)
    save("deep.png", Image.fromarray(grey.astype(np.uint16) * 257), format="PNG")
    save("interlaced.png", Image.fromarray(rgb), format="PNG", interlace=1)
    save("rgb.jpg", Image.fromarray(rgb), format="JPEG", quality=90)
    save("grey.jpg", Image.fromarray(grey), format="JPEG")
    save("progressive.jpg", Image.fromarray(rgb), format="JPEG", progressive=True)
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(rgb), format="JPEG", exif=exif)
    save("rgb.tif", Image.fromarray(rgb), format="TIFF")
    save("lzw.tif", Image.fromarray(rgb), format="TIFF", compression="tiff_lzw")
    save("float.tif", Image.fromarray(grey.astype(np.float32) / 255), format="TIFF")
    save("rgb.bmp", Image.fromarray(rgb), format="BMP")
    save("palette.bmp", palette, format="BMP")
    save("rgb.gif", Image.fromarray(rgb).convert("P"), format="GIF")
    return files


SEEDS = _seed_images()
SEED_NAMES = sorted(SEEDS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _read(path: Path, reader=read_image):
    """The reader's outcome: the array, or the documented error (anything else propagates and fails)."""
    with _hang_guard():
        try:
            return reader(path, max_pixels=MAX_PIXELS)
        except (ImageReadError, FileNotFoundError) as error:
            assert str(path) in str(error), f"the error does not name the file: {error}"
            return None


def _assert_is_an_image(array) -> None:
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8
    assert array.ndim == 3 and array.shape[2] == 3 and array.shape[0] > 0 and array.shape[1] > 0
    assert array.flags.c_contiguous


@FUZZ
@given(data=st.binary(min_size=1, max_size=2048), name=st.sampled_from(["x.jpg", "x.png", "x.tif", "x.bin"]))
@example(data=b"\x89PNG\r\n\x1a\n", name="x.png")  # a PNG signature and nothing else
@example(data=b"\xff\xd8\xff", name="x.jpg")  # a JPEG start marker and nothing else
@example(data=b"II*\x00\x08\x00\x00\x00", name="x.tif")  # a TIFF header pointing at an absent directory
def test_random_bytes_read_as_an_image_or_raise_image_read_error(folder, data, name):
    path = folder / name
    path.write_bytes(data)
    image = _read(path)
    if image is not None:
        _assert_is_an_image(image)
    mask = _read(path, read_mask)
    if mask is not None:
        assert mask.dtype == np.uint8 and mask.ndim == 2


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), keep=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated_files_are_refused_or_read_whole(folder, name, keep):
    original = SEEDS[name]
    path = folder / f"truncated-{name}"
    path.write_bytes(original[: int(len(original) * keep)])
    image = _read(path)
    if image is not None:  # only when the cut spared every pixel (e.g. a trailer Pillow does not need)
        _assert_is_an_image(image)
        whole = folder / f"whole-{name}"
        whole.write_bytes(original)
        np.testing.assert_array_equal(image, read_image(whole), err_msg="a truncated file was padded silently")


@FUZZ
@given(
    name=st.sampled_from(SEED_NAMES),
    edits=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=1.0, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_files_read_as_an_image_or_raise_image_read_error(folder, name, edits):
    data = bytearray(SEEDS[name])
    for where, value in edits:
        data[int(where * len(data))] = value
    path = folder / f"mutated-{name}"
    path.write_bytes(bytes(data))
    image = _read(path)
    if image is not None:
        _assert_is_an_image(image)


def test_every_seed_image_is_readable(folder):
    """The fuzzers' starting points are valid, so a refusal above is about the damage, not the seed."""
    for name in SEED_NAMES:
        path = folder / f"seed-{name}"
        path.write_bytes(SEEDS[name])
        _assert_is_an_image(read_image(path))


# --------------------------------------------------------------------------------------------------
# the CSV catalog / query loader
# --------------------------------------------------------------------------------------------------

VALID_CATALOG = "product_id,image,category\n007,shop/a.jpg,tee\n008,shop/b.jpg,tank\n009,/abs/c.png,dress\n"
VALID_QUERIES = "query_id,image,product_id\nq1,street/q.jpg,007\nq1,street/q.jpg,008\nq2,street/r.jpg,009\n"
# Characters that mean something to a CSV parser, to a path or to an id check, and some that do not.
CSV_ALPHABET = st.sampled_from(list(',"\n\r \t\x00~#;\\/.') + ["é", "\u00a0", "\ufeff", "a", "0", "q", "_"])


def _mutate(text: str, edits) -> str:
    for where, action, character in edits:
        position = int(where * (len(text) + 1))
        if action == "insert":
            text = text[:position] + character + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + 1 :]
        else:
            text = text[:position] + character + text[position + 1 :]
    return text


EDITS = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
        st.sampled_from(["insert", "delete", "replace"]),
        CSV_ALPHABET,
    ),
    min_size=1,
    max_size=6,
)


def _load(folder: Path, catalog: bytes, queries=None):
    """load_csv's outcome: the set, or None after a documented error that names the file it is about."""
    catalog_path = folder / "catalog.csv"
    catalog_path.write_bytes(catalog)
    queries_path = None
    if queries is not None:
        queries_path = folder / "queries.csv"
        queries_path.write_bytes(queries)
    with _hang_guard():
        try:
            return load_csv(catalog_path, queries_path)
        except (ValueError, FileNotFoundError) as error:
            named = [str(catalog_path.resolve())] + ([str(queries_path.resolve())] if queries_path else [])
            assert any(name in str(error) for name in named), f"the error does not name the CSV file: {error}"
            return None


def _assert_is_a_valid_set(data) -> None:
    catalog, queries = data.catalog, data.queries
    assert len(catalog) > 0
    for table, columns in ((catalog, ("product_id",)), (queries, ("query_id", "product_id"))):
        for column in columns:
            for value in table[column]:
                assert isinstance(value, str) and value and value == value.strip(), f"bad {column} {value!r}"
    assert catalog["product_id"].is_unique
    assert queries["product_id"].isin(catalog["product_id"]).all()
    for table in (catalog, queries):
        assert all(isinstance(path, str) and Path(path).is_absolute() for path in table["image"])


@FUZZ
@given(text=st.text(max_size=300))
@example(text="product_id, image,image \n1,a.jpg,b.jpg\n")  # two columns named "image" once stripped
@example(text="product_id,image,category\n1,a.jpg\n")  # a short row: pandas fills NaN, not ""
@example(text="product_id,image\n1,~nobody-here/a.jpg\n")  # expanduser of an unknown user raises RuntimeError
@example(text="product_id,image\n1,a\x00.jpg\n")  # a NUL in a path: ValueError without the file's name
@example(text="")
def test_random_text_loads_as_a_valid_catalog_or_raises_value_error(folder, text):
    data = _load(folder, text.encode("utf-8", "surrogatepass"))
    if data is not None:
        _assert_is_a_valid_set(data)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"product_id,image\n\xff\xfe,a.jpg\n")  # not UTF-8
def test_random_bytes_load_as_a_valid_catalog_or_raise_value_error(folder, data):
    loaded = _load(folder, data)
    if loaded is not None:
        _assert_is_a_valid_set(loaded)


@FUZZ
@given(catalog_edits=EDITS, query_edits=EDITS)
@example(catalog_edits=[(0.5, "insert", " ")], query_edits=[(0.0, "insert", "a")])
@example(catalog_edits=[(0.0, "insert", '"')], query_edits=[(0.99, "delete", "a")])  # an unclosed quote
def test_mutated_catalog_and_queries_load_validly_or_raise_value_error(folder, catalog_edits, query_edits):
    data = _load(folder, _mutate(VALID_CATALOG, catalog_edits).encode(), _mutate(VALID_QUERIES, query_edits).encode())
    if data is not None:
        _assert_is_a_valid_set(data)


def test_the_unmutated_csvs_load(folder):
    data = _load(folder, VALID_CATALOG.encode(), VALID_QUERIES.encode())
    assert data is not None and isinstance(data.catalog, pd.DataFrame)
    _assert_is_a_valid_set(data)
