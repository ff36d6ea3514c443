"""Retrieval data sets: the RetrievalSet tables, their checks, and the registry of dataset formats.

Every loader returns a `RetrievalSet` of plain pandas tables holding absolute image paths; images are
read later, by `retrieval.io.read_image`, by whoever needs the pixels.

A dataset spec is ``FORMAT:ARGUMENT``; `load_dataset` hands the argument to the loader registered for
FORMAT with `register_dataset_format` (one module per format in this package: ``synthetic.py``,
``viton.py``, ``csv.py``). A new format is one module holding one registered loader, imported by the
package ``__init__``.

Example:
    >>> from retrieval.datasets import load_dataset
    >>> data = load_dataset("synthetic:60", split="val")  # doctest: +SKIP
    >>> print(data.describe())  # doctest: +SKIP
    viton:/home/me/.cache/street2shop/synthetic-60-seed0 [val]: 20 products, 20 queries, 40 training pairs
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from retrieval.gallery import products_and_images
from retrieval.registry import Registry

logger = logging.getLogger("retrieval.datasets")

PathLike = Union[str, os.PathLike]

CATALOG_COLUMNS = ("product_id", "image")
ID_COLUMNS = ("product_id", "query_id")
QUERY_COLUMNS = ("query_id", "image", "product_id")
TRAIN_COLUMNS = ("pair_id", "person_image", "product_image", "parse", "mask", "product_id")
CACHE_ENV_VARIABLE = "STREET2SHOP_CACHE"


@dataclass
class RetrievalSet:
    """A catalog to index, street queries with ground truth, and optional training pairs.

    Attributes:
        name: where the set came from, for logs and reports (e.g. "viton:/data/viton [val]").
        catalog: one row per product image: product_id (str), image (absolute path str); a product with
            several images has several rows (the gallery scores it by its best-matching image,
            `retrieval.gallery`).
        queries: query_id (str), image (absolute path str), product_id (str, a relevant product); a query
            with several relevant products has several rows. May be empty (index-only sets).
        train: pairs for fitting descriptors and training proxies: pair_id, person_image, product_image,
            parse, mask (paths or None when absent), product_id; None when the set has none.
        root: the directory the set was read from, if any.
    """

    name: str
    catalog: pd.DataFrame
    queries: pd.DataFrame
    train: Optional[pd.DataFrame] = None
    root: Optional[Path] = None

    def describe(self) -> str:
        """One line with the sizes, e.g. "csv:shop.csv: 500 products (1400 images), 120 queries (130 rows), no
        training pairs" (the images only when a product has several)."""
        n_queries = self.queries["query_id"].nunique() if "query_id" in self.queries else len(self.queries)
        rows = f" ({len(self.queries)} rows)" if len(self.queries) != n_queries else ""
        train = f"{len(self.train)} training pairs" if self.train is not None else "no training pairs"
        products = products_and_images(self.catalog["product_id"].nunique(), len(self.catalog))
        return f"{self.name}: {products}, {n_queries} queries{rows}, {train}"

    def validate(self) -> "RetrievalSet":
        """Check the tables; return self so loaders can `return data.validate()`.

        Raises:
            ValueError: a missing column, an empty catalog, an empty or whitespace-padded id, a catalog row
                repeated (same product_id and image; several images of a product are fine), or queries whose
                product_id is not in the catalog (a query with no relevant product cannot be scored; see
                DESIGN.md, "mAP@k, stated once").
        """
        _require_columns(self.catalog, CATALOG_COLUMNS, f"{self.name}: catalog")
        _require_columns(self.queries, QUERY_COLUMNS, f"{self.name}: queries")
        if self.train is not None:
            _require_columns(self.train, TRAIN_COLUMNS, f"{self.name}: train")
        if self.catalog.empty:
            raise ValueError(f"{self.name}: the catalog is empty; there is nothing to index")
        for table, what in ((self.catalog, "catalog"), (self.queries, "queries")):
            for column in ID_COLUMNS:
                if column in table.columns:
                    _check_ids(table[column], f"{self.name}: {what}", lambda row: f"row {row}")
        repeated = self.catalog[self.catalog.duplicated(list(CATALOG_COLUMNS))]
        if not repeated.empty:
            examples = ", ".join(f"({p!r}, {i!r})" for p, i in zip(repeated["product_id"][:3], repeated["image"][:3]))
            raise ValueError(
                f"{self.name}: {len(repeated)} catalog rows repeat a (product_id, image) pair (e.g. {examples}); "
                "an image counts once per product: drop the repeated rows"
            )
        unknown = ~self.queries["product_id"].isin(self.catalog["product_id"])
        if unknown.any():
            missing = self.queries.loc[unknown, "product_id"].unique()
            examples = ", ".join(map(repr, missing[:5]))
            raise ValueError(
                f"{self.name}: {int(unknown.sum())} query rows name {len(missing)} products that are not in "
                f"the catalog (e.g. {examples}); every relevant product must be in the gallery"
            )
        return self


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {', '.join(map(repr, missing))}; found {list(map(str, table.columns))}, "
            f"need {list(columns)}"
        )


def _bad_id(value: object) -> Optional[str]:
    """What is wrong with an id, or None: ids are compared as text, so "a " and "a" would be two products."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "is missing"
    if not isinstance(value, str):
        return None  # ids built in code (ints...) are compared as str(id) later
    if value.strip() == "":
        return "is empty" if value == "" else f"is only whitespace ({value!r})"
    if value != value.strip():
        return f"{value!r} has leading or trailing whitespace"
    return None


def _check_ids(ids: pd.Series, what: str, where) -> None:
    """ValueError naming the first bad id of `ids` (empty, blank, padded); `where(position)` says where it is."""
    problems = [_bad_id(value) for value in ids]
    bad = [position for position, problem in enumerate(problems) if problem]
    if bad:
        first = bad[0]
        raise ValueError(
            f"{what}: {where(first)}: {ids.name} {problems[first]} ({len(bad)} such rows); give every row a "
            f"non-empty {ids.name} without surrounding spaces"
        )


def default_cache_dir() -> Path:
    """Where generated data and caches go: $STREET2SHOP_CACHE, else ~/.cache/street2shop."""
    configured = os.environ.get(CACHE_ENV_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "street2shop"


def run_in_threads(function: Callable[[object], None], items: Iterable, workers: Optional[int] = None) -> None:
    """Call `function` on every item in a thread pool (default min(8, CPUs) threads: numpy, OpenCV and the
    codecs release the GIL), for loaders that materialise derived images (street photos, crops).

    The first exception is raised; the items not started yet are dropped and the running ones finish
    (their atomic writes complete), so an interrupted run leaves only whole files to resume from.
    """
    pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(function, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


def subset_products(data: RetrievalSet, limit: Optional[int], seed: int = 0) -> RetrievalSet:
    """A seeded sample of `limit` catalog products and their queries (training pairs unchanged).

    For quick benchmarks of slow descriptors; the name says "[N products]" so a report cannot pass
    it off as the full split.
    """
    products = data.catalog.drop_duplicates("product_id")  # a product's images stay together
    if not limit or limit >= len(products):
        return data
    ids = set(products.sample(int(limit), random_state=seed)["product_id"].astype(str))
    keep = data.catalog[data.catalog["product_id"].astype(str).isin(ids)]
    queries = data.queries[data.queries["product_id"].astype(str).isin(ids)]
    return RetrievalSet(
        f"{data.name} [{len(ids)} products]",
        keep.reset_index(drop=True),
        queries.reset_index(drop=True),
        data.train,
        data.root,
    ).validate()


def query_bank_photos(spec: str, count: int, seed: int = 0, cache_dir: Optional[PathLike] = None) -> List[str]:
    """Photos of typical queries for query-bank normalisation (``index.bank_norm``): a seeded sample of at most
    `count` query photos (0: all of them) of the training split of data set `spec` (e.g. ``viton-street:ROOT``,
    whose training photos are street versions too), never of its validation split.

    Raises:
        ValueError: count < 0, or a set without training-split queries (say which to use instead).
    """
    if count < 0:
        raise ValueError(f"a query bank takes a number of photos >= 1, or 0 for all; got count={count}")
    data = load_dataset(spec, split="train", seed=seed, cache_dir=cache_dir)
    queries = data.queries.drop_duplicates("query_id")
    if queries.empty:
        raise ValueError(
            f"{spec} has no training-split query photos for a query bank: name a set with a training split "
            "(viton:ROOT, viton-street:ROOT, synthetic, ...)"
        )
    if 0 < count < len(queries):  # a seeded sample, kept in the set's order
        chosen = set(queries["query_id"].sample(n=count, random_state=seed))
        queries = queries[queries["query_id"].isin(chosen)]
    return [str(photo) for photo in queries["image"]]


# --------------------------------------------------------------------------------------------------
# The registry of dataset formats
# --------------------------------------------------------------------------------------------------

DatasetLoader = Callable[..., RetrievalSet]
"""``loader(argument, *, spec, split, seed, cache_dir) -> RetrievalSet``: ``argument`` is the text after
``FORMAT:`` (stripped, may be empty), ``spec`` the whole spec for error messages; ``split``, ``seed`` and
``cache_dir`` are `load_dataset`'s (a format ignores those it has no use for). It returns a validated set
(``return data.validate()``) and raises ValueError naming the spec and the form it expected for a bad
argument."""

DATASETS = Registry("dataset format")
_SPEC_FORMS: Dict[str, Sequence[str]] = {}


def register_dataset_format(name: str, *forms: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register the decorated loader for specs ``NAME:ARGUMENT``; ``forms`` are the spec forms it accepts,
    for help and error messages (e.g. ``"viton:ROOT"``).

    Example::

        @register_dataset_format("viton", "viton:ROOT")
        def viton_spec(argument, *, spec, split, seed, cache_dir):
            return load_viton(argument, split=split, seed=seed)

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        DATASETS.register(name)(loader)
        _SPEC_FORMS[name] = tuple(forms) or (f"{name}:ARGUMENT",)
        return loader

    return decorator


def list_dataset_formats() -> List[str]:
    """The FORMAT names `load_dataset` accepts, sorted (e.g. ['csv', 'synthetic', 'viton'])."""
    return DATASETS.names()


def dataset_spec_forms() -> List[str]:
    """Every spec form of the registered formats, by format name (e.g. 'csv:CATALOG.csv', 'synthetic:N')."""
    return [form for name in list_dataset_formats() for form in _SPEC_FORMS[name]]


def load_dataset(spec: str, split: str = "val", seed: int = 0, cache_dir: Optional[PathLike] = None) -> RetrievalSet:
    """Load a data set from a spec string ``FORMAT`` or ``FORMAT:ARGUMENT``.

    Args:
        spec: e.g. "synthetic", "synthetic:N", "viton:ROOT", "csv:CATALOG.csv" or "csv:CATALOG.csv,QUERIES.csv"
            (`dataset_spec_forms()` lists them all).
        split: "train", "val" or "all" for the VITON-layout sets (synthetic included); CSV sets carry
            their own queries and ignore it.
        seed: seed of the synthetic generation and of the train/validation split.
        cache_dir: where synthetic sets are generated; default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet.

    Raises:
        ValueError: unknown format (the message lists the registered formats and their forms) or a
            malformed argument (the format's loader says which form it expected).
    """
    scheme, _, argument = str(spec).partition(":")
    scheme = scheme.strip().lower()
    if scheme not in DATASETS:
        raise ValueError(
            f"unknown dataset spec {spec!r}; registered formats: {', '.join(list_dataset_formats())}; "
            f"valid forms: {', '.join(dataset_spec_forms())}"
        )
    loader = DATASETS.get(scheme)
    return loader(argument.strip(), spec=str(spec), split=split, seed=seed, cache_dir=cache_dir)
