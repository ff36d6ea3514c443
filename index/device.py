"""Where FAISS searches run: GPU when the faiss build and the index type allow it, else CPU.

The source of truth is always a CPU index (it is what gets saved); a GPU copy is made from it for
searching. The decision is logged once per process per distinct outcome, not on every call.

A separate-shard index (``index.shards``, a ``faiss.IndexShards``) is copied shard by shard: each shard goes
to the GPU :func:`shard_gpu_plan` gives it (its own GPU when there are as many; round-robin when fewer) and
the copies are searched together by a new ``IndexShards``, the GPUs in parallel, FAISS merging the top-k.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import faiss

from .faiss_index import shard_parts
from .presets import DEFAULT_REFINE_K_FACTOR

LOGGER = logging.getLogger("street2shop.index")

_VALID_DEVICES = ("auto", "cpu", "cuda")
_LOGGED: Set[str] = set()
_LOG_LOCK = threading.Lock()
_GPU_RESOURCES: Dict[int, Any] = {}
_GPU_RESOURCES_LOCK = threading.Lock()


def faiss_gpu_count() -> int:
    """Number of GPUs this faiss build can use (0 for faiss-cpu builds, which lack get_num_gpus)."""
    if not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def resolve_faiss_device(device: str = "auto") -> str:
    """Turn a ``--device`` choice into where FAISS can actually run.

    Args:
        device: ``"auto"`` (GPU if faiss sees one), ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` is read as
            ``"cuda"``; FAISS indexes here always go to GPU 0).

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: ``device`` is none of the above.
        RuntimeError: ``"cuda"`` was asked for but this faiss build sees no GPU.

    Example:
        >>> resolve_faiss_device("cpu")
        'cpu'
    """
    if not isinstance(device, str) or device.split(":")[0] not in _VALID_DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(_VALID_DEVICES)}")
    kind = device.split(":")[0]
    if kind == "cpu":
        return "cpu"
    n_gpus = faiss_gpu_count()
    if kind == "cuda" and n_gpus == 0:
        raise RuntimeError(
            "device 'cuda' was requested but the installed faiss sees no GPU (it is faiss-cpu, or no "
            "GPU is visible). Install faiss-gpu to search on the GPU; faiss-cpu must be uninstalled "
            "first because both provide the `faiss` module: `pip uninstall faiss-cpu && pip install "
            "faiss-gpu`. Or run with --device cpu."
        )
    return "cuda" if n_gpus > 0 else "cpu"


def log_once(level: int, message: str) -> None:
    """Log ``message`` on the ``street2shop.index`` logger the first time it is seen in this process."""
    with _LOG_LOCK:
        if message in _LOGGED:
            return
        _LOGGED.add(message)
    LOGGER.log(level, message)


def _gpu_resources(gpu: int = 0) -> Any:
    # One StandardGpuResources per GPU and process: each one reserves its own scratch memory on its GPU.
    with _GPU_RESOURCES_LOCK:
        if gpu not in _GPU_RESOURCES:
            _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
        return _GPU_RESOURCES[gpu]


def shard_gpu_plan(n_shards: int, n_gpus: int) -> List[Optional[int]]:
    """The GPU each of ``n_shards`` shards searches on, given ``n_gpus`` GPUs: shard s on GPU ``s % n_gpus``
    (each on its own when there are enough, round-robin otherwise); all None (the CPU) without a GPU.

    Example:
        >>> shard_gpu_plan(4, 2), shard_gpu_plan(2, 4), shard_gpu_plan(3, 0)
        ([0, 1, 0, 1], [0, 1], [None, None, None])
    """
    if n_shards < 1 or n_gpus < 0:
        raise ValueError(f"need >= 1 shard and >= 0 GPUs, got {n_shards} shards and {n_gpus} GPUs")
    return [shard % n_gpus if n_gpus else None for shard in range(n_shards)]


def clone_to_gpu(cpu_index: Any, gpu: int = 0) -> Any:
    """A GPU copy of a CPU ``IndexFlat`` or ``IndexIVFPQ``/``IndexIVF*`` on GPU ``gpu``.

    Raises whatever faiss raises (RuntimeError) for index types without a GPU version.
    """
    options = faiss.GpuClonerOptions()
    # For IndexFlat, useFloat16 would store the vectors in float16: keep it off so flat stays exact.
    # For IndexIVFPQ it only means float16 lookup tables, which GPU IVFPQ needs beyond 48
    # sub-quantizers (shared-memory limit).
    options.useFloat16 = isinstance(cpu_index, faiss.IndexIVFPQ) and cpu_index.pq.M > 48
    return faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, cpu_index, options)


def has_gpu_version(cpu_index: Any, kind: str) -> bool:
    """Whether faiss can clone this index (its IVF part, for IVF presets; its shards' for an IndexShards) to a GPU."""
    cpu_index = shard_parts(cpu_index)[0]
    if kind == "flat":
        return True
    if kind == "ivf":
        # Fast-scan PQ (4-bit codes in SIMD-register layout) has no GPU implementation.
        return not isinstance(faiss.downcast_index(cpu_index.base_index), faiss.IndexIVFFastScan)
    return False


def index_placement(kind: str, device: str, has_gpu_version: bool = True) -> str:
    """Where an index of ``kind`` asked to run on ``device`` searches: ``"cpu"`` or ``"cuda"`` (logged once)."""
    resolved = resolve_faiss_device(device)
    if resolved == "cuda" and kind == "hnsw":
        log_once(logging.INFO, "faiss: HNSW has no GPU version, HNSW indexes search on the CPU")
        return "cpu"
    if resolved == "cuda" and not has_gpu_version:
        log_once(
            logging.INFO,
            "faiss: fast-scan IVF-PQ (preset 'ivfpq') has no GPU version, it searches on "
            "the CPU; preset 'ivfpq-rflat' searches on the GPU",
        )
        return "cpu"
    if resolved == "cuda":
        log_once(logging.INFO, f"faiss: {kind} indexes search on the GPU ({faiss.get_num_gpus()} visible)")
    else:
        log_once(logging.INFO, "faiss: searching on the CPU")
    return resolved


def gpu_search_copy(cpu_index: Any, kind: str, search_params: Mapping[str, Any]) -> Tuple[Any, List[Any]]:
    """The GPU copy of a ProductIndex's ``cpu_index`` (kind ``"flat"`` or ``"ivf"``) that searches run on,
    and every faiss object it needs kept alive, with ``search_params`` (``nprobe``, ``k_factor``) set on it.
    An ``IndexShards`` is copied shard by shard onto the GPUs of :func:`shard_gpu_plan`."""
    if isinstance(cpu_index, faiss.IndexShards):
        return gpu_shards_copy(shard_parts(cpu_index), kind, search_params, faiss_gpu_count())
    return gpu_part_copy(cpu_index, kind, search_params, 0)


def gpu_shards_copy(
    parts: List[Any], kind: str, search_params: Mapping[str, Any], n_gpus: int
) -> Tuple[Any, List[Any]]:
    """``parts`` (CPU shards, successive ids) copied each to its GPU of :func:`shard_gpu_plan` and searched
    together by a new ``faiss.IndexShards`` (a thread per shard, so the GPUs work at once); returns it and
    every faiss object it needs kept alive (it owns none of them)."""
    plan = shard_gpu_plan(len(parts), n_gpus)
    if None in plan:
        raise RuntimeError("faiss sees no GPU: a separate-shard index searches on the CPU (SearchPlacement)")
    log_once(
        logging.INFO, f"faiss: {len(parts)} shards on {min(len(parts), n_gpus)} GPUs (shard s on GPU s % {n_gpus})"
    )
    fanned = faiss.IndexShards(int(parts[0].d), True, True)
    keep: List[Any] = []
    for part, gpu in zip(parts, plan):
        copy, needed = gpu_part_copy(part, kind, search_params, gpu)
        fanned.add_shard(copy)
        keep.extend(needed)
    return fanned, [*keep, fanned]


def gpu_part_copy(cpu_index: Any, kind: str, search_params: Mapping[str, Any], gpu: int) -> Tuple[Any, List[Any]]:
    """:func:`gpu_search_copy` of one (unsharded) index on GPU ``gpu``."""
    if kind == "flat":
        gpu_index = clone_to_gpu(cpu_index, gpu)
        return gpu_index, [gpu_index]
    # faiss has no GPU IndexRefine: the IVFPQ part goes to the GPU and the exact re-ranking
    # stays on the CPU vectors, which the wrapper only references (we keep them alive).
    base_gpu = clone_to_gpu(faiss.downcast_index(cpu_index.base_index), gpu)
    faiss.GpuParameterSpace().set_index_parameter(base_gpu, "nprobe", int(search_params.get("nprobe", 8)))
    refine = faiss.IndexRefine(base_gpu, cpu_index.refine_index)
    refine.k_factor = float(search_params.get("k_factor", DEFAULT_REFINE_K_FACTOR))
    return refine, [base_gpu, refine]


class SearchPlacement:
    """Where one ProductIndex searches, and the GPU copy it searches on there.

    The CPU index stays the source of truth: the copy is made from it on the first search on the GPU
    and dropped (:meth:`invalidate`) whenever the CPU index or its search parameters change.

    Args:
        cpu_index: the index to place (its type decides whether a GPU copy is possible).
        kind: ``index_kind(cpu_index)``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see `index_placement`).
    """

    def __init__(self, cpu_index: Any, kind: str, device: str):
        self.kind = kind
        self.device = index_placement(kind, device, has_gpu_version(cpu_index, kind))
        self._gpu_index: Optional[Any] = None
        self._gpu_parts: List[Any] = []  # faiss objects the GPU copy references, kept alive with it

    def search_index(self, cpu_index: Any, search_params: Mapping[str, Any]) -> Any:
        """The index a search runs on: ``cpu_index`` on the CPU (HNSW always), else its GPU copy."""
        if self.device != "cuda" or self.kind == "hnsw":
            return cpu_index
        if self._gpu_index is None:
            self._gpu_index, self._gpu_parts = gpu_search_copy(cpu_index, self.kind, search_params)
        return self._gpu_index

    def invalidate(self) -> None:
        """Drop the GPU copy: the CPU index changed; the next search on the GPU makes a new one."""
        self._gpu_index = None
        self._gpu_parts = []
