"""Exact Street2Shop (Kiapour et al., ICCV 2015): ``street2shop:ROOT`` (all categories together) and
``street2shop:ROOT,CATEGORY`` (one category's gallery, as the paper scores it), in the published layout.

Per category (bags, belts, dresses, eyewear, footwear, hats, leggings, outerwear, pants, skirts, tops):

- ``ROOT/meta/json/retrieval_<category>.json``: ``[{"product": P, "photo": I}, ...]``, the shop photos of
  each product (the gallery);
- ``ROOT/meta/json/train_pairs_<category>.json`` and ``test_pairs_<category>.json``:
  ``[{"photo": I, "product": P, "bbox": {"left": x, "top": y, "width": w, "height": h}}, ...]``, a street
  photo, the product worn in it, and where;
- ``ROOT/images/<photo id>.jpg``: every photo (zero-padded names are read too).

A query is a street photo cropped by its bbox; several pairs with the same photo and bbox are one query with
several relevant products (several query rows). Shop photos are product shots and are not cropped.

- Product ids: the product numbers (``"4"``); query ids ``<photo>@<left>,<top>,<width>,<height>``. All
  categories together: the union of the galleries (a product listed in two categories is one product).
- Splits: ``val`` evaluates the ``test_pairs`` (the set has no separate validation), ``train`` the
  ``train_pairs``, ``all`` both. Training pairs (``val`` and ``train``) are the ``train_pairs``: the street
  crop and its product's shop photo; no parse maps (``parse`` and ``mask`` None).
- The set is distributed as URLs and many have died: photos missing under ``images/`` are left out with a
  warning (counted), and queries whose product lost every shop photo with them.
- A product with several shop photos keeps them all (several catalog rows): the gallery scores it by its
  best-matching photo (`retrieval.gallery`); a training pair takes the first in ``retrieval_<category>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from retrieval.datasets import layout
from retrieval.datasets.base import PathLike, RetrievalSet, default_cache_dir, logger, register_dataset_format

NAME = "street2shop"
STREET2SHOP_SPLITS = ("val", "train", "all")
STREET2SHOP_CATEGORIES = (
    "bags",
    "belts",
    "dresses",
    "eyewear",
    "footwear",
    "hats",
    "leggings",
    "outerwear",
    "pants",
    "skirts",
    "tops",
)
STREET2SHOP_LAYOUT = layout.expected_layout(
    NAME,
    """
ROOT/
  meta/json/retrieval_<category>.json     [{"product": P, "photo": I}, ...]   the shop photos of each product
  meta/json/train_pairs_<category>.json   [{"photo": I, "product": P, "bbox": {"left", "top", "width", "height"}}]
  meta/json/test_pairs_<category>.json    the same, for evaluation
  images/<photo id>.jpg
""",
)
_PAIR_FILES = {"val": ("test",), "train": ("train",), "all": ("train", "test")}


def _read_json(path: Path, fields: Sequence[str]) -> List[dict]:
    if not path.is_file():
        raise layout.layout_error(NAME, path, path.name)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError("the file is not a JSON list")
        for entry in entries:
            missing = [field for field in fields if field not in entry]
            if missing:
                raise ValueError(f"an entry lacks {missing}: {entry}")
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a Street2Shop list ({error}); expected the {NAME} layout:\n{STREET2SHOP_LAYOUT}")
    return entries


def _photo_files(root: Path) -> Dict[int, str]:
    """photo id -> path of ``images/<id>.<ext>`` (one directory read; ``000123.jpg`` is photo 123)."""
    folder = root / "images"
    if not folder.is_dir():
        raise layout.layout_error(NAME, folder, "the photo folder")
    return {int(path.stem): str(path) for path in sorted(folder.iterdir()) if path.stem.isdigit() and path.is_file()}


def _categories(json_dir: Path, category: Optional[str]) -> List[str]:
    if category is not None:
        if category not in STREET2SHOP_CATEGORIES:
            raise ValueError(
                f"{NAME}: unknown category {category!r}; the categories: {', '.join(STREET2SHOP_CATEGORIES)}"
            )
        return [category]
    found = [name for name in STREET2SHOP_CATEGORIES if (json_dir / f"retrieval_{name}.json").is_file()]
    if not found:
        raise layout.layout_error(NAME, json_dir / "retrieval_<category>.json", "a category's retrieval list")
    return found


def _gallery(json_dir: Path, categories: Sequence[str], photos: Dict[int, str], name: str) -> pd.DataFrame:
    rows = [
        (str(entry["product"]), int(entry["photo"]), category)
        for category in categories
        for entry in _read_json(json_dir / f"retrieval_{category}.json", ("product", "photo"))
    ]
    shop = pd.DataFrame(rows, columns=["product_id", "photo", "category"])
    shop = _drop_missing_photos(shop, photos, name, "shop")
    shop = shop.drop_duplicates(["product_id", "photo"])  # a product listed in two categories
    shop["source_image"] = [photos[photo] for photo in shop["photo"]]
    return shop.reset_index(drop=True)


def _street_items(json_dir: Path, categories, halves, photos: Dict[int, str], name: str) -> pd.DataFrame:
    """One row per pair of the halves (test, train): query_id, product_id, category, source_image, box."""
    rows = []
    for half in halves:
        for category in categories:
            path = json_dir / f"{half}_pairs_{category}.json"
            for entry in _read_json(path, ("photo", "product", "bbox")):
                try:
                    box = entry["bbox"]
                    left, top, width, height = (float(box[key]) for key in ("left", "top", "width", "height"))
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: bbox must be {{left, top, width, height}}, got {entry['bbox']!r}")
                query_id = f"{int(entry['photo'])}@{left:g},{top:g},{width:g},{height:g}"
                rows.append(
                    (
                        query_id,
                        str(entry["product"]),
                        category,
                        int(entry["photo"]),
                        left,
                        top,
                        left + width,
                        top + height,
                    )
                )
    items = pd.DataFrame(rows, columns=["query_id", "product_id", "category", "photo", "x0", "y0", "x1", "y1"])
    items = _drop_missing_photos(items.drop_duplicates(["query_id", "product_id"]), photos, name, "street")
    items["source_image"] = [photos[photo] for photo in items["photo"]]
    return items


def _drop_missing_photos(table: pd.DataFrame, photos: Dict[int, str], name: str, what: str) -> pd.DataFrame:
    present = np.array([photo in photos for photo in table["photo"]], dtype=bool)
    if not present.all():
        logger.warning(
            "%s: left out %d %s rows whose photo is not under images/ (e.g. photo %s)",
            name,
            int((~present).sum()),
            what,
            table["photo"][~present].iloc[0],
        )
    return table[present].reset_index(drop=True)


def load_street2shop(
    root: PathLike, split: str = "val", category: Optional[str] = None, cache_dir: Optional[PathLike] = None
) -> RetrievalSet:
    """Load an Exact Street2Shop root as a street-to-shop retrieval set (see the module docstring).

    Args:
        root: the root holding meta/json/ and images/.
        split: "val" (the test pairs), "train" (the train pairs) or "all".
        category: one category's gallery and pairs; None: every category found, together.
        cache_dir: where the street crops go (``<cache_dir>/crops/``); default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet; catalog and queries carry category and source_image (queries also
        x0, y0, x1, y1); train = the train pairs (None for "all").

    Raises:
        FileNotFoundError: the root, meta/json/, images/ or a category's list is missing (the tree is shown).
        ValueError: an unknown split or category, or a list that does not parse (named).
    """
    layout.check_split(NAME, split, STREET2SHOP_SPLITS)
    root = layout.existing_root(NAME, root)
    json_dir = root / "meta" / "json"
    if not json_dir.is_dir():
        raise layout.layout_error(NAME, json_dir, "the annotation folder")
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    categories = _categories(json_dir, category)
    name = f"{NAME}:{root}{',' + category if category else ''} [{split}]"
    photos = _photo_files(root)
    catalog = _gallery(json_dir, categories, photos, name)
    catalog["image"] = catalog["source_image"]
    queries = layout.with_crops(_street_items(json_dir, categories, _PAIR_FILES[split], photos, name), cache_dir)

    train = None
    if split != "all":
        people = queries if split == "train" else _street_items(json_dir, categories, ("train",), photos, name)
        people = people[people["product_id"].isin(set(catalog["product_id"]))]
        people = layout.with_crops(people, cache_dir)
        products = layout.first_image_of_each_product(catalog).set_index("product_id").loc[people["product_id"]]
        products = products.reset_index()
        train = layout.training_pairs(people, products, people["query_id"] + "/" + people["product_id"])
    return layout.shop_set(
        name,
        root,
        catalog[["product_id", "image", "source_image", "category"]],
        queries[["query_id", "image", "product_id", "source_image", "x0", "y0", "x1", "y1", "category"]],
        train,
    )


@register_dataset_format(NAME, "street2shop:ROOT", "street2shop:ROOT,CATEGORY")
def street2shop_spec(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
    """``street2shop:ROOT[,CATEGORY]``: `load_street2shop` of ROOT, every category or one."""
    root, _, category = argument.rpartition(",")
    if not root:  # no comma: the whole argument is the root
        root, category = argument, ""
    if not root.strip():
        raise ValueError(
            f"bad dataset spec {spec!r}: expected street2shop:ROOT or street2shop:ROOT,CATEGORY "
            f"(CATEGORY one of {', '.join(STREET2SHOP_CATEGORIES)})"
        )
    return load_street2shop(root.strip(), split=split, category=category.strip() or None, cache_dir=cache_dir)
