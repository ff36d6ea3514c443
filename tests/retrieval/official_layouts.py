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


def check_crops(table) -> None:
    """Every row's image holds exactly its box's pixels (x0, y0, x1, y1) of its source image."""
    from retrieval.io import read_image

    for row in table.itertuples():
        x0, y0, x1, y1 = (int(v) for v in (row.x0, row.y0, row.x1, row.y1))
        assert np.array_equal(read_image(row.image), read_image(row.source_image)[y0:y1, x0:x1]), row


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


# --------------------------------------------------------------------------------------------------
# DeepFashion Consumer-to-shop: Eval/list_eval_partition.txt, Anno/list_bbox_consumer2shop.txt, img/...
# --------------------------------------------------------------------------------------------------

# (image name, letter, clothes_type, source_type (1 shop, 2 consumer), box); "comsumer" as the set spells it.
C2S_IMAGES = [
    ("img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg", "A", 1, 2, (10, 10, 60, 70)),
    ("img/TOPS/Summer_Wear/id_00000001/shop_01.jpg", "A", 1, 1, (20, 5, 80, 75)),
    ("img/TOPS/Summer_Wear/id_00000001/shop_02.jpg", "A", 1, 1, (5, 5, 50, 60)),
    ("img/TROUSERS/Pants/id_00000002/comsumer_01.jpg", "B", 2, 2, (30, 12, 90, 76)),
    ("img/TROUSERS/Pants/id_00000002/comsumer_02.jpg", "B", 2, 2, (0, 0, 40, 50)),
    ("img/TROUSERS/Pants/id_00000002/shop_01.jpg", "B", 2, 1, (15, 15, 65, 70)),
    ("img/DRESSES/Dress/id_00000003/comsumer_01.jpg", "C", 3, 2, (40, 20, 95, 78)),
    ("img/DRESSES/Dress/id_00000003/shop_01.jpg", "C", 3, 1, (10, 8, 70, 72)),
    ("img/TOPS/Blouse/id_00000004/comsumer_01.jpg", "D", 1, 2, (12, 14, 62, 64)),
    ("img/TOPS/Blouse/id_00000004/shop_01.jpg", "D", 1, 1, (8, 8, 58, 68)),
]
C2S_PAIRS = [
    ("img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg", "img/TOPS/Summer_Wear/id_00000001/shop_01.jpg", "val"),
    ("img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg", "img/TOPS/Summer_Wear/id_00000001/shop_02.jpg", "val"),
    ("img/TROUSERS/Pants/id_00000002/comsumer_01.jpg", "img/TROUSERS/Pants/id_00000002/shop_01.jpg", "val"),
    ("img/TROUSERS/Pants/id_00000002/comsumer_02.jpg", "img/TROUSERS/Pants/id_00000002/shop_01.jpg", "val"),
    ("img/DRESSES/Dress/id_00000003/comsumer_01.jpg", "img/DRESSES/Dress/id_00000003/shop_01.jpg", "test"),
    ("img/TOPS/Blouse/id_00000004/comsumer_01.jpg", "img/TOPS/Blouse/id_00000004/shop_01.jpg", "train"),
]


def _deepfashion_list(path: Path, header: str, rows: Sequence[Sequence[object]]) -> None:
    """A DeepFashion list file: the count, the header, then the rows, left-aligned columns as published."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), header] + ["  ".join(f"{field!s:<8}" for field in row).rstrip() for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_deepfashion_c2s(root: Path) -> Path:
    for name, letter, _, source, box in C2S_IMAGES:
        scene(root / name, (80, 100), [(letter, box)], street=source == 2)
    _deepfashion_list(
        root / "Eval" / "list_eval_partition.txt",
        "image_pair_name_1 image_pair_name_2 item_id evaluation_status",
        [(consumer, shop, shop.split("/")[3], status) for consumer, shop, status in C2S_PAIRS],
    )
    _deepfashion_list(
        root / "Anno" / "list_bbox_consumer2shop.txt",
        "image_name clothes_type source_type x_1 y_1 x_2 y_2",
        [(name, clothes, source, *box) for name, _, clothes, source, box in C2S_IMAGES],
    )
    return root


# --------------------------------------------------------------------------------------------------
# Exact Street2Shop: meta/json/{retrieval,train_pairs,test_pairs}_<category>.json, images/<photo>.jpg
# --------------------------------------------------------------------------------------------------

# photo id -> (letters, boxes as (left, top, width, height)); shop photos (one garment on white) have no boxes.
STREET2SHOP_SHOP_PHOTOS = {11: "A", 12: "A", 13: "B", 14: "C", 15: "D", 16: "E"}
STREET2SHOP_STREET_PHOTOS = {
    1: [("A", (10, 12, 40, 50))],
    2: [("B", (40, 5, 50, 60)), ("C", (5, 20, 30, 50))],
    3: [("D", (20, 10, 55, 60))],
    4: [("E", (15, 15, 45, 55))],
}
STREET2SHOP_LISTS = {
    "retrieval_dresses.json": [
        {"product": 101, "photo": 11},
        {"product": 101, "photo": 12},
        {"product": 102, "photo": 13},
        {"product": 105, "photo": 16},
    ],
    "retrieval_skirts.json": [{"product": 103, "photo": 14}, {"product": 104, "photo": 15}],
    "test_pairs_dresses.json": [
        {"photo": 1, "product": 101, "bbox": {"width": 40, "top": 12, "height": 50, "left": 10}},
        {"photo": 2, "product": 102, "bbox": {"width": 50, "top": 5, "height": 60, "left": 40}},
        {"photo": 9, "product": 102, "bbox": {"width": 50, "top": 5, "height": 60, "left": 40}},  # a dead URL
    ],
    "test_pairs_skirts.json": [{"photo": 2, "product": 103, "bbox": {"width": 30, "top": 20, "height": 50, "left": 5}}],
    "train_pairs_dresses.json": [
        {"photo": 4, "product": 105, "bbox": {"width": 45, "top": 15, "height": 55, "left": 15}}
    ],
    "train_pairs_skirts.json": [
        {"photo": 3, "product": 104, "bbox": {"width": 55, "top": 10, "height": 60, "left": 20}}
    ],
}


def write_street2shop(root: Path) -> Path:
    for photo, letter in STREET2SHOP_SHOP_PHOTOS.items():
        scene(root / "images" / f"{photo}.jpg", (90, 70), [(letter, (10, 10, 60, 80))], street=False)
    for photo, items in STREET2SHOP_STREET_PHOTOS.items():
        boxes = [(letter, (x, y, x + w, y + h)) for letter, (x, y, w, h) in items]
        scene(root / "images" / f"{photo}.jpg", (80, 100), boxes, street=True)
    (root / "meta" / "json").mkdir(parents=True, exist_ok=True)
    for name, entries in STREET2SHOP_LISTS.items():
        (root / "meta" / "json" / name).write_text(json.dumps(entries))
    return root


# --------------------------------------------------------------------------------------------------
# LookBook (PaintNet): one folder of PID<product>_CLEAN<0|1>_IID<image>.jpg
# --------------------------------------------------------------------------------------------------

LOOKBOOK_PRODUCTS = {"000000": "A", "000001": "B", "000002": "C", "000003": "D", "000004": "E", "000005": "F"}


def write_lookbook(root: Path) -> Path:
    """Each product: one CLEAN1 product photo and two CLEAN0 photos of a person wearing it; product 000002 has a
    second CLEAN1 photo, product 000009 only a CLEAN0 photo."""
    image = 0
    for product, letter in LOOKBOOK_PRODUCTS.items():
        files = [(1, False)] + ([(1, False)] if product == "000002" else []) + [(0, True), (0, True)]
        for clean, street in files:
            box = (30, 20, 70, 75) if street else (10, 5, 90, 75)
            scene(root / f"PID{product}_CLEAN{clean}_IID{image:06d}.jpg", (80, 100), [(letter, box)], street=street)
            image += 1
    scene(root / f"PID000009_CLEAN0_IID{image:06d}.jpg", (80, 100), [("A", (0, 0, 20, 20))], street=True)
    return root
