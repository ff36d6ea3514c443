"""The synthetic set on disk: every product drawn and written in the VITON layout, atomically.

Files are PNG (lossless, byte-identical for a seed); product `i` depends only on (seed, i), so a
larger set extends a smaller one with the same seed. Generation writes into a temporary directory and
renames it into place last, so an interrupted run never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

from retrieval.files import write_image_atomic
from retrieval.synthetic.drawing import _draw_product
from retrieval.synthetic.street import LIP_PALETTE, _street_photo

logger = logging.getLogger(__name__)

#: Written last into a generated root; its presence (with matching parameters) means "complete".
SYNTHETIC_MARKER = "SYNTHETIC_COMPLETE.json"
#: Bump when the drawing changes, so cached sets made by older code are not mistaken for new ones.
SYNTHETIC_FORMAT_VERSION = 1


def _marker_content(n_products: int, seed: int, size: Tuple[int, int]) -> Dict[str, object]:
    return {
        "format_version": SYNTHETIC_FORMAT_VERSION,
        # The package's public name, not this module's: sets cached before the split still match.
        "generator": "retrieval.synthetic.make_synthetic_dataset",
        "n_products": int(n_products),
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
    }


def _is_complete(root: Path, expected: Dict[str, object]) -> bool:
    """True if `root` holds a finished set made with the `expected` parameters.

    Raises:
        FileExistsError: `root` holds a finished set made with other parameters.
    """
    marker = root / SYNTHETIC_MARKER
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != expected:
        raise FileExistsError(
            f"{root} already holds a synthetic set with other parameters ({found}, wanted {expected}); "
            "choose another directory or delete this one."
        )
    return True


def make_synthetic_product(index: int, seed: int = 0, size: Tuple[int, int] = (256, 192)):
    """Draw product `index` of the set for `seed`: its shop photo, mask, street photo and parse map.

    Args:
        index: product number; the drawing depends only on (seed, index).
        seed: the set's seed.
        size: (H, W) of every image.

    Returns:
        dict with "product" (H, W, 3) uint8, "product_mask" (H, W) uint8 (0/255-ish, anti-aliased),
        "street" (H, W, 3) uint8, "parse" (H, W) uint8 LIP labels, "garment_kind" str.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    shape = (int(size[0]), int(size[1]))
    garment = _draw_product(rng, shape)
    street, parse = _street_photo(rng, garment, shape)
    return {
        "product": np.round(garment.photo * 255.0).astype(np.uint8),
        "product_mask": np.round(garment.mask * 255.0).astype(np.uint8),
        "street": street,
        "parse": parse,
        "garment_kind": garment.kind,
    }


def make_synthetic_dataset(
    root: Union[str, os.PathLike],
    n_products: int = 120,
    seed: int = 0,
    size: Tuple[int, int] = (256, 192),
) -> Path:
    """Generate the synthetic street-to-shop set into `root`, in the VITON layout.

    Layout (ids NNNNNN = 000001 ... n_products)::

        train_pairs.txt                  "NNNNNN_0.png NNNNNN_1.png" per line (person, product)
        train/image/NNNNNN_0.png         street photo
        train/cloth/NNNNNN_1.png         shop photo on white
        train/image-parse/NNNNNN_0.png   palette PNG, LIP labels 0, 2, 5, 9, 13, 14, 15
        train/cloth-mask/NNNNNN_1.png    grey product mask
        SYNTHETIC_COMPLETE.json          parameters; written last

    If `root` already holds a complete set with the same parameters nothing is done (resumable).

    Args:
        root: destination directory (its parent is created if needed).
        n_products: number of products (= pairs).
        seed: seed of the whole set.
        size: (H, W) of the images.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: n_products or size not positive.
        FileExistsError: `root` exists, is not empty and is not a complete set with these parameters.
    """
    if int(n_products) <= 0:
        raise ValueError(f"n_products must be positive, got {n_products}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (H, W) with both sides >= 32, got {size}")
    root = Path(root)
    expected = _marker_content(n_products, seed, size)
    if root.exists():
        if _is_complete(root, expected):
            return root
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists but is not a complete synthetic set (no {SYNTHETIC_MARKER}); delete it and retry."
            )
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    try:
        half = staging / "train"
        for folder in ("image", "cloth", "image-parse", "cloth-mask"):
            (half / folder).mkdir(parents=True)

        def draw_and_write(index: int) -> None:
            pair_id = f"{index:06d}"
            drawn = make_synthetic_product(index, seed=seed, size=size)
            # zlib level 1: the noisy street photos barely compress better at higher levels, and
            # encoding at the default level was most of the generation time.
            fast = {"compress_level": 1}
            write_image_atomic(half / "image" / f"{pair_id}_0.png", drawn["street"], **fast)
            write_image_atomic(half / "cloth" / f"{pair_id}_1.png", drawn["product"], **fast)
            write_image_atomic(half / "image-parse" / f"{pair_id}_0.png", drawn["parse"], palette=LIP_PALETTE, **fast)
            write_image_atomic(half / "cloth-mask" / f"{pair_id}_1.png", drawn["product_mask"], **fast)

        # Products are independent (product i depends on (seed, i) only) and numpy, cv2 and zlib release
        # the GIL, so threads speed generation up without changing a byte of the output.
        indices = range(1, int(n_products) + 1)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for _ in pool.map(draw_and_write, indices):
                pass
        finally:
            # On failure, drop the products not started yet and wait for the running ones, so nothing
            # writes into the staging directory while it is being removed.
            pool.shutdown(wait=True, cancel_futures=True)
        lines = [f"{index:06d}_0.png {index:06d}_1.png" for index in indices]
        (staging / "train_pairs.txt").write_text("\n".join(lines) + "\n")
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished the same set first: keep theirs if it is complete.
            if root.exists() and _is_complete(root, expected):
                shutil.rmtree(staging, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("generated synthetic street-to-shop set: %d products in %s", n_products, root)
    return root
