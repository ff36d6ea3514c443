"""Frozen backbone maps of the training images, cached on disk in chunks within a share of the time budget.

A trainer whose backbone (or the trunk of it) is frozen computes those maps once per run, not once
per step; at full scale that is most of the run's cost. `cache_chunks` computes them chunk by chunk
into the run folder, so that an interrupted run resumes its caching as well as its training, and
starts no new chunk once a share of the time budget is spent, so that the training gets the rest.
Each trainer keeps its own chunk format (its `save` and `load`): tn writes torch files, delf sealed
npz files (`retrieval.files.write_checked_bytes`).

Example:
    >>> chunks = cache_chunks(                                                  # doctest: +SKIP
    ...     n_chunks, lambda c: folder / f"chunk-{c:05d}.pt", compute,
    ...     save=atomic_torch_save, load=load_checkpoint, run=run, budget_share=0.5, label="tn: caching maps")
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch

log = logging.getLogger("street2shop.training")
Chunk = TypeVar("Chunk")


def cache_chunks(
    n_chunks: int,
    path_of: Callable[[int], Path],
    compute: Callable[[int, Optional[Tuple[Any, ...]]], Chunk],
    *,
    save: Callable[[Chunk, Path], None],
    load: Callable[[Path], Chunk],
    run: Any,
    budget_share: Optional[float],
    prefetch: Optional[Callable[[int], Sequence[Callable[[], Any]]]] = None,
    label: str = "caching training maps",
    progress: bool = True,
) -> List[Chunk]:
    """Chunks 0, 1, ... of a training set, each read from `path_of(c)` or computed and saved there.

    A missing chunk is computed (`compute(c, inputs)`) and saved (`save(chunk, path)`, which should
    write atomically); a chunk that cannot be read (`load` raises ValueError or OSError) is
    recomputed with a warning. With a time budget (`run.time_budget_s`, `run.elapsed` of a
    `TrainingRun`), no missing chunk is started once `budget_share` of it is spent and a chunk is
    ready: the result is then the first chunks only (a prefix; the caller says so). None: no limit.

    Args:
        prefetch: the loaders of a chunk's inputs (e.g. its images), run in background threads one
            chunk ahead of `compute`, which gets their results as `inputs` (None without prefetch).
        label: the progress bar's and the log's name for the work.

    Returns:
        The chunks in order, `n_chunks` of them unless the budget share cut the cache.
    """
    missing = [c for c in range(n_chunks) if not path_of(c).exists()]
    started = time.perf_counter()
    budget = run.time_budget_s
    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=label, unit="chunk", leave=False)
    chunks: List[Chunk] = []
    computed = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: Dict[int, List[Future]] = {}

        def start(c: int) -> None:
            if prefetch is not None and c not in pending:
                pending[c] = [pool.submit(loader) for loader in prefetch(c)]

        if missing:
            start(missing[0])
        for c in range(n_chunks):
            path = path_of(c)
            chunk = None
            if path.exists():
                try:
                    chunk = load(path)
                except (ValueError, OSError) as error:  # damaged, or of an older format: recompute
                    log.warning("training maps %s are unusable (%s): recomputing them", path, error)
            elif chunks and budget is not None and budget_share is not None and run.elapsed >= budget_share * budget:
                break
            if chunk is None:
                start(c)  # a damaged chunk was not prefetched
                inputs = tuple(future.result() for future in pending.pop(c)) if prefetch is not None else None
                following = [m for m in missing if m > c]
                if following:
                    start(following[0])
                chunk = compute(c, inputs)
                save(chunk, path)
                computed += 1
                if bar is not None:
                    bar.update(1)
            chunks.append(chunk)
        for futures in pending.values():
            for future in futures:
                future.cancel()
    if bar is not None:
        bar.close()
    if computed:
        log.info("%s: %d chunks in %.0f s", label, computed, time.perf_counter() - started)
    return chunks


@torch.no_grad()
def float16_maps(
    maps_of: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], device: Any
) -> torch.Tensor:
    """`maps_of` over image batches on `device`, concatenated on the CPU in float16 (the cached form).

    Shape:
        - batches: (b, 3, H, W) each; Output: (sum b, C, h, w) float16.
    """
    return torch.cat([maps_of(images.to(device)).to("cpu", torch.float16) for images in batches]).contiguous()
