"""Retrieval data sets (see `retrieval.datasets.base`); the formats split into one module each next."""

from retrieval.datasets.base import (
    CACHE_ENV_VARIABLE,
    CATALOG_COLUMNS,
    DATASET_SPEC_FORMS,
    DEFAULT_SYNTHETIC_PRODUCTS,
    ID_COLUMNS,
    QUERY_COLUMNS,
    TRAIN_COLUMNS,
    VITON_HALVES,
    VITON_SPLITS,
    PathLike,
    RetrievalSet,
    default_cache_dir,
    load_csv,
    load_dataset,
    load_viton,
    subset_products,
)

__all__ = [
    "CACHE_ENV_VARIABLE",
    "CATALOG_COLUMNS",
    "DATASET_SPEC_FORMS",
    "DEFAULT_SYNTHETIC_PRODUCTS",
    "ID_COLUMNS",
    "QUERY_COLUMNS",
    "TRAIN_COLUMNS",
    "VITON_HALVES",
    "VITON_SPLITS",
    "PathLike",
    "RetrievalSet",
    "default_cache_dir",
    "load_csv",
    "load_dataset",
    "load_viton",
    "subset_products",
]
