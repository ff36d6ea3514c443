"""Crops of images by boxes, materialised once into the cache: what a loader hands out for a boxed garment.

Shop and street sets annotate garments by boxes in bigger photos (DeepFashion2, DeepFashion Consumer-to-shop,
Exact Street2Shop). Every descriptor reads whole image files, so a loader crops each boxed garment into its
own file once and puts that file's path in its tables::

    <cache_dir>/crops/<key>.png     the crop, lossless (its pixels are the box's pixels of the source)

The key is a SHA-1 of the source's absolute path, size and modification time and of the box, so an edited
source gets a new crop and the old one is never served. Each crop is written atomically
(`retrieval.files.write_image_atomic`), so a file that exists is whole: an interrupted run resumes with the
crops still missing.

A box is ``(x0, y0, x1, y1)`` in pixels of the upright image (EXIF orientation applied, as `read_image`
returns it), x1 and y1 exclusive; fractional values are rounded to the nearest pixel edge. It is clipped to
the image; a box with nothing left after clipping is a ValueError naming the image and the box.

Example:
    >>> from retrieval.datasets.crops import crop_images
    >>> crop_images(["street/0001.jpg"], [(10, 20, 110, 220)], cache_dir="/tmp/cache")  # doctest: +SKIP
    ['/tmp/cache/crops/5c1f0e...png']
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from retrieval.datasets.base import PathLike, default_cache_dir, logger, run_in_threads

CROPS_FOLDER = "crops"
#: Part of every crop's key: bump it when the cropping rule changes so old crops are not served.
CROP_FORMAT_VERSION = 1

Box = Tuple[float, float, float, float]


def _pixel_box(box: Box) -> Tuple[int, int, int, int]:
    """The box's four edges as whole pixels (rounded), before clipping."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {tuple(box)!r}")
    values = [float(value) for value in box]
    if not all(np.isfinite(values)):
        raise ValueError(f"a box needs finite coordinates, got {tuple(box)!r}")
    x0, y0, x1, y1 = (int(round(value)) for value in values)
    return x0, y0, x1, y1


def clip_box(box: Box, height: int, width: int, image: PathLike = "<image>") -> Tuple[int, int, int, int]:
    """The box in whole pixels, clipped to an image of (height, width).

    Raises:
        ValueError: nothing of the box is left after clipping (it lies outside the image, or x1 <= x0 or
            y1 <= y0); the message names the image, the box and the image size.
    """
    x0, y0, x1, y1 = _pixel_box(box)
    clipped = (max(0, x0), max(0, y0), min(int(width), x1), min(int(height), y1))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(
            f"{image}: the box (x0, y0, x1, y1) = {tuple(box)!r} is empty after clipping to the image "
            f"({width} x {height} pixels); fix the annotation or drop that item"
        )
    return clipped


def crop_array(image: np.ndarray, box: Box, name: PathLike = "<image>") -> np.ndarray:
    """The box's pixels of an image (the box clipped to it).

    Shape:
        - image: (H, W, 3) or (H, W).
        - Output: (y1 - y0, x1 - x0, ...) after clipping, C-contiguous.
    """
    x0, y0, x1, y1 = clip_box(box, image.shape[0], image.shape[1], name)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def crop_key(source: PathLike, box: Box) -> str:
    """The cache key of one crop: SHA-1 of the source's absolute path, size, mtime and the pixel box.

    Raises:
        FileNotFoundError: the source image does not exist.
    """
    path = Path(source).resolve()
    stat = path.stat()
    text = f"v{CROP_FORMAT_VERSION}\n{path}\n{stat.st_size}\n{stat.st_mtime_ns}\n{_pixel_box(box)}\n"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _make_crop(source: str, box: Box, target: Path) -> None:
    # Imported here: the codecs pull in torch, which loading an annotation table never needs.
    from retrieval.files import write_image_atomic
    from retrieval.io import read_image

    write_image_atomic(target, crop_array(read_image(source), box, source), compress_level=1)


def crop_images(
    sources: Sequence[PathLike],
    boxes: Sequence[Box],
    cache_dir: Optional[PathLike] = None,
    workers: Optional[int] = None,
) -> List[str]:
    """Crop each source image by its box into the cache (once); return the crops' paths.

    Crops already in the cache are kept (each was written atomically, so one that exists is whole);
    repeated (source, box) pairs are cropped once.

    Args:
        sources: image paths, one per box.
        boxes: (x0, y0, x1, y1) in pixels per source, x1/y1 exclusive; clipped to the image.
        cache_dir: the cache root; crops go to ``<cache_dir>/crops/``. Default `default_cache_dir()`.
        workers: threads (default min(8, CPUs)); the codecs release the GIL.

    Returns:
        The crop of each (source, box), as absolute path strings, in input order.

    Raises:
        ValueError: sources and boxes differ in length, or a box is empty after clipping (names the image).
        FileNotFoundError: a source image is missing.
    """
    if len(sources) != len(boxes):
        raise ValueError(f"crop_images needs one box per source: got {len(sources)} sources and {len(boxes)} boxes")
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve() / CROPS_FOLDER
    targets: List[str] = []
    jobs: Dict[str, Tuple[str, Box]] = {}
    for source, box in zip(sources, boxes):
        target = root / f"{crop_key(source, box)}.png"
        targets.append(str(target))
        jobs.setdefault(str(target), (str(Path(source).resolve()), tuple(box)))
    missing = [(target, job) for target, job in jobs.items() if not os.path.isfile(target)]
    if missing:
        logger.info("cropping %d garments (of %d) into %s", len(missing), len(jobs), root)
        root.mkdir(parents=True, exist_ok=True)

        def make(item) -> None:
            target, (source, box) = item
            _make_crop(source, box, Path(target))

        run_in_threads(make, missing, workers)
    return targets
