"""Checking an uploaded photo before any model sees it: size, real format, pixel count, complete data.

Every check answers with an `UploadError` carrying the HTTP status and a message for the person who
sent the file. The order matters: the cheap checks come first, and the full decode (the only step that
costs memory in proportion to the pixels) runs only once the header's pixel count is known to be under
the cap, so a small file that declares 100000x100000 pixels is refused without decoding it.

Example:
    >>> check_upload(b"hello", max_bytes=1000, max_pixels=10_000)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    UploadError: the upload is not an image ...
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Optional

from PIL import Image, UnidentifiedImageError

#: Magic bytes -> format name. Sniffed from the content, never from the file name or the declared type:
#: both are chosen by the client.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF")
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WebP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
# Pillow's decoders report damaged data with any of these, depending on the format and the damage.
_DECODE_FAILURES = (OSError, SyntaxError, ValueError, EOFError, LookupError, TypeError, ArithmeticError, struct.error)


class UploadError(ValueError):
    """An upload the service refuses: `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CheckedImage:
    """An upload that passed every check: the bytes as sent, their sniffed format and pixel size."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def sniff_format(data: bytes) -> Optional[str]:
    """The image format that `data`'s first bytes announce (one of ACCEPTED_FORMATS), else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def _describe_start(data: bytes) -> str:
    """The first bytes of a refused upload, for the message: text as text, anything else as hex."""
    head = data[:16]
    try:
        text = head.decode("ascii")
        if text.isprintable():
            return f"text {text!r}"
    except UnicodeDecodeError:
        pass
    return f"bytes {head.hex(' ')}"


def check_upload(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> CheckedImage:
    """Refuse anything but one complete image of at most `max_bytes` bytes and `max_pixels` pixels.

    Args:
        data: the uploaded file's content.
        max_bytes: size cap of the file (the service's --max-upload-mb).
        max_pixels: cap on width x height, checked on the header before any pixel is decoded.
        field: the form field's name, for the messages.

    Returns:
        The checked image (the same bytes, so the pipeline decodes exactly what a direct call would).

    Raises:
        UploadError: 400 empty, truncated or corrupt; 413 too many bytes or pixels; 415 not an image
            in an accepted format (judged by the content's magic bytes).
    """
    if not data:
        raise UploadError(400, f"the {field!r} upload is empty (0 bytes): send the photo's content")
    if len(data) > max_bytes:
        raise UploadError(413, f"the {field!r} upload is {len(data):,} bytes, over the {max_bytes:,}-byte cap")
    kind = sniff_format(data)
    if kind is None:
        raise UploadError(
            415,
            f"the {field!r} upload is not an image: its content starts with {_describe_start(data)} "
            f"(the file name and declared type are not trusted); send one of {', '.join(ACCEPTED_FORMATS)}",
        )
    try:
        # Image.open parses the header only; Pillow's own guard raises here for the most absurd sizes.
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"the {field!r} upload declares too many pixels ({error})") from None
    except (UnidentifiedImageError, *_DECODE_FAILURES) as error:
        raise UploadError(400, f"the {field!r} upload looks like {kind} but its header is damaged ({error})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise UploadError(
                413,
                f"the {field!r} upload declares {width}x{height} = {width * height:,} pixels, over the "
                f"{max_pixels:,}-pixel cap: downscale the photo",
            )
        if width == 0 or height == 0:
            raise UploadError(400, f"the {field!r} upload has zero size ({width}x{height})")
        try:
            image.load()  # the full decode: a truncated or corrupt file fails here, not inside a batch
        except Image.DecompressionBombError as error:
            raise UploadError(413, f"the {field!r} upload decodes to too many pixels ({error})") from None
        except _DECODE_FAILURES as error:
            raise UploadError(
                400, f"the {field!r} upload is a truncated or corrupt {kind} ({type(error).__name__}: {error})"
            ) from None
    return CheckedImage(data=data, format=kind, width=width, height=height)
