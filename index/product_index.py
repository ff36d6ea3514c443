"""ProductIndex: a FAISS index of product vectors addressed by string product ids.

Id mapping. FAISS labels are int64; we keep the invariant that the label of a product is its position
in :attr:`ProductIndex.product_ids` (0 .. ntotal-1, no holes). Every preset adds sequential labels
natively, so no ``IndexIDMap`` is needed, and the manifest stores the ids as one list in label order.
Holes would break this, which decides how :meth:`ProductIndex.remove` works per index type:

- ``Flat``: ``remove_ids`` compacts the storage and shifts later labels down, keeping the order.
- ``IVF...,RFlat``: IVF ``remove_ids`` leaves holes in the labels (inverted lists store explicit ids),
  and ``IndexRefine`` has no ``remove_ids``. We reconstruct the kept vectors from the exact ``RFlat``
  copy, ``reset()`` (which keeps the trained coarse quantizer and PQ codebooks) and re-add them.
- ``HNSW``: faiss cannot remove nodes from an HNSW graph (``remove_ids`` raises), because unlinking a
  node would leave neighbours with broken or missing edges. We rebuild the graph from the exact vectors
  kept in its ``Flat`` storage, the same way.

All three cost O(ntotal) per call, so remove many ids in one call rather than one call per id.

Scores are inner products of L2-normalised vectors (cosine similarity): vectors are normalised on the
way in, so a descriptor that forgot to normalise still gets cosine scores. All-zero vectors stay zero.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import faiss
import numpy as np

from .device import clone_to_gpu, log_once, resolve_faiss_device
from .errors import IndexMismatchError
from .presets import DEFAULT_EF_SEARCH, DEFAULT_REFINE_K_FACTOR, MIN_REFINE_CANDIDATES, plan_index
from .storage import FORMAT_VERSION, read_index_dir, write_index_dir

LOGGER = logging.getLogger("street2shop.index")

_MAX_NAMED = 5  # how many offending ids an error message lists
_DEFAULT_COMPAT_KEYS = ("descriptor", "fingerprint", "dim")


class ProductIndex:
    """Nearest-product search over L2-normalised vectors, with string ids, persistence and GPU placement.

    Build one with :meth:`build` or :meth:`load`, not with the constructor. Concurrent searches are
    safe (FAISS search only reads); mutating (:meth:`add`, :meth:`remove`) while another thread searches
    is not.

    Placement: the CPU index is always the source of truth (it is what :meth:`save` writes). On a GPU,
    searches run on a copy made from it on first search and after every add/remove.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> vectors = rng.standard_normal((100, 16)).astype(np.float32)
        >>> index = ProductIndex.build(vectors, [f"p{i}" for i in range(100)], preset="flat")
        >>> scores, ids = index.search(vectors[:2], k=3)
        >>> ids[:, 0].tolist()
        ['p0', 'p1']
    """

    def __init__(
        self,
        cpu_index: Any,
        product_ids: Sequence[str],
        preset: str,
        factory_string: str,
        search_params: Mapping[str, int],
        metadata: Optional[Mapping[str, Any]],
        device: str,
        directory: Optional[Path] = None,
    ):
        self._cpu_index = _downcast_owned(cpu_index)
        self._ids = np.array(list(product_ids), dtype=object)
        self._positions = {pid: position for position, pid in enumerate(self._ids)}
        self._preset = preset
        self._factory_string = factory_string
        self._search_params = dict(search_params)
        self._metadata = dict(metadata or {})
        self._directory = directory
        self._kind = _index_kind(self._cpu_index)
        self._device = _placement(self._kind, device)
        self._apply_search_params(self._cpu_index)
        # GPU copy used for searching; dropped on every add/remove and re-cloned on the next search.
        self._gpu_index: Optional[Any] = None
        self._gpu_parts: List[Any] = []

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        product_ids: Sequence[str],
        preset: str = "flat",
        metadata: Optional[Mapping[str, Any]] = None,
        device: str = "auto",
    ) -> "ProductIndex":
        """Build an index of ``preset`` over a catalog, training it on ``vectors`` when it needs it.

        Args:
            vectors: product descriptors, one row per product.
            product_ids: one unique string per row.
            preset: one of ``list_index_presets()``; ``ivfpq`` on too few vectors falls back to a smaller
                nlist or to ``Flat`` with a logged warning.
            metadata: opaque JSON-able dict stored in the manifest (descriptor name, config, fingerprint).
            device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see ``resolve_faiss_device``).

        Shape:
            - vectors: :math:`(N, D)`, float32 (other float dtypes are converted).

        Raises:
            ValueError: empty catalog, wrong shapes, NaN/inf values, duplicate ids, unknown preset.
            TypeError: metadata is not JSON-able or ids are not strings.
        """
        vectors = _as_matrix(vectors, "vectors")
        _check_new_ids(product_ids, len(vectors), existing={})
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metadata must be JSON-able, it is stored in the manifest: {error}") from None
        dim = vectors.shape[1]
        plan = plan_index(preset, dim, len(vectors))
        if plan.fallback_reason:
            LOGGER.warning(plan.fallback_reason)
        cpu_index = faiss.index_factory(dim, plan.factory_string, faiss.METRIC_INNER_PRODUCT)
        if not cpu_index.is_trained:
            cpu_index.train(vectors)
        cpu_index.add(vectors)
        return cls(cpu_index, product_ids, preset, plan.factory_string, plan.search_params, metadata, device)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> "ProductIndex":
        """Load an index written by :meth:`save`, verifying its checksum and manifest.

        Raises:
            FileNotFoundError: no saved index at ``directory``.
            IndexCorruptError: checksum mismatch or manifest inconsistent with the index file.
            ValueError: the index was saved by a newer format version.
        """
        directory = Path(directory)
        cpu_index, manifest = read_index_dir(directory)
        return cls(
            cpu_index,
            manifest["product_ids"],
            preset=manifest.get("preset", "custom"),
            factory_string=manifest["factory_string"],
            search_params=manifest.get("search_params", {}),
            metadata=manifest.get("metadata", {}),
            device=device,
            directory=directory,
        )

    # ----------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Vector dimension D."""
        return int(self._cpu_index.d)

    @property
    def ntotal(self) -> int:
        """Number of products in the index."""
        return int(self._cpu_index.ntotal)

    @property
    def product_ids(self) -> List[str]:
        """Product ids in internal order (position i is FAISS label i)."""
        return self._ids.tolist()

    @property
    def preset(self) -> str:
        """The preset asked for at build time (the factory string may be its fallback)."""
        return self._preset

    @property
    def factory_string(self) -> str:
        """The FAISS factory string actually built."""
        return self._factory_string

    @property
    def metadata(self) -> Dict[str, Any]:
        """A copy of the caller's metadata stored in the manifest."""
        return json.loads(json.dumps(self._metadata))

    @property
    def search_params(self) -> Dict[str, int]:
        """Search-time parameters (``nprobe``, ``k_factor``, ``efSearch``) for this index type."""
        return dict(self._search_params)

    @property
    def device(self) -> str:
        """Where searches run: ``"cpu"`` or ``"cuda"``."""
        return self._device

    @property
    def directory(self) -> Optional[Path]:
        """The directory this index was loaded from or last saved to, if any."""
        return self._directory

    def __len__(self) -> int:
        return self.ntotal

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._positions

    def __repr__(self) -> str:
        return (
            f"ProductIndex(preset={self._preset!r}, factory_string={self._factory_string!r}, "
            f"dim={self.dim}, ntotal={self.ntotal}, device={self._device!r})"
        )

    # ----------------------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, product_ids: Sequence[str]) -> None:
        """Add products; trained structures (IVF centroids, PQ codebooks) are reused, not retrained.

        Shape:
            - vectors: :math:`(N, D)` with D equal to :attr:`dim`.

        Raises:
            ValueError: empty input, wrong dim (naming both), NaN/inf, ids duplicated within the call or
                already in the index (naming some of them).
        """
        vectors = _as_matrix(vectors, "vectors")
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dim {vectors.shape[1]} but the index holds dim {self.dim}")
        _check_new_ids(product_ids, len(vectors), existing=self._positions)
        self._cpu_index.add(vectors)
        start = len(self._ids)
        self._ids = np.concatenate([self._ids, np.array(list(product_ids), dtype=object)])
        for offset, pid in enumerate(product_ids):
            self._positions[pid] = start + offset
        self._drop_gpu_copy()

    def remove(self, product_ids: Sequence[str]) -> None:
        """Remove products by id (see the module docstring for how each index type does it).

        Raises:
            KeyError: some ids are not in the index (naming them); nothing is removed then.
        """
        if isinstance(product_ids, str):
            product_ids = [product_ids]
        unknown = [pid for pid in product_ids if pid not in self._positions]
        if unknown:
            raise KeyError(f"{len(unknown)} product ids are not in the index: {_name_some(unknown)}")
        if len(product_ids) == 0:
            return
        doomed = np.fromiter((self._positions[pid] for pid in set(product_ids)), dtype=np.int64)
        keep = np.ones(self.ntotal, dtype=bool)
        keep[doomed] = False
        if self._kind == "flat":
            self._cpu_index.remove_ids(np.sort(doomed))
        else:
            kept_vectors = self._cpu_index.reconstruct_n(0, self.ntotal)[keep]
            self._cpu_index.reset()
            if len(kept_vectors):
                self._cpu_index.add(kept_vectors)
        self._ids = self._ids[keep]
        self._positions = {pid: position for position, pid in enumerate(self._ids)}
        self._drop_gpu_copy()

    # ----------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """The k most similar products for each query, best first, in one batched FAISS call.

        ``k`` is clamped to :attr:`ntotal`, so the result has ``min(k, ntotal)`` columns. Approximate
        indexes may still find fewer than that for some queries: those slots hold id ``None`` and score
        ``-inf`` (a FAISS label of -1 never maps to a real product).

        Args:
            queries: query descriptors, one per row.
            k: number of results wanted per query, >= 1.

        Shape:
            - queries: :math:`(Q, D)` float32.
            - Output: ``scores`` :math:`(Q, K)` float32 and ``ids`` :math:`(Q, K)` object array of str,
              with :math:`K = \\min(k, ntotal)`.

        Raises:
            ValueError: empty index, k < 1, queries not 2-D or with NaN/inf.
            IndexMismatchError: the query dim differs from the index dim.
        """
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index: add products first")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = _as_matrix(queries, "queries", allow_empty=True)
        if queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"queries have dim {queries.shape[1]} but the index{self._where()} was built with dim "
                f"{self.dim}: query with the descriptor the index was built with, or rebuild it"
            )
        k = min(int(k), self.ntotal)
        index, params = self._search_index(k)
        if params is None:
            scores, labels = index.search(queries, k)
        else:
            scores, labels = index.search(queries, k, params=params)
        found = labels >= 0
        ids = np.full(labels.shape, None, dtype=object)
        ids[found] = self._ids[labels[found]]
        scores = np.where(found, scores, -np.inf).astype(np.float32, copy=False)
        return scores, ids

    def check_compatible(
        self, expected: Mapping[str, Any], keys: Sequence[str] = _DEFAULT_COMPAT_KEYS
    ) -> None:
        """Raise if this index was built for other vectors than the caller is about to query with.

        Each key of ``keys`` present in ``expected`` must equal the index's metadata value (``dim`` is
        also compared against the real index dim). A key missing from the index metadata counts as a
        mismatch: we cannot vouch for what we were never told.

        Raises:
            IndexMismatchError: message names both sides and how to fix it, e.g. "index at runs/idx was
                built with descriptor 'gem' (fingerprint abc, dim 1280) but the query uses 'sift'
                (fingerprint def, dim 4096): rebuild the index with `street2shop index --descriptor
                sift` or query with --descriptor gem".
        """
        built = dict(self._metadata)
        built.setdefault("dim", self.dim)
        compared = [key for key in keys if key in expected]
        differing = [key for key in compared if built.get(key) != expected[key]]
        if "dim" in expected and expected["dim"] != self.dim and "dim" not in differing:
            differing.append("dim")
        if not differing:
            return
        ours = _describe_side(built, compared)
        theirs = _describe_side(expected, compared)
        wanted, have = expected.get("descriptor"), built.get("descriptor")
        if wanted is None:
            fix = "rebuild the index with `street2shop index` from the vectors you query with"
        elif wanted == have:
            fix = (
                f"descriptor {wanted!r} changed since the index was built (differs in "
                f"{', '.join(differing)}): rebuild the index with `street2shop index --descriptor {wanted}`"
            )
        else:
            fix = f"rebuild the index with `street2shop index --descriptor {wanted}`"
            if have is not None:
                fix += f" or query with --descriptor {have}"
        raise IndexMismatchError(f"index{self._where()} was built with {ours} but the query uses {theirs}: {fix}")

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path, attachments: Optional[Mapping[str, bytes]] = None) -> Path:
        """Write ``index.faiss`` (always a CPU index) and ``manifest.json`` to ``directory`` atomically.

        ``attachments`` (file name -> bytes) are written in the same atomic step and checksummed.

        Returns:
            The directory written.

        Raises:
            FileExistsError: ``directory`` exists and holds files other than a saved index.
        """
        directory = Path(directory)
        manifest = {
            "format_version": FORMAT_VERSION,
            "preset": self._preset,
            "factory_string": self._factory_string,
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": self.ntotal,
            "search_params": self._search_params,
            "faiss_version": faiss.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metadata": self._metadata,
            "product_ids": self.product_ids,
        }
        # The source of truth is already the CPU index; a GPU copy, if any, is only a search replica.
        write_index_dir(directory, self._cpu_index, manifest, attachments)
        self._directory = directory
        return directory

    # ----------------------------------------------------------------------------- internals
    def _where(self) -> str:
        return f" at {self._directory}" if self._directory is not None else ""

    def _apply_search_params(self, index: Any) -> None:
        if self._kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(self._search_params.get("nprobe", 8))
            index.k_factor = float(self._search_params.get("k_factor", DEFAULT_REFINE_K_FACTOR))

    def _search_index(self, k: int) -> Tuple[Any, Optional[Any]]:
        if self._kind == "hnsw":
            ef_search = max(int(self._search_params.get("efSearch", DEFAULT_EF_SEARCH)), 2 * k)
            return self._cpu_index, faiss.SearchParametersHNSW(efSearch=ef_search)
        index = self._gpu_copy() if self._device == "cuda" else self._cpu_index
        if self._kind == "ivf":
            k_factor = float(self._search_params.get("k_factor", DEFAULT_REFINE_K_FACTOR))
            k_factor = max(k_factor, float(-(-MIN_REFINE_CANDIDATES // k)))
            # No base_index_params: the IVF part uses the nprobe set on it (CPU or GPU copy).
            return index, faiss.IndexRefineSearchParameters(k_factor=k_factor)
        return index, None

    def _gpu_copy(self) -> Any:
        if self._gpu_index is None:
            if self._kind == "flat":
                self._gpu_index = clone_to_gpu(self._cpu_index)
                self._gpu_parts = [self._gpu_index]
            else:
                # faiss has no GPU IndexRefine: the IVFPQ part goes to the GPU and the exact re-ranking
                # stays on the CPU vectors, which the wrapper only references (we keep them alive).
                base_gpu = clone_to_gpu(faiss.downcast_index(self._cpu_index.base_index))
                faiss.GpuParameterSpace().set_index_parameter(
                    base_gpu, "nprobe", int(self._search_params.get("nprobe", 8))
                )
                refine = faiss.IndexRefine(base_gpu, self._cpu_index.refine_index)
                refine.k_factor = float(self._search_params.get("k_factor", DEFAULT_REFINE_K_FACTOR))
                self._gpu_index = refine
                self._gpu_parts = [base_gpu, refine]
        return self._gpu_index

    def _drop_gpu_copy(self) -> None:
        self._gpu_index = None
        self._gpu_parts = []


def _downcast_owned(index: Any) -> Any:
    """The concrete faiss class of ``index`` (e.g. IndexHNSWFlat), taking over ownership of the C++ object.

    ``faiss.downcast_index`` returns a second, non-owning wrapper: if the caller's owning wrapper were
    garbage-collected, the index would be freed under us. Ownership moves to the typed wrapper.
    """
    typed = faiss.downcast_index(index)
    if typed is not index and getattr(index, "thisown", False):
        index.thisown = False
        typed.thisown = True
    return typed


def _index_kind(cpu_index: Any) -> str:
    if isinstance(cpu_index, faiss.IndexFlat):
        return "flat"
    if isinstance(cpu_index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(cpu_index, faiss.IndexRefine) and isinstance(
        faiss.downcast_index(cpu_index.base_index), faiss.IndexIVF
    ):
        return "ivf"
    raise ValueError(
        f"unsupported index type {type(cpu_index).__name__}: ProductIndex handles Flat, "
        "IVF...,RFlat and HNSW...,Flat (the presets)"
    )


def _placement(kind: str, device: str) -> str:
    resolved = resolve_faiss_device(device)
    if resolved == "cuda" and kind == "hnsw":
        log_once(logging.INFO, "faiss: HNSW has no GPU version, HNSW indexes search on the CPU")
        return "cpu"
    if resolved == "cuda":
        log_once(logging.INFO, f"faiss: {kind} indexes search on the GPU ({faiss.get_num_gpus()} visible)")
    else:
        log_once(logging.INFO, "faiss: searching on the CPU")
    return resolved


def _as_matrix(array: np.ndarray, name: str, allow_empty: bool = False) -> np.ndarray:
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


def _check_new_ids(product_ids: Sequence[str], n_rows: int, existing: Mapping[str, int]) -> None:
    if isinstance(product_ids, str):
        raise TypeError("product_ids must be a sequence of strings, not one string")
    if len(product_ids) != n_rows:
        raise ValueError(f"got {n_rows} vectors but {len(product_ids)} product ids")
    not_str = [pid for pid in product_ids if not isinstance(pid, str)]
    if not_str:
        raise TypeError(f"product ids must be str, got e.g. {not_str[0]!r} ({type(not_str[0]).__name__})")
    repeated = [pid for pid, count in Counter(product_ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} product ids occur more than once: {_name_some(repeated)}")
    clashing = [pid for pid in product_ids if pid in existing]
    if clashing:
        raise ValueError(f"{len(clashing)} product ids are already in the index: {_name_some(clashing)}")


def _name_some(ids: Sequence[str]) -> str:
    named = ", ".join(repr(pid) for pid in list(ids)[:_MAX_NAMED])
    return named + (", ..." if len(ids) > _MAX_NAMED else "")


def _describe_side(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'descriptor 'gem' (fingerprint abc, dim 1280)' from the compared keys."""
    if "descriptor" in keys:
        head = f"descriptor {values.get('descriptor')!r}"
        rest = [key for key in keys if key != "descriptor"]
    else:
        head, rest = "vectors", list(keys)
    details = ", ".join(f"{key} {values.get(key, 'unknown')}" for key in rest)
    return f"{head} ({details})" if details else head
