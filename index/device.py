"""Where FAISS searches run: GPU when the faiss build and the index type allow it, else CPU.

The source of truth is always a CPU index (it is what gets saved); a GPU copy is made from it for
searching. The decision is logged once per process per distinct outcome, not on every call.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Set

import faiss

LOGGER = logging.getLogger("street2shop.index")

_VALID_DEVICES = ("auto", "cpu", "cuda")
_LOGGED: Set[str] = set()
_LOG_LOCK = threading.Lock()
_GPU_RESOURCES: Optional[Any] = None
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


def _gpu_resources() -> Any:
    # One StandardGpuResources per process: each one reserves its own scratch memory on the GPU.
    global _GPU_RESOURCES
    with _GPU_RESOURCES_LOCK:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return _GPU_RESOURCES


def clone_to_gpu(cpu_index: Any) -> Any:
    """A GPU copy of a CPU ``IndexFlat`` or ``IndexIVFPQ``/``IndexIVF*`` (GPU 0).

    Raises whatever faiss raises (RuntimeError) for index types without a GPU version.
    """
    options = faiss.GpuClonerOptions()
    # For IndexFlat, useFloat16 would store the vectors in float16: keep it off so flat stays exact.
    # For IndexIVFPQ it only means float16 lookup tables, which GPU IVFPQ needs beyond 48
    # sub-quantizers (shared-memory limit).
    options.useFloat16 = isinstance(cpu_index, faiss.IndexIVFPQ) and cpu_index.pq.M > 48
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu_index, options)
