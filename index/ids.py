"""Product ids of a ProductIndex: how string ids map to FAISS labels, their checks, and removal.

FAISS labels are int64; we keep the invariant that the label of a product is its position
in :attr:`ProductIndex.product_ids` (0 .. ntotal-1, no holes). Every preset adds sequential labels
natively, so no ``IndexIDMap`` is needed, and the manifest stores the ids as one list in label order.
Holes would break this, which decides how :meth:`ProductIndex.remove` works per index type
(:func:`remove_labels`):

- ``Flat``: ``remove_ids`` compacts the storage and shifts later labels down, keeping the order.
- ``IVF...,RFlat`` / ``IVF...,Refine(SQ8)``: IVF ``remove_ids`` leaves holes in the labels (inverted
  lists store explicit ids), and ``IndexRefine`` has no ``remove_ids``. We reconstruct the kept vectors
  from the re-rank copy, ``reset()`` (which keeps the trained coarse quantizer, PQ codebooks and SQ
  ranges) and re-add them. With ``RFlat`` that copy is exact; with ``SQ8`` it is the decoded 8-bit
  vectors, which encode back to the same SQ8 codes, so re-ranking is unchanged (only the PQ codes of
  the kept vectors are recomputed from the decoded vectors).
- ``HNSW``: faiss cannot remove nodes from an HNSW graph (``remove_ids`` raises), because unlinking a
  node would leave neighbours with broken or missing edges. We rebuild the graph from the exact vectors
  kept in its ``Flat`` storage, the same way.

All three cost O(ntotal) per call, so remove many ids in one call rather than one call per id.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

_MAX_NAMED = 5  # how many offending ids an error message lists


def remove_labels(cpu_index: Any, kind: str, doomed: np.ndarray) -> np.ndarray:
    """Remove the vectors with labels ``doomed`` from ``cpu_index`` (of kind ``"flat"``, ``"ivf"`` or
    ``"hnsw"``), leaving the kept ones at labels 0 .. n_kept-1 in their old order.

    Shape:
        - doomed: :math:`(R,)` int64, distinct labels.
        - Output: :math:`(N,)` bool, True for the labels kept (N the ntotal before the call).
    """
    keep = np.ones(cpu_index.ntotal, dtype=bool)
    keep[doomed] = False
    if kind == "flat":
        cpu_index.remove_ids(np.sort(doomed))
    else:
        kept_vectors = cpu_index.reconstruct_n(0, cpu_index.ntotal)[keep]
        cpu_index.reset()
        if len(kept_vectors):
            cpu_index.add(kept_vectors)
    return keep


def check_new_ids(product_ids: Sequence[str], n_rows: int, existing: Mapping[str, int]) -> None:
    """Raise unless ``product_ids`` are ``n_rows`` distinct strings, none of them already in ``existing``."""
    if isinstance(product_ids, str):
        raise TypeError("product_ids must be a sequence of strings, not one string")
    if len(product_ids) != n_rows:
        raise ValueError(f"got {n_rows} vectors but {len(product_ids)} product ids")
    not_str = [pid for pid in product_ids if not isinstance(pid, str)]
    if not_str:
        raise TypeError(f"product ids must be str, got e.g. {not_str[0]!r} ({type(not_str[0]).__name__})")
    repeated = [pid for pid, count in Counter(product_ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} product ids occur more than once: {name_some(repeated)}")
    clashing = [pid for pid in product_ids if pid in existing]
    if clashing:
        raise ValueError(f"{len(clashing)} product ids are already in the index: {name_some(clashing)}")


def name_some(ids: Sequence[str]) -> str:
    named = ", ".join(repr(pid) for pid in list(ids)[:_MAX_NAMED])
    return named + (", ..." if len(ids) > _MAX_NAMED else "")
