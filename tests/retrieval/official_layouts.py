"""Tiny trees in the published layouts of DeepFashion2, DeepFashion Consumer-to-shop, Exact Street2Shop and
Lookbook, for the loader tests: generated images (one colour-and-stripe garment per product, so colorhist can
tell them apart) and annotation files written exactly as the sets publish them.

Each writer returns the tree's root; the golden values the tests check are written out in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

# Strongly different (colour, stripe colour) per garment letter: colour histograms alone separate them.
GARMENTS: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int]]] = {
    "A": ((220, 30, 30), (250, 240, 60)),
    "B": ((30, 160, 40), (20, 20, 20)),
    "C": ((40, 60, 220), (250, 250, 250)),
    "D": ((240, 140, 20), (90, 30, 120)),
    "E": ((200, 40, 200), (40, 200, 200)),
    "F": ((120, 80, 40), (180, 180, 250)),
}


def garment(letter: str, height: int, width: int, phase: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: the garment's colour with horizontal stripes of its second colour."""
    colour, stripe = GARMENTS[letter]
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = colour
    rows = (np.arange(height) + phase) % 8 < 3
    pixels[rows] = stripe
    return pixels


def scene(
    path: Path, size: Tuple[int, int], items: Sequence[Tuple[str, Tuple[int, int, int, int]]], street: bool
) -> None:
    """Write a photo of (height, width) `size` with each (letter, (x0, y0, x1, y1)) garment pasted at its box:
    on a grey noisy background for a street/consumer photo, on white for a shop photo."""
    rng = np.random.default_rng(len(items) * 7 + size[0])
    if street:
        pixels = rng.integers(90, 140, size=(*size, 3)).astype(np.uint8)
    else:
        pixels = np.full((*size, 3), 255, dtype=np.uint8)
    for number, (letter, (x0, y0, x1, y1)) in enumerate(items):
        pixels[y0:y1, x0:x1] = garment(letter, y1 - y0, x1 - x0, phase=number + (2 if street else 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


# --------------------------------------------------------------------------------------------------
# DeepFashion2: <part>/image/NNNNNN.jpg and <part>/annos/NNNNNN.json
# --------------------------------------------------------------------------------------------------


def _deepfashion2_item(category: int, style: int, box) -> dict:
    x0, y0, x1, y1 = box
    return {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "scale": 2,
        "viewpoint": 2,
        "zoom_in": 1,
        "landmarks": [x0 + 1, y0 + 1, 2] + [0, 0, 0] * 24,
        "style": style,
        "bounding_box": [x0, y0, x1, y1],
        "category_id": category,
        "occlusion": 1,
        "category_name": {1: "short sleeve top", 7: "shorts", 10: "short sleeve dress"}[category],
    }


DEEPFASHION2_IMAGES = {
    # partition: [(stem, source, pair_id, [(letter, category, style, box), ...]), ...]
    "validation": [
        ("000001", "user", 1, [("A", 1, 1, (10, 12, 50, 60)), ("D", 7, 0, (60, 20, 90, 70))]),
        ("000002", "shop", 1, [("A", 1, 1, (5, 5, 45, 55)), ("B", 10, 2, (50, 10, 95, 75))]),
        ("000003", "shop", 1, [("A", 1, 1, (20, 20, 60, 70))]),  # a second shop image of pair 1 style 1
        ("000004", "user", 2, [("C", 10, 1, (30, 8, 80, 70))]),
        ("000005", "shop", 2, [("C", 10, 1, (8, 8, 56, 70)), ("E", 7, 0, (60, 30, 96, 78))]),
        ("000006", "user", 1, [("B", 10, 2, (15, 10, 70, 72))]),
        ("000007", "user", 3, [("F", 1, 1, (10, 10, 50, 50))]),  # no shop item of pair 3: not a query
    ],
    "train": [
        ("000001", "user", 1, [("F", 1, 1, (12, 10, 52, 60))]),
        ("000002", "shop", 1, [("F", 1, 1, (30, 15, 80, 75))]),
    ],
}


def write_deepfashion2(root: Path) -> Path:
    for partition, images in DEEPFASHION2_IMAGES.items():
        for stem, source, pair_id, items in images:
            scene(
                root / partition / "image" / f"{stem}.jpg",
                (80, 100),
                [(letter, box) for letter, _, _, box in items],
                street=source == "user",
            )
            annotation = {"source": source, "pair_id": pair_id}
            for number, (_, category, style, box) in enumerate(items, start=1):
                annotation[f"item{number}"] = _deepfashion2_item(category, style, box)
            (root / partition / "annos").mkdir(parents=True, exist_ok=True)
            (root / partition / "annos" / f"{stem}.json").write_text(json.dumps(annotation))
    return root
