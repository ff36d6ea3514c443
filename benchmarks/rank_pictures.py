"""Rank pictures: for a few seeded queries, the street photo (with the proxy's crop box), what the proxy made
of it and the top 5 products, the true one framed green; PNGs and one static HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd

from retrieval.files import write_text_atomic


def _thumbnail(image: np.ndarray, height: int, width: int, border: Optional[tuple] = None) -> np.ndarray:
    import cv2

    tile = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if border is not None:
        cv2.rectangle(tile, (0, 0), (width - 1, height - 1), border, thickness=4)
    return tile


def draw_crop_box(image: np.ndarray, box: Optional[Tuple[int, int, int, int]], colour=(60, 60, 200)) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 photo with the proxy's crop box (x0, y0, x1, y1) drawn in the proxy's colour.

    Example:
        >>> drawn = draw_crop_box(np.zeros((20, 20, 3), np.uint8), (5, 5, 15, 15))
        >>> drawn[5, 10].tolist(), drawn[10, 10].tolist()
        ([60, 60, 200], [0, 0, 0])
    """
    if box is None:
        return image
    drawn = np.ascontiguousarray(image).copy()
    thickness = max(1, round(max(image.shape[:2]) / 150))
    x0, y0, x1, y1 = box
    cv2.rectangle(drawn, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), colour, thickness)
    return drawn


def rank_picture(
    query_image: np.ndarray,
    proxy_image: np.ndarray,
    top_images: List[np.ndarray],
    correct: List[bool],
    tile: tuple = (128, 96),
    crop_box: Optional[Tuple[int, int, int, int]] = None,
) -> np.ndarray:
    """One row: query (with the proxy's crop box, if any) | proxy output | top-k, the true product framed green,
    others grey. (H, W, 3) uint8."""
    height, width = tile
    gap = np.full((height, 8, 3), 255, np.uint8)
    parts = [
        _thumbnail(draw_crop_box(query_image, crop_box), height, width),
        gap,
        _thumbnail(proxy_image, height, width, (60, 60, 200)),
        gap,
    ]
    for image, hit in zip(top_images, correct):
        parts += [_thumbnail(image, height, width, (0, 170, 0) if hit else (190, 190, 190)), gap[:, :3]]
    return np.concatenate(parts, axis=1)


def write_rank_pages(
    rows: List[Dict], out_dir: Path, title: str, write_image: Callable[[Path, np.ndarray], None]
) -> Path:
    """Rank pictures as PNGs plus one static HTML page. rows: {label, query_id, picture, rank}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i, row in enumerate(rows):
        name = f"rank_{i:03d}.png"
        write_image(out_dir / name, row["picture"])
        rank = "not in top 20" if not row["rank"] else f"rank {row['rank']}"
        items.append(
            f"<figure><img src='{name}' alt='{html.escape(str(row['query_id']))}'><figcaption>"
            f"{html.escape(row['label'])} &middot; query {html.escape(str(row['query_id']))} "
            f"&middot; true product {rank}"
            "</figcaption></figure>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{margin:0 0 1.5em}img{max-width:100%}"
        "figcaption{color:#444}</style><h1>" + html.escape(title) + "</h1>"
        "<p>Each row: street photo (where the proxy cropped, boxed in blue) | proxy output (blue) | top 5 products, "
        "the true product framed green.</p>" + "\n".join(items)
    )
    return write_text_atomic(out_dir / "index.html", page)


# ---- the files `street2shop bench` writes -------------------------------------------------------


def write_bench_rank_pictures(
    per_query: pd.DataFrame,
    query_images: Dict[str, str],
    product_images: Dict[str, str],
    proxy_outputs: Dict[str, Dict[str, np.ndarray]],
    query_ids: Sequence[str],
    out_dir: Path,
    title: str,
    crop_boxes: Optional[Dict[str, Dict[str, Tuple[int, int, int, int]]]] = None,
) -> Path:
    """Rank pictures (PNG + one HTML page) for the same queries under every proxy x descriptor.

    Args:
        per_query: `BenchResult.per_query` (its top5 column names the products shown).
        query_images, product_images: id -> image path.
        proxy_outputs: proxy label -> {query_id: (H, W, 3) uint8 proxy output}; `none` shows the photo.
        query_ids: the queries to picture (a seeded sample, the same for every combination).
        crop_boxes: proxy label -> {query_id: (x0, y0, x1, y1)} where the proxy cut from the photo, drawn on it.
    """
    from retrieval.files import write_image_atomic
    from retrieval.io import read_image

    wanted = per_query[per_query["query_id"].isin(set(query_ids))]
    first_index = per_query["index"].iloc[0]
    wanted = wanted[wanted["index"] == first_index]
    cache: Dict[str, np.ndarray] = {}

    def image(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = read_image(path)
        return cache[path]

    rows = []
    for record in wanted.to_dict("records"):
        query_path = query_images[record["query_id"]]
        shown = proxy_outputs.get(record["proxy"], {}).get(record["query_id"])
        top = [p for p in str(record["top5"]).split(";") if p]
        tops = [image(product_images[p]) if p in product_images else np.full((8, 6, 3), 255, np.uint8) for p in top]
        picture = rank_picture(
            image(query_path),
            image(query_path) if shown is None else shown,
            tops,
            [p == str(record["product_id"]) for p in top],
            crop_box=(crop_boxes or {}).get(record["proxy"], {}).get(record["query_id"]),
        )
        rows.append(
            {
                "label": f"{record['proxy']} + {record['descriptor']}",
                "query_id": record["query_id"],
                "picture": picture,
                "rank": int(record["rank"]),
            }
        )
    return write_rank_pages(rows, out_dir, title, lambda path, array: write_image_atomic(path, array, compress_level=1))
