"""N shard indexes kept apart and searched together: the separate-shard (fan-out) layout.

Beside one in-memory index and shards merged on disk (``index.ondisk``), a catalog can be kept as N shard
indexes, each a copy of one trained index (the same IVF quantizer and codebooks, or none for ``flat``) filled
with a contiguous slice of the catalog, and searched together by ``faiss.IndexShards`` with successive ids:
shard s numbers its products from where shard s - 1 ends, every shard is searched (in parallel threads,
or on its own GPU, see ``index.device``) and FAISS merges the N top-k lists into one. With exact search
(``flat``, or IVF probing every list and re-ranking every candidate) the results are those of one index
over the whole catalog; approximate settings search each shard as deep as one index would, so they
find at least as much. Each shard is one file, so a shard can be built, copied or memory-limited alone,
and the layout is the one a catalog takes when shards live in different processes or machines.

A saved version holds (``index.storage`` writes and checksums them with the rest)::

    index.faiss         shard 0 (any index reads it; the trained structures of every shard are in it)
    shard-0001.faiss    shard 1, ... one file per further shard, sha256 each in the manifest's index_files

The manifest's layout is ``{"kind": "separate", "shards": N, "shard_sizes": [...]}``; the file names follow
from N alone, so a manifest cannot make a load read any other file. Products can be added (they go to the
last shard, whose ids come last); removing one would renumber every later shard, so it is refused.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import faiss
import numpy as np

from .faiss_index import shard_parts
from .layout import INDEX_FILE, fsync_path
from .ondisk import check_shard_request, fill_shards, refuse_if_read_only, shard_bounds

SEPARATE_LAYOUT = "separate"
MERGED = "merged"
SHARD_LAYOUTS = (MERGED, SEPARATE_LAYOUT)
"""What ``ProductIndex.build(shards=N, shard_layout=...)`` and ``street2shop index --shard-layout`` take:
``merged`` (one memory-mapped on-disk index, ``index.ondisk``) or ``separate`` (N shards, this module)."""

MAX_SHARDS = 9999
"""Shard files are numbered with four digits."""


def shard_file_name(shard: int) -> str:
    """The file of shard ``shard`` >= 1 in a version folder (shard 0 is ``index.faiss``)."""
    return f"shard-{shard:04d}.faiss"


def separate_index_files(n_shards: int) -> List[str]:
    """The files a separate-shard index of ``n_shards`` keeps beside ``index.faiss``, in shard order."""
    return [shard_file_name(shard) for shard in range(1, n_shards)]


def check_sharded_build(plan: Any, n_vectors: int, dim: int, shards: int, preset: str, shard_layout: str) -> None:
    """Refuse, before any training, a sharded build of ``shard_layout`` that cannot be made (a ValueError
    naming the fix): an unknown layout, too many shards, or (merged) a preset faiss cannot merge on disk."""
    if shard_layout not in SHARD_LAYOUTS:
        raise ValueError(f"shard layout must be one of {', '.join(SHARD_LAYOUTS)}, got {shard_layout!r}")
    if shard_layout == MERGED:
        check_shard_request(plan, n_vectors, dim, shards, preset)
        return
    shard_bounds(n_vectors, shards)
    if shards > MAX_SHARDS:
        raise ValueError(f"{shards} shards: a separate-shard index keeps at most {MAX_SHARDS}")


def fill_sharded(
    trained: Any, vectors: np.ndarray, shards: int, shard_layout: str, work_dir: Optional[os.PathLike]
) -> Tuple[Any, Dict[str, Any], Optional[Path], Dict[str, float]]:
    """Fill the empty ``trained`` index with ``vectors`` as ``shards`` shards of ``shard_layout`` (checked by
    :func:`check_sharded_build`); returns ``(index, layout, staging folder or None, timings)``: the index to
    search (``trained`` itself when merged on disk, an ``IndexShards`` when separate), the manifest's layout
    record, the folder the merged lists are mapped from (the caller removes it with the index) and seconds."""
    if shard_layout == MERGED:
        layout, staging, timings = fill_shards(trained, vectors, shards, work_dir)
        return trained, layout, staging, timings
    started = time.perf_counter()
    fanned = build_separate(trained, vectors, shards)
    return fanned, separate_layout(fanned), None, {"shards_s": time.perf_counter() - started}


def build_separate(trained: Any, vectors: np.ndarray, n_shards: int, workers: Optional[int] = None) -> Any:
    """``n_shards`` copies of ``trained`` (trained, empty), each filled with a contiguous slice of ``vectors``
    (:func:`index.ondisk.shard_bounds`) in parallel threads (faiss releases the GIL), searched together.

    Shape:
        - vectors: :math:`(N, D)` float32, L2-normalised.

    Returns:
        A ``faiss.IndexShards`` with successive ids: label i is row i of ``vectors``.
    """
    bounds = shard_bounds(len(vectors), n_shards)
    template = faiss.serialize_index(trained)  # what every shard starts from (another machine would read it)

    def fill(shard: int) -> Any:
        part = faiss.deserialize_index(template)
        part.add(vectors[int(bounds[shard]) : int(bounds[shard + 1])])
        return part

    workers = max(1, min(n_shards, workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(fill, range(n_shards)))
    return fan_out(parts)


def fan_out(parts: List[Any]) -> Any:
    """One ``faiss.IndexShards`` (successive ids, shards searched in parallel threads) over ``parts``, which
    it takes over: the C++ object frees them with itself, so their Python wrappers must not."""
    fanned = faiss.IndexShards(int(parts[0].d), True, True)
    for part in parts:
        fanned.add_shard(part)
    fanned.own_indices = True
    for part in parts:
        part.this.disown()
    fanned.referenced_objects = []  # the add_shard wrapper's references: the shards are owned in C++ now
    return fanned


def separate_layout(fanned: Any) -> Dict[str, Any]:
    """The manifest's layout record of an ``IndexShards``: kind, shard count and each shard's size."""
    sizes = [int(part.ntotal) for part in shard_parts(fanned)]
    return {"kind": SEPARATE_LAYOUT, "shards": len(sizes), "shard_sizes": sizes}


def add_vectors(cpu_index: Any, layout: Dict[str, Any], vectors: np.ndarray) -> None:
    """Add ``vectors`` to a ProductIndex's raw index, after its last label: to the last shard of a
    separate-shard index (``layout``'s shard sizes updated in place), else to the index itself."""
    if layout["kind"] != SEPARATE_LAYOUT:
        cpu_index.add(vectors)
        return
    shard_parts(cpu_index)[-1].add(vectors)
    cpu_index.syncWithSubIndexes()  # IndexShards' own ntotal; labels follow the shards' sizes at search time
    layout["shard_sizes"][-1] += len(vectors)


def refuse_change(layout: Mapping[str, Any], action: str, where: str, removing: bool) -> None:
    """A ValueError for ``action`` ("add products to", "remove products from") where the layout cannot do it:
    any change on disk-merged shards, a removal from separate shards."""
    refuse_if_read_only(layout, action, where)
    if removing and layout["kind"] == SEPARATE_LAYOUT:
        raise ValueError(
            f"cannot {action} the {layout['shards']}-shard index{where}: its shards number their products one "
            "after another, so a removal would renumber every later shard; build it again without them "
            "(`street2shop index ... --shards N --shard-layout separate`), or build a single index"
        )


def write_separate_files(version: Path, cpu_index: Any) -> List[str]:
    """Write a separate-shard index into a version folder: shard 0 as ``index.faiss``, shard s as
    :func:`shard_file_name`, each fsynced; returns the names beside ``index.faiss``."""
    parts = shard_parts(cpu_index)
    names = separate_index_files(len(parts))
    for name, part in zip([INDEX_FILE, *names], parts):
        faiss.write_index(part, str(version / name))
        fsync_path(version / name)
    return names


def attach_separate_files(first: Any, folder: Path, layout: Mapping[str, Any]) -> Any:
    """The searchable ``IndexShards`` of a version folder (checksums already verified): ``first`` (its
    ``index.faiss``, shard 0) and the other shard files, each checked against the layout's shard size.

    Raises:
        ValueError: a shard of another size, dim or kind than the layout and shard 0 say.
    """
    parts = [first] + [faiss.read_index(str(folder / name)) for name in separate_index_files(layout["shards"])]
    for shard, (part, size) in enumerate(zip(parts, layout["shard_sizes"])):
        if part.ntotal != size or part.d != first.d or type(part) is not type(first):
            raise ValueError(
                f"shard {shard} is a {type(part).__name__} of {part.ntotal} vectors of dim {part.d}; the manifest "
                f"says {size} vectors and shard 0 is a {type(first).__name__} of dim {first.d}"
            )
    return fan_out(parts)


def check_separate_layout(layout: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a manifest's separate-shard layout record (None when nothing): a shard count that
    is not a whole number in [1, MAX_SHARDS], or shard sizes that are not one count >= 0 per shard."""
    shards, sizes = layout.get("shards"), layout.get("shard_sizes")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        return f"shards {shards!r} is not a whole number from 1 to {MAX_SHARDS}"
    if not isinstance(sizes, list) or len(sizes) != shards:
        return f"shard_sizes {str(sizes)[:80]} is not a list of {shards} sizes"
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        return f"shard_sizes {str(sizes)[:80]} holds something other than counts >= 0"
    return None
