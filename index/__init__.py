"""FAISS indexes of product vectors for street2shop: presets, GPU/CPU placement, string ids, persistence.

This package imports nothing from the rest of street2shop: numpy arrays in, product ids and scores out.

Example::

    from index import ProductIndex, check_index_destination

    check_index_destination("runs/catalog-index")  # refuses a bad destination before minutes of work
    catalog = ProductIndex.build(vectors, product_ids, preset="ivfpq", metadata={"descriptor": "gem"})
    scores, ids = catalog.search(queries, k=10)   # (Q, 10) float32, (Q, 10) str
    catalog.save("runs/catalog-index")            # a new checksummed version, swapped in atomically
    catalog = ProductIndex.load("runs/catalog-index")
"""

from .device import resolve_faiss_device
from .errors import IndexCorruptError, IndexLockedError, IndexMismatchError
from .layout import KNOWN_ATTACHMENTS
from .presets import describe_index_preset, index_factory_string, list_index_presets
from .product_index import ProductIndex
from .storage import check_index_destination, object_path, read_object, store_object

PACKAGE_ID = "street2shop.index"
"""Lets tests prove that `import index` found this package and not another top-level `index`."""

__all__ = [
    "ProductIndex",
    "IndexMismatchError",
    "IndexCorruptError",
    "IndexLockedError",
    "KNOWN_ATTACHMENTS",
    "check_index_destination",
    "store_object",
    "read_object",
    "object_path",
    "list_index_presets",
    "index_factory_string",
    "describe_index_preset",
    "resolve_faiss_device",
]
