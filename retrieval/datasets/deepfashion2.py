"""DeepFashion2 consumer-to-shop retrieval: ``deepfashion2:ROOT`` (Ge et al. 2019, the published layout).

Every image has one annotation file, ``annos/NNNNNN.json``, with ``source`` ("user" or "shop"), ``pair_id``
and ``item1`` .. ``itemN``, each with ``category_id``, ``style`` and ``bounding_box`` [x1, y1, x2, y2]. As the
official retrieval evaluation does, a query is a user item with style > 0 and it matches the shop items of the
same pair_id and style; the gallery is the shop items. Items are cropped by their boxes (`crops.py`).

- Product ids: ``pair<pair_id>-style<style>``; a shop item of style 0 matches no user item and is a product
  of its own, ``pair<pair_id>-style0-<image>-item<n>`` (a distractor). Query ids: ``<image>-item<n>``.
- Splits: ``val`` evaluates the official ``validation`` partition (the test partition's annotations are not
  public), ``train`` the ``train`` partition, ``all`` both (ids prefixed ``train/`` and ``validation/``, since
  each partition numbers its pairs on its own). Training pairs (``val`` and ``train``) come from the
  ``train`` partition: each user item of style > 0 with the first shop crop of its product; no parse maps
  (``parse`` and ``mask`` None), so only proxies that need none can be trained on them.
- A product (pair_id + style) with several shop images keeps them all (several catalog rows): the gallery
  scores it by its best-matching crop (`retrieval.gallery`).
- The first load crops every item of the partitions it reads into ``<cache>/crops/`` (once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

from retrieval.datasets import layout
from retrieval.datasets.base import PathLike, RetrievalSet, default_cache_dir

NAME = "deepfashion2"
DEEPFASHION2_SPLITS = ("val", "train", "all")
DEEPFASHION2_LAYOUT = layout.expected_layout(
    NAME,
    """
ROOT/
  train/
    image/NNNNNN.jpg
    annos/NNNNNN.json      {"source": "user"|"shop", "pair_id": P,
                            "item1": {"category_id": C, "style": S, "bounding_box": [x1, y1, x2, y2], ...}, ...}
  validation/
    image/NNNNNN.jpg
    annos/NNNNNN.json
""",
)
_PARTITIONS = {"val": ("validation",), "train": ("train",), "all": ("train", "validation")}


def _item_keys(annotation: dict) -> List[str]:
    """item1, item2, ... of one annotation, in numeric order (item10 after item9)."""
    keys = [key for key in annotation if key.startswith("item") and key[4:].isdigit()]
    return sorted(keys, key=lambda key: int(key[4:]))


def _read_partition(root: Path, partition: str) -> pd.DataFrame:
    """One row per annotated item of a partition, in file order: partition, image stem, item, source,
    pair_id, style, category_id, source_image, x0, y0, x1, y1."""
    annos = root / partition / "annos"
    images = root / partition / "image"
    if not annos.is_dir():
        raise layout.layout_error(NAME, annos, f"the {partition} annotation folder")
    image_files = {path.stem: path for path in images.iterdir() if path.is_file()} if images.is_dir() else {}
    rows = []
    for anno in sorted(annos.glob("*.json")):
        try:
            annotation = json.loads(anno.read_text(encoding="utf-8"))
            source, pair_id = str(annotation["source"]), int(annotation["pair_id"])
            if source not in ("user", "shop"):
                raise ValueError(f"source must be 'user' or 'shop', got {source!r}")
            items = [(key, annotation[key]) for key in _item_keys(annotation)]
            parsed = [
                (key, int(item["style"]), int(item["category_id"]), [float(v) for v in item["bounding_box"]])
                for key, item in items
            ]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{anno}: not a DeepFashion2 annotation ({type(error).__name__}: {error}); expected the {NAME} "
                f"layout:\n{DEEPFASHION2_LAYOUT}"
            ) from None
        if anno.stem not in image_files:
            raise layout.layout_error(NAME, images / f"{anno.stem}.jpg", f"the image of {anno}")
        for key, style, category, box in parsed:
            if len(box) != 4:
                raise ValueError(f"{anno}: {key}.bounding_box must be [x1, y1, x2, y2], got {box}")
            rows.append(
                (partition, anno.stem, key, source, pair_id, style, category, str(image_files[anno.stem]), *box)
            )
    columns = ["partition", "stem", "item", "source", "pair_id", "style", "category_id", "source_image"]
    return pd.DataFrame(rows, columns=columns + ["x0", "y0", "x1", "y1"])


def _with_ids(items: pd.DataFrame, prefix: bool) -> pd.DataFrame:
    """Add product_id and item_id (``<image>-item<n>``), prefixed by the partition when partitions are pooled."""
    items = items.copy()
    head = items["partition"] + "/" if prefix else ""
    items["item_id"] = head + items["stem"] + "-" + items["item"]
    product = head + "pair" + items["pair_id"].astype(str) + "-style" + items["style"].astype(str)
    own = (items["style"] == 0).to_numpy()  # style 0 matches nothing: a product of its own
    items["product_id"] = np.where(own, product + "-" + items["stem"] + "-" + items["item"], product)
    return items


def _gallery_and_queries(items: pd.DataFrame, name: str):
    """(shop items, several per product where it has several, user items of style > 0 as queries)."""
    shop = items[items["source"] == "shop"].reset_index(drop=True)
    users = items[(items["source"] == "user") & (items["style"] > 0)].reset_index(drop=True)
    return shop, users.rename(columns={"item_id": "query_id"})


def load_deepfashion2(root: PathLike, split: str = "val", cache_dir: Optional[PathLike] = None) -> RetrievalSet:
    """Load a DeepFashion2 root as a consumer-to-shop retrieval set (see the module docstring).

    Args:
        root: the DeepFashion2 root (``train/`` and/or ``validation/``, each with ``image/`` and ``annos/``).
        split: "val" (the validation partition), "train" or "all".
        cache_dir: where the crops go (``<cache_dir>/crops/``); default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet; catalog and queries carry source_image, x0, y0, x1, y1 and category_id
        beside the crop paths; train pairs from the train partition (None for "all", or when the root has
        no ``train/`` partition).

    Raises:
        FileNotFoundError: the root or a partition's annos/ is missing, or an annotation's image is
            (the message shows the expected tree).
        ValueError: an unknown split, or a malformed annotation file (named).
    """
    layout.check_split(NAME, split, DEEPFASHION2_SPLITS)
    root = layout.existing_root(NAME, root)
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    name = f"{NAME}:{root} [{split}]"
    pooled = split == "all"
    items = pd.concat([_read_partition(root, part) for part in _PARTITIONS[split]], ignore_index=True)
    shop, users = _gallery_and_queries(_with_ids(items, pooled), name)
    catalog = layout.with_crops(shop, cache_dir)
    queries = layout.with_crops(users, cache_dir)

    train = None
    if split == "train" or (split == "val" and (root / "train" / "annos").is_dir()):
        if split == "val":  # the training pairs come from the train partition, read here
            shop, users = _gallery_and_queries(_with_ids(_read_partition(root, "train"), False), f"{name} train")
        users = users[users["product_id"].isin(set(shop["product_id"]))].reset_index(drop=True)
        products = layout.first_image_of_each_product(shop).set_index("product_id").loc[users["product_id"]]
        products = products.reset_index()
        train = layout.training_pairs(
            layout.with_crops(users, cache_dir), layout.with_crops(products, cache_dir), users["query_id"]
        )
    keep = ["product_id", "image", "source_image", "x0", "y0", "x1", "y1", "category_id"]
    return layout.shop_set(name, root, catalog[keep], queries[["query_id"] + keep], train)


deepfashion2_spec = layout.register_root_format(NAME, load_deepfashion2, "the DeepFashion2 directory")
