"""Robust image I/O: the one reader every part of street2shop uses.

Datasets in this field are messy: CMYK JPEGs from shops, 16-bit PNGs, palette images with a transparent
background, phone photos whose pixels are stored sideways with an EXIF orientation tag, and the odd
truncated download. `read_image` turns all of them into the same thing, an (H, W, 3) uint8 RGB array,
or fails with an error that names the file, says what is wrong and what to do about it. Nothing is
silently padded or clipped.

Only regular files are opened (a FIFO or /dev/zero in a catalog is refused, never read). Images over
64 MP are refused before decoding, except JPEGs, which are decoded at a reduced DCT scale instead;
raise the limit with $STREET2SHOP_MAX_PIXELS or `set_max_pixels`. Writing (images, text, checksummed
cache files) and file hashes are in `retrieval.files`.

Example:
    >>> from retrieval.io import read_image, resize_image, images_to_tensor
    >>> image = read_image("shop/000003_1.jpg")  # doctest: +SKIP
    >>> batch = images_to_tensor([resize_image(image, (256, 192))])  # doctest: +SKIP
    >>> batch.shape  # doctest: +SKIP
    torch.Size([1, 3, 256, 192])
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# 64 megapixels: above any product or street photo in the supported datasets (VITON is 0.05 MP,
# DeepFashion under 1 MP) and below Pillow's own bomb warning (~89 MP), so a hostile or broken file
# is refused before it is decoded into gigabytes of memory.
DEFAULT_MAX_PIXELS = 64_000_000
#: Environment variable that overrides DEFAULT_MAX_PIXELS for every read (e.g. 400000000 for 400 MP scans).
MAX_PIXELS_ENV_VARIABLE = "STREET2SHOP_MAX_PIXELS"
#: A JPEG with more pixels than the limit is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps at
#: least this many pixels on its long side: descriptors use a few hundred, and 1/8 scale decodes a
#: 100 MP photo in a fraction of the time and memory.
LARGE_JPEG_LONG_SIDE = 2048

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = 255.0
_warned_about_truncated_loading = False
_max_pixels_setting: Optional[int] = None
# Serialises the short window in which Pillow's own (process-global) bomb guard is lifted (`_open_pillow`).
_PILLOW_GUARD_LOCK = threading.Lock()
# Pillow's decoders report a damaged file with any of these, depending on the format and the damage.
_PILLOW_FAILURES = (OSError, SyntaxError, ValueError, EOFError, LookupError, TypeError, ArithmeticError, struct.error)
_EXIF_ORIENTATION = 0x0112
_SIDEWAYS_ORIENTATIONS = (5, 6, 7, 8)


class ImageReadError(ValueError):
    """A file exists but cannot be turned into an image (corrupt, truncated, too large, empty...)."""


def set_max_pixels(pixels: Optional[int]) -> None:
    """Set the pixel limit `read_image` and `read_mask` use by default, for this process.

    Overrides $STREET2SHOP_MAX_PIXELS; None goes back to it (or to DEFAULT_MAX_PIXELS). Pillow's own
    guard (PIL.Image.MAX_IMAGE_PIXELS, ~89 MP) is not in the way: the readers apply this limit instead.

    Example:
        >>> set_max_pixels(400_000_000); get_max_pixels()
        400000000
        >>> set_max_pixels(None)
    """
    global _max_pixels_setting
    if pixels is not None and (isinstance(pixels, bool) or int(pixels) <= 0):
        raise ValueError(f"max pixels must be a positive integer, got {pixels!r}")
    _max_pixels_setting = None if pixels is None else int(pixels)


def get_max_pixels() -> int:
    """The default pixel limit: `set_max_pixels`'s value, else $STREET2SHOP_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    if _max_pixels_setting is not None:
        return _max_pixels_setting
    configured = os.environ.get(MAX_PIXELS_ENV_VARIABLE, "").strip()
    if not configured:
        return DEFAULT_MAX_PIXELS
    try:
        pixels = int(configured)
    except ValueError:
        pixels = 0
    if pixels <= 0:
        raise ValueError(
            f"{MAX_PIXELS_ENV_VARIABLE}={configured!r} is not a positive integer; set it to a pixel count such as "
            f"400000000, or unset it for the default {DEFAULT_MAX_PIXELS:,}"
        )
    return pixels


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind_of(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular_file(path: PathLike, expected: str = "an image file") -> BinaryIO:
    """Open `path` for binary reading, refusing anything but a regular file before one byte is read.

    A FIFO or a device such as /dev/zero in a catalog would otherwise block or stream forever. The type
    is checked on the opened descriptor (fstat), so a name swapped for a FIFO after a stat cannot slip
    through, and O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer.

    Args:
        path: the file.
        expected: what the file should be, for the error message.

    Returns:
        A binary file object; close it (use `with`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: a directory, FIFO, device or socket, or a file that cannot be opened (permissions).
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        what = "Image file" if expected == "an image file" else "File"
        raise FileNotFoundError(
            f"{what} not found: {path}. Check the path (and the dataset root it came from)."
        ) from None
    except OSError as error:
        try:  # sockets (ENXIO) and, on Windows, directories cannot be opened at all: say what they are
            kind = _kind_of(os.stat(path).st_mode)
        except OSError:
            kind = ""
        if kind:
            raise ImageReadError(f"{path} is not a regular file ({kind}); expected {expected}.") from None
        raise ImageReadError(f"{path} cannot be opened ({error.strerror or error}); check its permissions.") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ImageReadError(f"{path} is not a regular file ({_kind_of(mode)}); expected {expected}.")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _check_truncated_loading_is_off() -> None:
    """Warn once if some other code switched Pillow to pad truncated files silently.

    `ImageFile.LOAD_TRUNCATED_IMAGES` is process-global; this module never sets it, because a
    half-downloaded product photo padded with grey would be indexed as if it were real.
    """
    global _warned_about_truncated_loading
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_about_truncated_loading:
        _warned_about_truncated_loading = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process): truncated "
            "image files will be padded silently instead of raising ImageReadError. Set it back to False."
        )


def _too_large(path: Path, width: int, height: int, limit: int, note: str = "") -> ImageReadError:
    return ImageReadError(
        f"{path} is {width}x{height} = {width * height:,} pixels{note}, more than max_pixels={limit:,}. If the file "
        f"is genuine, raise the limit: set {MAX_PIXELS_ENV_VARIABLE}=<pixels>, call "
        "retrieval.io.set_max_pixels(<pixels>) or pass max_pixels to read_image (or downscale the file)."
    )


def _open_pillow(handle: BinaryIO, path: Path) -> Image.Image:
    """Image.open with Pillow's bomb guard lifted: `_open_and_decode` applies the caller's limit instead.

    Pillow's guard is one process-global number (~89 MP warns, ~179 MP raises) checked inside
    Image.open, before a JPEG can be drafted to a small scale or a caller's larger limit applies. It is
    lifted only while the header is parsed (no pixels are decoded here), under a lock so that
    concurrent reads never restore it out of order.
    """
    with _PILLOW_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(handle)
        except UnidentifiedImageError as error:
            raise ImageReadError(
                f"{path} is not an image Pillow can identify (wrong extension, corrupt header or not an "
                "image at all); replace the file."
            ) from error
        except _PILLOW_FAILURES as error:
            raise ImageReadError(f"{path} cannot be opened as an image: {error}.") from error
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _draft_request(image: Image.Image, limit: int, min_size: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """(W, H) in stored orientation to draft a JPEG to, or None to decode it at full size.

    With `min_size` (H, W as displayed): the smallest DCT scale still at least that large. Without it,
    only a JPEG over `limit` is drafted, to keep LARGE_JPEG_LONG_SIDE pixels on its long side.
    """
    if image.format not in ("JPEG", "MPO"):
        return None
    width, height = image.size
    if min_size is not None:
        need_height, need_width = (max(1, int(side)) for side in min_size)
        if image.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS_ORIENTATIONS:
            need_height, need_width = need_width, need_height  # stored sideways: the sides swap on display
        return need_width, need_height
    if width * height <= limit:
        return None
    scale = LARGE_JPEG_LONG_SIDE / max(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _open_and_decode(path: Path, max_pixels: Optional[int], min_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Open `path` with Pillow, refuse oversized images before decoding, decode and apply EXIF rotation.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: anything else that stops the file from becoming an image.
    """
    with open_regular_file(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ImageReadError(f"{path} is empty (0 bytes); re-download or re-export the image.")
        return _decode_handle(handle, path, max_pixels, min_size)


def _decode_handle(
    handle: BinaryIO, path: Path, max_pixels: Optional[int], min_size: Optional[Tuple[int, int]] = None
) -> Image.Image:
    """`_open_and_decode` on an open binary handle; `path` only names it in messages."""
    limit = get_max_pixels() if max_pixels is None else int(max_pixels)
    _check_truncated_loading_is_off()
    image = _open_pillow(handle, path)
    try:
        width, height = image.size
        if width == 0 or height == 0:
            raise ImageReadError(f"{path} has zero size ({width}x{height}); replace the file.")
        request = _draft_request(image, limit, min_size)
        if request is not None:
            image.draft(image.mode, request)  # header only: picks the DCT scale the decoder will use
        if image.size[0] * image.size[1] > limit:
            note = (
                f" (still {image.size[0]}x{image.size[1]} at 1/8 JPEG scale)" if image.size != (width, height) else ""
            )
            raise _too_large(path, width, height, limit, note)
        image.load()
        # exif_transpose returns a rotated copy (a plain copy when there is no tag), so the file
        # handle opened above can be closed right after.
        oriented = ImageOps.exif_transpose(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        # Raised while decoding by some formats (TIFF tiles, GIF frames) against Pillow's own limit.
        raise ImageReadError(
            f"{path} is refused by Pillow's decompression-bomb guard ({error}). If the file is genuine, "
            "raise PIL.Image.MAX_IMAGE_PIXELS (and max_pixels, see retrieval.io.set_max_pixels)."
        ) from error
    except _PILLOW_FAILURES as error:
        # Pillow reports truncation as OSError("image file is truncated") and corrupt data as
        # SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}); re-download or re-export the image."
        ) from error
    finally:
        image.close()
    return oriented


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (0..65535) to 8 bit by the full range, rounding (65535 -> 255, 32768 -> 128)."""
    return np.round(values.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


def _wide_range_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 32-bit integer ("I") or float ("F") samples to 8 bit by their range, never by clipping.

    Integer images whose values fit 0..65535 are 16-bit data in Pillow's "I" mode (older Pillow opens
    16-bit PNGs so) and are scaled like 16 bit. Floats in [0, 1] are scaled by 255 and floats already in
    [0, 255] are kept. Anything else is stretched linearly from its minimum to its maximum.
    """
    is_float = np.issubdtype(values.dtype, np.floating)
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if is_float and low >= 0.0 and high <= 1.0:
        scaled = data * 255.0
    elif is_float and low >= 0.0 and high <= 255.0:
        scaled = data
    elif not is_float and low >= 0.0 and high <= 65535.0:
        scaled = data * (255.0 / 65535.0)
    elif high > low:
        scaled = (data - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(data)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite (H, W, 3) colour over white with an (H, W) uint8 alpha.

    White, not black, because shop photos are shot on white: a transparent product cut-out must look
    like the other catalog images, otherwise descriptors learn "black background = product X".
    """
    weight = alpha.astype(np.float32)[..., None] / 255.0
    blended = rgb.astype(np.float32) * weight + _WHITE * (1.0 - weight)
    return np.round(blended).astype(np.uint8)


def _to_rgb_array(image: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to an (H, W, 3) uint8 RGB array."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_bit_to_uint8(np.asarray(image))
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("I", "F"):
        grey = _wide_range_to_uint8(np.asarray(image))
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" not in image.info:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_over_white(rgba[..., :3], rgba[..., 3])
    try:
        # CMYK, YCbCr, RGBX, HSV...: Pillow's own conversion. (CMYK uses Pillow's simple formula,
        # not the embedded ICC profile; colours of print-oriented files can shift slightly.)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as error:
        raise ImageReadError(
            f"{path} has pixel mode {mode!r} that cannot be converted to RGB ({error}); "
            "re-export it as RGB JPEG or PNG."
        ) from error


def read_image(
    path: PathLike, max_pixels: Optional[int] = None, *, min_size: Optional[Tuple[int, int]] = None
) -> np.ndarray:
    """Read any image file as an upright RGB uint8 array.

    The EXIF orientation is applied; grey, 1-bit, palette, CMYK, 16-bit and float images are converted;
    images with an alpha channel are composited over white (shop photos are on white). A JPEG with more
    pixels than the limit is decoded at a reduced DCT scale (long side >= LARGE_JPEG_LONG_SIDE) rather
    than refused; any other format over the limit is refused before decoding.

    Args:
        path: image file (a regular file: directories, FIFOs and devices are refused unread).
        max_pixels: refuse images with more pixels than this before decoding them; None: `get_max_pixels()`
            (DEFAULT_MAX_PIXELS, $STREET2SHOP_MAX_PIXELS or `set_max_pixels`).
        min_size: (H, W) the caller will resize to, or None (full size). Given, a JPEG is decoded at the
            smallest DCT scale (1, 1/2, 1/4, 1/8) still at least this large: several times faster.

    Returns:
        (H, W, 3) uint8 RGB array, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file is not a regular file, empty, not an image, corrupt, truncated, zero-size or
            too large.

    Shape:
        - Output: (H, W, 3), uint8; with `min_size`, H >= min_size[0] and W >= min_size[1] when the file is.

    Example:
        >>> read_image("catalog/000003_1.jpg").shape  # doctest: +SKIP
        (256, 192, 3)
    """
    path = Path(path)
    return _rgb_of(_open_and_decode(path, max_pixels, min_size), path)


def decode_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: Optional[int] = None) -> np.ndarray:
    """`read_image` of an encoded file's content (an upload, a blob): the same guards, conversions and errors.

    Args:
        data: the file's bytes (JPEG, PNG, WebP, ...).
        name: how messages name the image (e.g. "upload 'photo.jpg'").

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        ImageReadError: empty, not an image, corrupt, truncated, zero-size or too large.
    """
    label = Path(name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageReadError(f"{name} must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageReadError(f"{name} is empty (0 bytes); send the image file's content.")
    image = _decode_handle(io.BytesIO(bytes(data)), label, max_pixels)
    return _rgb_of(image, label)


def pil_to_rgb(image: Image.Image, name: str = "<PIL image>", max_pixels: Optional[int] = None) -> np.ndarray:
    """An in-memory Pillow image -> (H, W, 3) uint8 RGB, converted as `read_image` converts a file's pixels.

    The EXIF orientation is applied when the image carries one; the pixel limit applies (raises ImageReadError).
    """
    label = Path(name)
    limit = get_max_pixels() if max_pixels is None else int(max_pixels)
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageReadError(f"{name} has zero size ({width}x{height}).")
    if width * height > limit:
        raise _too_large(label, width, height, limit)
    try:
        oriented = ImageOps.exif_transpose(image)
    except _PILLOW_FAILURES as error:
        raise ImageReadError(f"{name} cannot be read ({type(error).__name__}: {error}).") from error
    return _rgb_of(oriented if oriented is not None else image, label)


def array_to_rgb(pixels: np.ndarray, name: str = "<array>", max_pixels: Optional[int] = None) -> np.ndarray:
    """An image array -> (H, W, 3) uint8 RGB, with the conversions `read_image` applies to files.

    Accepted: (H, W) or (H, W, 1) grey, (H, W, 3) RGB, (H, W, 2) grey + alpha, (H, W, 4) RGBA (composited
    over white); uint8, uint16 (scaled by 65535), bool (0/255), other integers and floats (floats in [0, 1]
    scaled by 255, in [0, 255] kept, else stretched by their range: `_wide_range_to_uint8`).

    Shape:
        - pixels: (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4).
        - Output: (H, W, 3) uint8, C-contiguous.

    Raises:
        ImageReadError: another shape, zero size, too many pixels, a dtype that is not numeric.

    Example:
        >>> array_to_rgb(np.full((2, 2), 65535, np.uint16))[0, 0].tolist()
        [255, 255, 255]
    """
    if not isinstance(pixels, np.ndarray):
        raise ImageReadError(f"{name} must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (2, 3, 4))):
        raise ImageReadError(f"{name} has shape {pixels.shape}: expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ImageReadError(f"{name} has zero size ({width}x{height}).")
    limit = get_max_pixels() if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise _too_large(Path(name), width, height, limit)
    if pixels.dtype == np.bool_:
        values = pixels.astype(np.uint8) * 255
    elif pixels.dtype == np.uint8:
        values = pixels
    elif pixels.dtype == np.uint16:
        values = _sixteen_bit_to_uint8(pixels)
    elif np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating):
        values = _wide_range_to_uint8(pixels)
    else:
        raise ImageReadError(f"{name} has dtype {pixels.dtype}: expected uint8, uint16, another integer or a float")
    if values.ndim == 2:
        return np.ascontiguousarray(np.repeat(values[..., None], 3, axis=2))
    if values.shape[2] == 2:
        grey = np.repeat(values[..., :1], 3, axis=2)
        return np.ascontiguousarray(_composite_over_white(grey, values[..., 1]))
    if values.shape[2] == 4:
        return np.ascontiguousarray(_composite_over_white(values[..., :3], values[..., 3]))
    return np.ascontiguousarray(values)


def _rgb_of(image: Image.Image, path: Path) -> np.ndarray:
    try:
        return np.ascontiguousarray(_to_rgb_array(image, path))
    except ImageReadError:
        raise
    except _PILLOW_FAILURES as error:
        raise ImageReadError(
            f"{path} cannot be converted to RGB ({type(error).__name__}: {error}); re-export it."
        ) from error


def read_mask(path: PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read a label map or mask as a single-channel uint8 array.

    Palette images (human-parsing maps such as VITON's image-parse) keep their palette *indices*,
    which are the labels; converting them to RGB would lose exactly that. Grey masks (VITON's JPEG
    cloth-mask) keep their grey values: threshold them yourself (at 128 for VITON). Colour images are
    converted to luminance; 16-bit label maps are accepted when every label fits in 0..255.

    Args:
        path: mask or label-map file.
        max_pixels: refuse images with more pixels than this before decoding them; None: `get_max_pixels()`.

    Returns:
        (H, W) uint8 array of labels or grey values.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: unreadable file, or 16/32-bit labels above 255.

    Example:
        >>> labels = read_mask("image-parse/000003_0.png")  # doctest: +SKIP
        >>> garment = (labels == 5)  # doctest: +SKIP
    """
    path = Path(path)
    image = _open_and_decode(path, max_pixels)
    if image.mode in ("P", "L"):
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if image.mode in ("PA",):
        return np.ascontiguousarray(np.asarray(image.getchannel(0), dtype=np.uint8))
    if image.mode in _SIXTEEN_BIT_MODES + ("I",):
        labels = np.asarray(image)
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ImageReadError(
                f"{path} is a {image.mode} label map with values in {labels.min()}..{labels.max()}, "
                "outside 0..255; save label maps as 8-bit palette or grey PNG."
            )
        return np.ascontiguousarray(labels.astype(np.uint8))
    try:
        return np.ascontiguousarray(np.asarray(image.convert("L"), dtype=np.uint8))
    except (ValueError, OSError) as error:
        raise ImageReadError(
            f"{path} has pixel mode {image.mode!r} that cannot be read as a mask ({error}); "
            "save it as an 8-bit grey or palette PNG."
        ) from error


def _check_image_array(image: np.ndarray, name: str = "image", allow_grey: bool = False) -> None:
    """Raise ValueError unless `image` is uint8 (H, W, 3) (or (H, W) when `allow_grey`)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {image.dtype}")
    colour = image.ndim == 3 and image.shape[2] == 3
    grey = allow_grey and image.ndim == 2
    if not (colour or grey):
        expected = "(H, W, 3) or (H, W)" if allow_grey else "(H, W, 3)"
        raise ValueError(f"{name} must be {expected}, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} has zero size: {image.shape}")


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to `size` = (H, W).

    INTER_AREA when shrinking (averages pixels, so stripes and dots do not alias into moire) and
    INTER_LINEAR when any side grows (INTER_AREA degenerates to nearest-neighbour when enlarging).

    Args:
        image: (H, W, 3) uint8.
        size: (height, width) of the output, both positive.

    Returns:
        (size[0], size[1], 3) uint8.

    Example:
        >>> resize_image(np.zeros((512, 384, 3), np.uint8), (256, 192)).shape
        (256, 192, 3)
    """
    _check_image_array(image)
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (H, W), got {size}")
    if (height, width) == image.shape[:2]:
        return image.copy()
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    # cv2 takes (width, height).
    return cv2.resize(image, (width, height), interpolation=interpolation)


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack same-size RGB uint8 images into the project's batch format.

    Args:
        images: non-empty sequence of (H, W, 3) uint8 arrays, all the same size.

    Returns:
        (B, 3, H, W) float32 tensor in [0, 1], contiguous, on the CPU.

    Example:
        >>> images_to_tensor([np.full((4, 3, 3), 255, np.uint8)]).shape
        torch.Size([1, 3, 4, 3])
    """
    if len(images) == 0:
        raise ValueError("images_to_tensor needs at least one image")
    for position, image in enumerate(images):
        _check_image_array(image, name=f"images[{position}]")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images must all have the same size to be stacked, got {sorted(shapes)}; resize first")
    batch = torch.from_numpy(np.stack(images))  # (B, H, W, 3) uint8
    return batch.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
