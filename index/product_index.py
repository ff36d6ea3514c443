"""ProductIndex: a FAISS index of product vectors addressed by string product ids.

Product ids map to FAISS labels by position (``index.ids`` says how, and how each index type removes).

Scores are inner products of L2-normalised vectors (cosine similarity): vectors are normalised on the
way in, so a descriptor that forgot to normalise still gets cosine scores. All-zero vectors stay zero.
(The ``ivfpq`` preset returns the inner products of the SQ8-decoded vectors: within ~1e-3 of exact.)

Search parameters tune themselves. :meth:`ProductIndex.build` calls :meth:`ProductIndex.tune` for the
approximate presets, the way autofaiss does: on a sample of queries it measures recall@k against exact
search for a sweep of ``nprobe`` x re-rank depth (IVF) or ``efSearch`` (HNSW), and keeps the fastest
setting whose recall reaches the target (the measuring is ``index.tuning``; this class applies its report).
The result lives in :attr:`ProductIndex.search_params` and the manifest, so a loaded index searches with it
without tuning again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .arrays import as_matrix, check_k
from .attachments import attachment_path, read_attachment
from .bank_norm import DEFAULT_BANK_BETA, bank_offsets, offset_topk
from .device import SearchPlacement
from .errors import IndexMismatchError
from .faiss_index import downcast_owned, index_kind, reconstruct_all, serialized_index_size, trained_index
from .ids import check_new_ids, name_some, remove_labels
from .manifest import index_manifest, jsonable_metadata
from .mismatch import DEFAULT_COMPAT_KEYS, check_index_matches
from .ondisk import ONDISK_LAYOUT, ondisk_bytes
from .presets import DEFAULT_TARGET_RECALL, plan_index
from .shards import MERGED, add_vectors, check_sharded_build, fill_sharded, refuse_change
from .storage import DEFAULT_LOCK_TIMEOUT_S, check_index_destination, load_index_dir, write_index_dir
from .tuning import (
    DEFAULT_TUNING_QUERIES,
    apply_search_params,
    check_search_params,
    check_target_recall,
    check_tuning_queries,
    check_tuning_vectors,
    log_tuning,
    search_time_params,
    tune_search_params,
)

LOGGER = logging.getLogger("street2shop.index")


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
        tuning: Optional[Mapping[str, Any]] = None,
        version_dir: Optional[Path] = None,
        attachment_checksums: Optional[Mapping[str, str]] = None,
        layout: Optional[Mapping[str, Any]] = None,
    ):
        self._cpu_index = downcast_owned(cpu_index)
        self._ids = np.array(list(product_ids), dtype=object)
        self._positions = {pid: position for position, pid in enumerate(self._ids)}
        self._preset = preset
        self._factory_string = factory_string
        self._search_params = dict(search_params)
        self._metadata = dict(metadata or {})
        self._directory = directory
        # The version folder this index was loaded from and its attachments' sha256 (see attachment_path).
        self._version_dir = version_dir
        self._attachment_checksums = dict(attachment_checksums or {})
        self._kind = index_kind(self._cpu_index)
        # How the index is kept: {"kind": "single"} (one index file, all in memory), the on-disk layout of
        # shards merged into memory-mapped files (index.ondisk, read-only) or separate shards (index.shards).
        self._layout = dict(layout or {"kind": "single"})
        self._tuning = dict(tuning) if tuning else None
        self._build_timings: Optional[Dict[str, float]] = None
        self._apply_search_params(self._cpu_index)
        # Where searches run; its GPU copy is dropped on every add/remove/tune and re-cloned on the next search.
        self._placement = SearchPlacement(self._cpu_index, self._kind, device)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        product_ids: Sequence[str],
        preset: str = "flat",
        metadata: Optional[Mapping[str, Any]] = None,
        device: str = "auto",
        target_recall: Optional[float] = DEFAULT_TARGET_RECALL,
        tune_queries: Optional[np.ndarray] = None,
        seed: int = 0,
        shards: Optional[int] = None,
        work_dir: Optional[str | os.PathLike] = None,
        shard_layout: str = MERGED,
    ) -> "ProductIndex":
        """Build an index of ``preset`` over a catalog, training it on ``vectors`` when it needs it.

        Approximate presets then tune their search parameters for ``target_recall`` (see :meth:`tune`).

        Args:
            vectors: product descriptors, one row per product.
            product_ids: one unique string per row.
            preset: one of ``list_index_presets()``; the IVF presets on too few vectors fall back to a
                smaller nlist or to ``Flat`` with a logged warning.
            metadata: opaque JSON-able dict stored in the manifest (descriptor name, config, fingerprint).
            device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see ``resolve_faiss_device``).
            target_recall: recall@10 against exact search that the search parameters are tuned for;
                None keeps the preset's fixed starting values (no tuning).
            tune_queries: sample queries to tune on (e.g. descriptors of real street photos); None
                tunes on perturbed catalog vectors (see :meth:`tune`).
            seed: seeds the training subsample and the tuning sample.
            shards: None builds one in-memory index. A number N builds it the sharded way
                (``index.ondisk``): the IVF trained once, N shards filled in parallel with it, their lists
                merged into one memory-mapped file; the result searches exactly like the in-memory index of
                the same preset and seed, keeps its lists and re-rank vectors on disk, and is read-only
                (no :meth:`add` / :meth:`remove`). Needs an IVF preset without fast-scan: ``ivfpq-rflat``.
            work_dir: where a sharded build writes its shards and merged lists (a new folder inside it,
                removed with this object; a save hard-links the lists when on the same file system);
                None: the system's temporary folder.
            shard_layout: with ``shards``, ``"merged"`` (above) or ``"separate"``: N shards of any preset kept
                apart, one file each, searched together by ``faiss.IndexShards`` (``index.shards``; on one
                GPU each where there are several); :meth:`add` goes to the last shard, :meth:`remove` is refused.

        Shape:
            - vectors: :math:`(N, D)`, float32 (other float dtypes are converted).
            - tune_queries: :math:`(Q, D)`.

        Raises:
            ValueError: empty catalog, wrong shapes, NaN/inf values, duplicate ids, unknown preset,
                target_recall outside (0, 1], shards for a preset (or a catalog too small) that cannot be
                sharded.
            TypeError: metadata is not JSON-able or ids are not strings.
        """
        vectors = as_matrix(vectors, "vectors")
        check_new_ids(product_ids, len(vectors), existing={})
        metadata = jsonable_metadata(metadata)
        dim = vectors.shape[1]
        plan = plan_index(preset, dim, len(vectors))
        if shards is not None:  # refused before minutes of training
            check_sharded_build(plan, len(vectors), dim, shards, preset, shard_layout)
        if plan.fallback_reason:
            LOGGER.warning(plan.fallback_reason)
        if target_recall is not None:
            check_target_recall(target_recall)
            tune_queries = check_tuning_queries(tune_queries, dim)  # refused before minutes of training
        started = time.perf_counter()
        cpu_index = trained_index(plan.factory_string, vectors, plan.train_size, seed)
        trained = time.perf_counter()
        layout, staging, shard_timings = None, None, {}
        if shards is None:
            cpu_index.add(vectors)
        else:
            cpu_index, layout, staging, shard_timings = fill_sharded(
                cpu_index, vectors, int(shards), shard_layout, work_dir
            )
        built = cls(
            cpu_index, product_ids, preset, plan.factory_string, plan.search_params, metadata, device, layout=layout
        )
        if staging is not None:
            # The merged lists stay mapped from the staging folder until this index is gone.
            weakref.finalize(built, shutil.rmtree, str(staging), True)
        added = time.perf_counter()
        if target_recall is not None and plan.sweep is not None and built.ntotal >= 2:
            built._tune(
                target_recall, k=10, queries=tune_queries, n_queries=DEFAULT_TUNING_QUERIES, database=vectors, seed=seed
            )
        built._build_timings = {
            "train_s": trained - started,
            "add_s": added - trained,
            "tune_s": time.perf_counter() - added,
            **shard_timings,
        }
        return built

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> "ProductIndex":
        """Load the live index of a directory written by :meth:`save`, verifying every checksum.

        Safe while another process saves to the same directory: the load reads one complete version,
        the old or the new one.

        Raises:
            FileNotFoundError: no saved index at ``directory``.
            IndexCorruptError: a checksum mismatch (index, manifest or attachment), or a manifest
                inconsistent with the index file or naming files an index does not keep.
            ValueError: the index was saved by a newer format version.
        """
        directory = Path(directory)
        cpu_index, manifest, version_dir = load_index_dir(directory)
        return cls(
            cpu_index,
            manifest["product_ids"],
            preset=manifest.get("preset", "custom"),
            factory_string=manifest["factory_string"],
            search_params=manifest.get("search_params", {}),
            metadata=manifest.get("metadata", {}),
            device=device,
            directory=directory,
            tuning=manifest.get("tuning"),
            version_dir=version_dir,
            attachment_checksums=manifest.get("attachments", {}),
            layout=manifest.get("layout"),
        )

    @staticmethod
    def check_destination(directory: str | Path) -> Path:
        """Raise now, before any expensive work, if :meth:`save` to ``directory`` would be refused.

        Returns the real directory a save writes into (symlinks followed). Same as
        ``index.check_index_destination``.

        Raises:
            FileExistsError: the path is not a directory, or holds files that are not a saved index.
            NotADirectoryError: a parent of the path is a file.
        """
        return check_index_destination(directory)

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
        """Search-time parameters for this index type: ``nprobe``, ``k_factor`` and ``min_candidates``
        (IVF presets: ``max(k_factor * k, min_candidates)`` candidates are re-ranked) or ``efSearch``
        (HNSW). Tuned by :meth:`tune` unless the index was built with ``target_recall=None``."""
        return dict(self._search_params)

    @property
    def layout(self) -> Dict[str, Any]:
        """How the index is kept: ``{"kind": "single"}``, or ``{"kind": "ondisk" | "separate", "shards": N,
        "shard_sizes": [...]}`` for shards merged into memory-mapped files (``index.ondisk``) or kept apart
        and searched together (``index.shards``)."""
        return json.loads(json.dumps(self._layout))

    @property
    def tuning(self) -> Optional[Dict[str, Any]]:
        """The report of the last :meth:`tune` (target, measured recall, sweep), or None if never tuned."""
        return json.loads(json.dumps(self._tuning)) if self._tuning is not None else None

    @property
    def build_timings(self) -> Optional[Dict[str, float]]:
        """Seconds spent by :meth:`build` training (``train_s``), adding vectors and ids (``add_s``) and
        tuning (``tune_s``, 0 when not tuned); None for a loaded index."""
        return dict(self._build_timings) if self._build_timings is not None else None

    @property
    def device(self) -> str:
        """Where searches run: ``"cpu"`` or ``"cuda"``."""
        return self._placement.device

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
            f"dim={self.dim}, ntotal={self.ntotal}, device={self.device!r})"
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
        refuse_change(self._layout, "add products to", self._where(), removing=False)
        vectors = as_matrix(vectors, "vectors")
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dim {vectors.shape[1]} but the index holds dim {self.dim}")
        check_new_ids(product_ids, len(vectors), existing=self._positions)
        add_vectors(self._cpu_index, self._layout, vectors)  # a separate-shard index: to its last shard
        start = len(self._ids)
        self._ids = np.concatenate([self._ids, np.array(list(product_ids), dtype=object)])
        for offset, pid in enumerate(product_ids):
            self._positions[pid] = start + offset
        self._placement.invalidate()

    def remove(self, product_ids: Sequence[str]) -> None:
        """Remove products by id (see ``index.ids`` for how each index type does it).

        Raises:
            KeyError: some ids are not in the index (naming them); nothing is removed then.
        """
        refuse_change(self._layout, "remove products from", self._where(), removing=True)
        if isinstance(product_ids, str):
            product_ids = [product_ids]
        unknown = [pid for pid in product_ids if pid not in self._positions]
        if unknown:
            raise KeyError(f"{len(unknown)} product ids are not in the index: {name_some(unknown)}")
        if len(product_ids) == 0:
            return
        doomed = np.fromiter((self._positions[pid] for pid in set(product_ids)), dtype=np.int64)
        keep = remove_labels(self._cpu_index, self._kind, doomed)
        self._ids = self._ids[keep]
        self._positions = {pid: position for position, pid in enumerate(self._ids)}
        self._placement.invalidate()

    # ----------------------------------------------------------------------------- search
    def search(
        self, queries: np.ndarray, k: int, offsets: Optional[np.ndarray] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The k most similar products for each query, best first, in one batched FAISS call.

        ``k`` is clamped to :attr:`ntotal`, so the result has ``min(k, ntotal)`` columns. Approximate
        indexes may still find fewer than that for some queries: those slots hold id ``None`` and score
        ``-inf`` (a FAISS label of -1 never maps to a real product).

        Args:
            queries: query descriptors, one per row.
            k: number of results wanted per query, >= 1.
            offsets: per-product score offsets in :attr:`product_ids` order (query-bank normalisation,
                ``index.bank_norm``): products are then ranked and scored by similarity minus offset, exactly
                (the search goes deeper until no other product can reach the top k).

        Shape:
            - queries: :math:`(Q, D)` float32; offsets: :math:`(N,)` with N = :attr:`ntotal`.
            - Output: ``scores`` :math:`(Q, K)` float32 and ``ids`` :math:`(Q, K)` object array of str,
              with :math:`K = \\min(k, ntotal)`.

        Raises:
            ValueError: empty index, k < 1, queries not 2-D or with NaN/inf, offsets not one per product.
            IndexMismatchError: the query dim differs from the index dim.
        """
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index: add products first")
        k = check_k(k)
        queries = as_matrix(queries, "queries", allow_empty=True)
        if queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"queries have dim {queries.shape[1]} but the index{self._where()} was built with dim "
                f"{self.dim}: query with the descriptor the index was built with, or rebuild it"
            )
        if offsets is None:
            scores, labels = self._search_labels(queries, min(k, self.ntotal))
        else:
            offsets = np.asarray(offsets, dtype=np.float32)
            if offsets.shape != (self.ntotal,) or not np.isfinite(offsets).all():
                raise ValueError(
                    f"offsets must be {self.ntotal} finite numbers, one per indexed product, got shape {offsets.shape}"
                )
            scores, labels = offset_topk(self._search_labels, queries, k, offsets)
        found = labels >= 0
        ids = np.full(labels.shape, None, dtype=object)
        ids[found] = self._ids[labels[found]]
        scores = np.where(found, scores, -np.inf).astype(np.float32, copy=False)
        return scores, ids

    def _search_labels(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """FAISS's (scores, labels) for normalised ``queries`` at the tuned parameters, ``k`` <= :attr:`ntotal`."""
        params = search_time_params(self._kind, self._search_params, k)
        index = self._placement.search_index(self._cpu_index, self._search_params)
        if params is None:
            return index.search(queries, k)
        return index.search(queries, k, params=params)

    def bank_offsets(self, bank: np.ndarray, beta: float = DEFAULT_BANK_BETA) -> np.ndarray:
        """The query-bank offset of every indexed vector (``index.bank_norm.bank_offsets``), in
        :attr:`product_ids` order, for :meth:`search`'s ``offsets``.

        The vectors are read back from the index: exact for ``flat``, ``hnsw`` and ``ivfpq-rflat``, SQ8-decoded
        (within ~1e-3) for ``ivfpq``.

        Shape:
            - bank: :math:`(B, D)`; output: :math:`(N,)` float32 with N = :attr:`ntotal`.
        """
        return bank_offsets(reconstruct_all(self._cpu_index), bank, beta)

    def check_compatible(self, expected: Mapping[str, Any], keys: Sequence[str] = DEFAULT_COMPAT_KEYS) -> None:
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
        check_index_matches(self._metadata, self.dim, expected, keys, self._where())

    # ----------------------------------------------------------------------------- tuning
    def tune(
        self,
        target_recall: float = DEFAULT_TARGET_RECALL,
        k: int = 10,
        queries: Optional[np.ndarray] = None,
        n_queries: int = DEFAULT_TUNING_QUERIES,
        vectors: Optional[np.ndarray] = None,
        seed: int = 0,
    ) -> Dict[str, Any]:
        """Pick the fastest search parameters whose recall@k against exact search reaches the target.

        The approach of autofaiss, measured on a sample of queries against exact search: a sweep per
        index kind (nprobe x re-rank depth for IVF, efSearch for HNSW); ``index.tuning`` says how it walks,
        when a setting "reaches the target", and what happens when none does.

        The chosen values replace :attr:`search_params` (and so go into the manifest on :meth:`save`);
        the full report is kept in :attr:`tuning`. Exact (``Flat``) indexes have nothing to tune.

        Args:
            target_recall: wanted mean recall@k against exact search, in (0, 1].
            k: the k of recall@k (the k of the searches to come). The number of candidates the IVF
                presets re-ranked at the chosen setting is kept as ``min_candidates``, a floor for
                searches with a smaller k.
            queries: sample queries from the real query distribution, if there are some (best: e.g.
                descriptors of real street photos); else ``n_queries`` catalog vectors, each moved
                off itself to the typical nearest-neighbour cosine (see ``index.tuning.catalog_tuning_queries``).
            n_queries: size of the catalog sample when ``queries`` is None.
            vectors: the catalog vectors in product-id order, for the exact search. None reconstructs
                them from the index: exact for ``hnsw``/``ivfpq-rflat``, SQ8-decoded for ``ivfpq``
                (then recall is measured against exact search over the decoded vectors). Passing
                them costs no extra memory beyond a normalised copy.
            seed: seeds the catalog sample and its perturbation.

        Shape:
            - queries: :math:`(Q, D)`.
            - vectors: :math:`(N, D)` with N = :attr:`ntotal`.

        Returns:
            The report (also in :attr:`tuning`): ``target_recall``, ``k``, ``n_queries``, ``queries``
            (where they came from), ``met``, ``recall``, ``recall_se``, ``ms_per_query``,
            ``search_params`` and ``sweep`` (one row per setting measured).

        Raises:
            ValueError: target_recall outside (0, 1], k < 1, an index of fewer than 2 products, bad
                queries or vectors (wrong dim or count, NaN/inf).
        """
        check_target_recall(target_recall)
        k = check_k(k)
        queries = check_tuning_queries(queries, self.dim)
        database = check_tuning_vectors(vectors, self.ntotal, self.dim)
        return self._tune(target_recall, k, queries, int(n_queries), database, seed)

    def use_search_params(self, search_params: Mapping[str, int]) -> None:
        """Search with ``search_params`` from now on (e.g. those another index of the same preset was tuned
        to, to compare the two at equal settings); they replace :attr:`search_params` and go into the
        manifest on :meth:`save`.

        Raises:
            ValueError: a key this index type does not use, or a value that is not a positive integer.
        """
        self._search_params.update(check_search_params(self._kind, search_params))
        self._apply_search_params(self._cpu_index)
        self._placement.invalidate()

    def use_device(self, device: str) -> str:
        """Move searching to ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``); returns where it now runs.

        The CPU index stays the source of truth; a GPU copy is made on the next search. Index types
        without a GPU version stay on the CPU (said once in the log).
        """
        self._placement = SearchPlacement(self._cpu_index, self._kind, device)
        return self._placement.device

    def serialized_size(self) -> int:
        """Bytes of the index as :meth:`save` writes it (``index.faiss``), counted without a copy.

        This is the memory the index holds (vectors, codes, ids, centroids, graph), give or take
        a few headers; the product-id list of the manifest is not counted. For the on-disk layout it is
        what the index keeps on disk (``index.ivfdata`` included), most of it memory-mapped, not held.
        """
        size = serialized_index_size(self._cpu_index)
        return size + ondisk_bytes(self._cpu_index) if self._layout["kind"] == ONDISK_LAYOUT else size

    # ----------------------------------------------------------------------------- persistence
    def save(
        self,
        directory: str | Path,
        attachments: Optional[Mapping[str, bytes]] = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> Path:
        """Write ``index.faiss`` (always a CPU index), ``manifest.json`` and ``attachments`` as the new live
        version of ``directory``, in one atomic step (see ``index.storage``).

        A crash at any point leaves the old or the new index loadable; concurrent saves of the same
        directory take turns (an exclusive lock); a symlinked ``directory`` is written through.

        Args:
            attachments: file name -> bytes, names from ``KNOWN_ATTACHMENTS`` (``descriptor.pt``,
                ``local_features.npz``); checksummed and replaced together with the index.
            lock_timeout: seconds to wait for another save of the same directory.

        Returns:
            The directory written (as given).

        Raises:
            FileExistsError: ``directory`` is not a directory or holds files other than a saved index.
            ValueError: an unknown attachment name, or a metadata descriptor naming a checkpoint (``@``).
            IndexLockedError: another save held the directory for longer than ``lock_timeout``.
        """
        directory = Path(directory)
        manifest = index_manifest(
            self._cpu_index,
            self._preset,
            self._factory_string,
            self._search_params,
            self._tuning,
            self._metadata,
            self.product_ids,
            self._layout,
        )
        # The source of truth is already the CPU index; a GPU copy, if any, is only a search replica.
        write_index_dir(directory, self._cpu_index, manifest, attachments, lock_timeout=lock_timeout)
        self._directory = directory
        self._version_dir = None  # attachments are read through the directory's live links from now on
        # ... and checked against what this save wrote, so `has_attachment` and `read_attachment` know them
        self._attachment_checksums = {
            name: hashlib.sha256(payload).hexdigest() for name, payload in (attachments or {}).items()
        }
        return directory

    def has_attachment(self, name: str) -> bool:
        """Whether the loaded version holds the checksummed attachment ``name``."""
        return name in self._attachment_checksums

    def attachment_path(self, name: str) -> Path:
        """Path of attachment ``name`` of exactly the version this index was loaded from (`attachment_path`)."""
        return attachment_path(name, self._directory, self._version_dir, self._attachment_checksums)

    def read_attachment(self, name: str) -> bytes:
        """The bytes of attachment ``name`` of the loaded version, checked against its manifest checksum."""
        return read_attachment(name, self._directory, self._version_dir, self._attachment_checksums)

    # ----------------------------------------------------------------------------- internals
    def _where(self) -> str:
        return f" at {self._directory}" if self._directory is not None else ""

    def _tune(
        self,
        target_recall: float,
        k: int,
        queries: Optional[np.ndarray],
        n_queries: int,
        database: Optional[np.ndarray],
        seed: int,
    ) -> Dict[str, Any]:
        """:meth:`tune` on validated, normalised inputs (``database`` may be the caller's build matrix):
        ``index.tuning`` measures, this applies and stores its report."""
        report = tune_search_params(self._cpu_index, self._kind, database, queries, target_recall, k, n_queries, seed)
        if self._kind == "flat":
            return report  # nothing tuned: search_params and tuning stay as they are
        params = report["search_params"]
        self._search_params.update(params)
        self._apply_search_params(self._cpu_index)
        self._placement.invalidate()
        self._tuning = report
        log_tuning(report, target_recall, self._preset, self._factory_string, self._cpu_index, self._kind)
        return self.tuning

    def _apply_search_params(self, index: Any) -> None:
        apply_search_params(index, self._kind, self._search_params)
