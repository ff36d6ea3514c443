"""Input checks shared by the index and its tuner: every matrix that enters FAISS passes through here."""

from __future__ import annotations

import numpy as np


def as_matrix(array: np.ndarray, name: str, allow_empty: bool = False) -> np.ndarray:
    """A private, contiguous float32 copy of ``array`` with L2-normalised rows (all-zero rows stay zero).

    Shape:
        - array: :math:`(N, D)`, any real dtype.
        - Output: :math:`(N, D)` float32.

    Raises:
        ValueError: not 2-D, no rows (unless ``allow_empty``) or no columns, not real numbers, NaN/inf
            (naming ``name`` and the first bad row).
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {array.shape}")
    if array.shape[0] == 0 and not allow_empty:
        raise ValueError(f"empty catalog: {name} has no rows")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    # A private, contiguous float32 copy: normalising must never write into the caller's array.
    matrix = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(matrix).all():
        bad_rows = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        raise ValueError(f"{name} contain NaN or inf in {len(bad_rows)} rows, e.g. row {bad_rows[0]}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix /= np.maximum(norms, 1e-12)
    return matrix


def check_k(k: object) -> int:
    """``k`` (results per query) as an int, refused unless a positive whole number (a bool is not one)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)
