"""Retrieval data sets: a catalog, queries with their ground truth, and optional training pairs.

Every loader returns a `RetrievalSet` of plain pandas tables holding absolute image paths; images are
read later, by `retrieval.io.read_image`, by whoever needs the pixels.

Specs understood by `load_dataset`, one module of this package per format (`list_dataset_formats()`):

- ``synthetic`` or ``synthetic:N`` (``synthetic.py``): the embedded synthetic set (N products, default
  120), generated once into the cache directory.
- ``viton:ROOT`` (``viton.py``): a VITON-layout root (``../shared/data/viton``, a full VITON download, or
  a synthetic root).
- ``viton-street:ROOT`` (``viton_street.py``): the same set with street-condition query photos (people
  composited onto procedural clutter, scaled, cropped, re-lit, blurred, JPEG), generated once into the
  cache directory.
- ``csv:CATALOG.csv`` or ``csv:CATALOG.csv,QUERIES.csv`` (``csv.py``): plain tables.
- ``deepfashion2:ROOT`` (``deepfashion2.py``), ``deepfashion-c2s:ROOT`` (``deepfashion_c2s.py``),
  ``street2shop:ROOT[,CATEGORY]`` (``street2shop.py``), ``lookbook:ROOT`` (``lookbook.py``): published shop
  sets in their own layouts, garments cropped by their boxes into the cache (``crops.py``); one shop image
  per product (multi-image products are not scored yet). ``layout.py`` holds what they share, and
  ``EXPECTED_LAYOUTS`` every format's expected tree (``street2shop datasets`` prints them).

A new format is one module with one loader decorated by `register_dataset_format`, imported below.

Example:
    >>> from retrieval.datasets import load_dataset
    >>> data = load_dataset("synthetic:60", split="val")  # doctest: +SKIP
    >>> print(data.describe())  # doctest: +SKIP
    viton:/home/me/.cache/street2shop/synthetic-60-seed0 [val]: 20 products, 20 queries, 40 training pairs
"""

from retrieval.datasets.base import (
    CACHE_ENV_VARIABLE,
    CATALOG_COLUMNS,
    DATASETS,
    ID_COLUMNS,
    QUERY_COLUMNS,
    TRAIN_COLUMNS,
    PathLike,
    RetrievalSet,
    dataset_spec_forms,
    default_cache_dir,
    list_dataset_formats,
    load_dataset,
    query_bank_photos,
    register_dataset_format,
    subset_products,
)

# The built-in formats: each module registers its loader when imported.
from retrieval.datasets.crops import crop_images
from retrieval.datasets.csv import load_csv
from retrieval.datasets.deepfashion2 import load_deepfashion2
from retrieval.datasets.deepfashion_c2s import load_deepfashion_c2s
from retrieval.datasets.layout import EXPECTED_LAYOUTS
from retrieval.datasets.lookbook import load_lookbook
from retrieval.datasets.street2shop import STREET2SHOP_CATEGORIES, load_street2shop
from retrieval.datasets.synthetic import DEFAULT_SYNTHETIC_PRODUCTS
from retrieval.datasets.viton import VITON_HALVES, VITON_SPLITS, load_viton
from retrieval.datasets.viton_street import load_viton_street

DATASET_SPEC_FORMS = tuple(dataset_spec_forms())
"""The spec forms of the built-in formats (`dataset_spec_forms()` also lists formats registered later)."""

__all__ = [
    "CACHE_ENV_VARIABLE",
    "CATALOG_COLUMNS",
    "DATASETS",
    "DATASET_SPEC_FORMS",
    "DEFAULT_SYNTHETIC_PRODUCTS",
    "EXPECTED_LAYOUTS",
    "ID_COLUMNS",
    "QUERY_COLUMNS",
    "TRAIN_COLUMNS",
    "STREET2SHOP_CATEGORIES",
    "VITON_HALVES",
    "VITON_SPLITS",
    "PathLike",
    "RetrievalSet",
    "dataset_spec_forms",
    "crop_images",
    "default_cache_dir",
    "list_dataset_formats",
    "load_csv",
    "load_dataset",
    "load_lookbook",
    "load_deepfashion2",
    "load_deepfashion_c2s",
    "load_street2shop",
    "load_viton",
    "load_viton_street",
    "query_bank_photos",
    "register_dataset_format",
    "subset_products",
]
