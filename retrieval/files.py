"""Files that are never seen half-written, cache files that know when they are damaged, and file hashes.

Every writer here goes through a temporary file in the destination folder and `os.replace`, so a reader
(or a run interrupted half-way) sees the old file or the new one, never a mix. Cache files carry a
SHA-256 footer (`write_checked_bytes` / `read_checked_bytes`), so a damaged one is recomputed, not
trusted. Reading goes through `retrieval.io.open_regular_file`: hashing a FIFO or /dev/zero would never end.

Example:
    >>> from retrieval.files import read_checked_bytes, write_checked_bytes
    >>> path = write_checked_bytes("/tmp/example.bin", b"payload")  # doctest: +SKIP
    >>> read_checked_bytes(path)  # doctest: +SKIP
    b'payload'
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from retrieval.io import PathLike, _check_image_array, open_regular_file

_HASH_CHUNK_BYTES = 1 << 20
_CHECKSUM_TAG = b"\n#street2shop-sha256:"
_CHECKSUM_FOOTER_BYTES = len(_CHECKSUM_TAG) + 64


class DamagedCacheError(ValueError):
    """A cache file's checksum footer is missing or does not match its bytes (`read_checked_bytes`)."""


def file_sha1(path: PathLike) -> str:
    """SHA-1 hex digest of a file's bytes, read in 1 MiB chunks (for manifests and caches).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: a directory, FIFO, device or socket (hashing /dev/zero or a FIFO would never end).
    """
    digest = hashlib.sha1()
    with open_regular_file(path, expected="a regular file") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write bytes so that readers never see half a file (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_checked_bytes(path: PathLike, data: bytes) -> Path:
    """Write a cache file atomically with a SHA-256 footer, so `read_checked_bytes` can tell it was damaged.

    The footer goes after the payload: an .npy payload stays loadable by np.load, which stops at the array.
    """
    footer = _CHECKSUM_TAG + hashlib.sha256(data).hexdigest().encode("ascii")
    return write_bytes_atomic(path, bytes(data) + footer)


def read_checked_bytes(path: PathLike) -> bytes:
    """The payload of a `write_checked_bytes` file, verified against its checksum footer.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: `path` is not a regular file (a directory, FIFO...).
        DamagedCacheError: no footer (a file from an older version, or truncated) or a checksum mismatch.
    """
    with open_regular_file(path, expected="a cache file") as handle:
        sealed = handle.read()
    payload, footer = sealed[:-_CHECKSUM_FOOTER_BYTES], sealed[-_CHECKSUM_FOOTER_BYTES:]
    if len(sealed) < _CHECKSUM_FOOTER_BYTES or not footer.startswith(_CHECKSUM_TAG):
        raise DamagedCacheError(f"{path} has no checksum footer (truncated, or written by an older version); delete it")
    if hashlib.sha256(payload).hexdigest().encode("ascii") != footer[len(_CHECKSUM_TAG) :]:
        raise DamagedCacheError(f"{path} does not match its checksum (damaged or edited); delete it")
    return payload


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write UTF-8 text so that readers never see half a file (`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_image_atomic(
    path: PathLike,
    image: np.ndarray,
    palette: Optional[Sequence[int]] = None,
    quality: int = 95,
    compress_level: int = 6,
) -> Path:
    """Write an image so that readers never see a half-written file.

    The image goes to a temporary file in the destination directory, then `os.replace` moves it into
    place (atomic on POSIX and Windows within one file system). The format follows the extension.

    Args:
        path: destination; its extension picks the format (.png, .jpg, ...).
        image: (H, W, 3) RGB or (H, W) grey/label uint8 array.
        palette: for (H, W) label maps, a flat [r0, g0, b0, r1, ...] palette: the file is written as a
            palette image whose indices are the labels (what `read_mask` returns).
        quality: JPEG quality (ignored by other formats).
        compress_level: PNG zlib level 0-9 (ignored by other formats); 1 is several times faster than
            the default 6 for noisy images at little cost in size.

    Returns:
        The destination path.
    """
    path = Path(path)
    _check_image_array(image, allow_grey=True)
    if palette is not None and image.ndim != 2:
        raise ValueError(f"a palette needs an (H, W) label map, got shape {image.shape}")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot tell the image format of {path} from its extension {path.suffix!r}")
    array = np.ascontiguousarray(image)
    height, width = array.shape[:2]
    if array.ndim == 3:
        pil_image = Image.frombytes("RGB", (width, height), array.tobytes())
    elif palette is not None:
        pil_image = Image.frombytes("P", (width, height), array.tobytes())
        pil_image.putpalette(list(palette))
    else:
        pil_image = Image.frombytes("L", (width, height), array.tobytes())
    save_options = {"JPEG": {"quality": quality}, "PNG": {"compress_level": compress_level}}.get(image_format, {})

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            pil_image.save(stream, format=image_format, **save_options)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
