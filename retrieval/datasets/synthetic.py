"""The embedded synthetic set: ``synthetic`` or ``synthetic:N`` (N products, default 120), generated once into
the cache directory by `retrieval.synthetic` and read back as a VITON-layout root."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from retrieval.datasets.base import PathLike, RetrievalSet, default_cache_dir, logger, register_dataset_format
from retrieval.datasets.layout import expected_layout
from retrieval.datasets.viton import load_viton

DEFAULT_SYNTHETIC_PRODUCTS = 120
expected_layout("synthetic", "(nothing to provide: N products are generated into the cache, in the viton layout)")


@register_dataset_format("synthetic", "synthetic", "synthetic:N")
def synthetic_spec(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
    """``synthetic[:N]``: the synthetic set of N products and this seed, generated into ``cache_dir`` (default
    `default_cache_dir()`) unless already complete there."""
    # Imported here: the generator pulls in cv2 drawing code that VITON/CSV users never need.
    from retrieval.synthetic import SYNTHETIC_MARKER, make_synthetic_dataset

    try:
        n_products = int(argument) if argument else DEFAULT_SYNTHETIC_PRODUCTS
    except ValueError:
        n_products = -1
    if n_products <= 0:
        raise ValueError(f"bad dataset spec {spec!r}: N in 'synthetic:N' must be a positive integer")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"synthetic-{n_products}-seed{seed}"
    if not (target / SYNTHETIC_MARKER).is_file():
        logger.info("generating the synthetic set (%d products, seed %d) into %s", n_products, seed, target)
    # Returns at once when the marker (written last) says the set is complete.
    make_synthetic_dataset(target, n_products=n_products, seed=seed)
    return load_viton(target, split=split, seed=seed)
