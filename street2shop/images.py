"""Images in: every kind of image `Pipeline.search` and `Pipeline.add` take, as (H, W, 3) uint8 RGB."""

from __future__ import annotations

import io
import os
from typing import Any, List

import numpy as np
import torch

from retrieval.io import ImageReadError, array_to_rgb, decode_image_bytes, pil_to_rgb, read_image


class BadImageError(ValueError):
    """An image given to `Pipeline.search` or `Pipeline.add` that cannot be decoded; the message says which."""


def image_to_rgb(image: Any, name: str) -> np.ndarray:
    """One image of any kind `Pipeline.search` takes -> (H, W, 3) uint8 RGB.

    Kinds: str/Path (a file), bytes (a file's content), PIL.Image, np.ndarray (H, W[, C]) uint8/uint16/
    bool/float, torch.Tensor (C, H, W) or (H, W) float in [0, 1] (or uint8).

    Raises:
        BadImageError: naming `name`, the kind and what is wrong.
    """
    try:
        if isinstance(image, (str, os.PathLike)):
            return read_image(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image_bytes(bytes(image), name)
        if isinstance(image, np.ndarray):
            return array_to_rgb(image, name)
        if isinstance(image, torch.Tensor):
            return array_to_rgb(tensor_to_hwc(image, name), name)
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow is a dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            return pil_to_rgb(image, name)
    except (ImageReadError, FileNotFoundError) as error:
        raise BadImageError(str(error)) from error
    raise BadImageError(
        f"{name} is a {type(image).__name__}: give a file path, the file's bytes, a PIL image, a numpy array "
        "(H, W[, C]) or a tensor (C, H, W)"
    )


def tensor_to_hwc(tensor: torch.Tensor, name: str) -> np.ndarray:
    """(C, H, W) with C in 1..4, or (H, W) -> a numpy (H, W[, C]) array (floats stay floats in [0, 1])."""
    data = tensor.detach().cpu()
    if data.ndim == 3 and data.shape[0] in (1, 2, 3, 4):
        data = data.permute(1, 2, 0)
    elif data.ndim != 2:
        raise ImageReadError(f"{name} is a tensor of shape {tuple(tensor.shape)}: expected (C, H, W) or (H, W)")
    if data.is_floating_point():
        values = data.float().numpy()
        if np.isfinite(values).all() and (values.min() < 0 or values.max() > 1):
            raise ImageReadError(f"{name} is a float tensor with values outside [0, 1]: scale it to [0, 1]")
        return values
    return data.numpy()


def as_image_list(images: Any) -> List[Any]:
    """`search`'s argument -> a list of single images: one image, a list/tuple of them, or a 4-D batch
    (numpy (B, H, W, C) or tensor (B, C, H, W))."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def encoded_suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes, from their content (never from a name)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        kind = (image.format or "").lower()
    return {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif"}.get(
        kind, ".img"
    )


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def image_name(image: Any, position: int) -> str:
    """How an error names an image: its path, else its position and type."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {position} ({type(image).__name__})"
