"""What the loaders of published shop sets share (DeepFashion2, DeepFashion Consumer-to-shop, Exact Street2Shop,
Lookbook): layout errors that show the expected tree, boxed items cropped into the cache, a product's first image
for training pairs, queries whose product is not in the gallery, and the seeded split by product.

Item tables here are pandas frames with ``source_image`` (absolute path) and, for boxed items, the box columns
``x0, y0, x1, y1`` (pixels, x1/y1 exclusive; NaN for an unboxed item); `with_crops` adds ``image``, the path a
descriptor reads (the crop, or the source itself when there is no box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd

from retrieval.datasets.base import TRAIN_COLUMNS, PathLike, RetrievalSet, logger, register_dataset_format

BOX_COLUMNS = ("x0", "y0", "x1", "y1")

EXPECTED_LAYOUTS: Dict[str, str] = {}
"""Format name -> its expected tree (as each loader module registers it), for `street2shop datasets`."""


def expected_layout(name: str, tree: str) -> str:
    """Record and return the expected tree of format `name` (a module constant of its loader)."""
    EXPECTED_LAYOUTS[name] = tree.strip("\n")
    return EXPECTED_LAYOUTS[name]


def layout_error(name: str, missing: PathLike, what: str) -> FileNotFoundError:
    """The error for a root that lacks a file or folder of its format: names it and shows the expected tree."""
    return FileNotFoundError(
        f"{name}: {what} not found: {missing}; expected the {name} layout:\n{EXPECTED_LAYOUTS[name]}"
    )


def register_root_format(
    name: str, load: Callable[..., RetrievalSet], what: str, *, uses_seed: bool = False, uses_cache: bool = True
) -> Callable:
    """Register ``NAME:ROOT`` for ``load(root, split=..., [seed=...], [cache_dir=...])``; `what` says what ROOT is
    in the error for an empty argument. Returns the registered spec loader."""

    @register_dataset_format(name, f"{name}:ROOT")
    def spec_loader(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
        if not argument:
            raise ValueError(f"bad dataset spec {spec!r}: expected {name}:ROOT, {what}")
        options = {"seed": seed} if uses_seed else {}
        if uses_cache:
            options["cache_dir"] = cache_dir
        return load(argument, split=split, **options)

    spec_loader.__doc__ = f"``{name}:ROOT``: `{load.__name__}` of ROOT ({what})."
    return spec_loader


def existing_root(name: str, root: PathLike) -> Path:
    """`root` resolved; a FileNotFoundError showing the expected tree when it is not a directory."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise layout_error(name, root, "the root directory")
    return root


def check_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; valid splits: {', '.join(splits)}")


def with_crops(items: pd.DataFrame, cache_dir: Optional[PathLike]) -> pd.DataFrame:
    """`items` with ``image``: each boxed row's crop (`crop_images`, made once into the cache), else its source.

    Shape:
        - items: N rows with source_image and, optionally, x0, y0, x1, y1 (NaN = no box).
        - Output: the same N rows (a copy) with an ``image`` column of absolute path strings.
    """
    from retrieval.datasets.crops import crop_images

    items = items.reset_index(drop=True).copy()
    images = items["source_image"].astype(str).tolist()
    if all(column in items.columns for column in BOX_COLUMNS):
        boxes = items[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
        boxed = np.flatnonzero(~np.isnan(boxes).any(axis=1))
        crops = crop_images([images[row] for row in boxed], [tuple(boxes[row]) for row in boxed], cache_dir)
        for row, crop in zip(boxed, crops):
            images[row] = crop
    items["image"] = images
    return items


def first_image_of_each_product(shop: pd.DataFrame) -> pd.DataFrame:
    """The first image (in the given, official, order) of each product: the shop side of a training pair.

    The gallery keeps every shop image of a product (several catalog rows; the bench and the pipeline score
    the product by its best-matching image, `retrieval.gallery`); a training pair needs one.
    """
    return shop.drop_duplicates("product_id", keep="first").reset_index(drop=True)


def drop_queries_without_product(queries: pd.DataFrame, catalog: pd.DataFrame, name: str) -> pd.DataFrame:
    """The query rows whose product is in the catalog; a warning counts the others (they cannot be scored)."""
    known = queries["product_id"].isin(set(catalog["product_id"]))
    if not known.all():
        logger.warning(
            "%s: dropped %d query rows whose product has no shop image in the gallery (e.g. %s)",
            name,
            int((~known).sum()),
            ", ".join(map(str, queries.loc[~known, "product_id"].unique()[:5])),
        )
    return queries[known].reset_index(drop=True)


def validation_mask(n_ids: int, seed: int, val_fraction: float) -> np.ndarray:
    """(n_ids,) bool: which of n sorted ids go to validation, by a seeded permutation (as `load_viton` splits)."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    permutation = np.random.default_rng(seed).permutation(n_ids)
    in_val = np.zeros(n_ids, dtype=bool)
    in_val[permutation[: int(round(n_ids * float(val_fraction)))]] = True
    return in_val


def training_pairs(person: pd.DataFrame, product: pd.DataFrame, pair_ids: Sequence[str]) -> pd.DataFrame:
    """The TRAIN_COLUMNS table of matching items: person (street/consumer) and product (shop) rows, row by row,
    with their ``image`` and ``product_id``; no parse maps or masks (None)."""
    return pd.DataFrame(
        {
            "pair_id": list(pair_ids),
            "person_image": person["image"].tolist(),
            "product_image": product["image"].tolist(),
            "parse": pd.Series([None] * len(person), dtype=object),
            "mask": pd.Series([None] * len(person), dtype=object),
            "product_id": product["product_id"].astype(str).tolist(),
        },
        columns=list(TRAIN_COLUMNS),
    )


def shop_set(
    name: str,
    root: Path,
    catalog: pd.DataFrame,
    queries: pd.DataFrame,
    train: Optional[pd.DataFrame],
) -> RetrievalSet:
    """The validated RetrievalSet of crop-resolved tables: catalog product_id, image first (then the rest:
    source_image, boxes, category...), queries query_id, image, product_id first; queries without a gallery
    product dropped with a warning."""
    if catalog.empty:
        raise ValueError(f"{name}: no shop image in this split; nothing to index (check the layout and the split)")
    queries = drop_queries_without_product(queries, catalog, name)
    first = ["product_id", "image"]
    catalog = catalog[first + [c for c in catalog.columns if c not in first]].reset_index(drop=True)
    first = ["query_id", "image", "product_id"]
    queries = queries[first + [c for c in queries.columns if c not in first]].reset_index(drop=True)
    return RetrievalSet(name=name, catalog=catalog, queries=queries, train=train, root=root).validate()
