"""Sharded builds merged into one memory-mapped, on-disk IVF index: FAISS's recipe for catalogs past RAM.

The recipe of FAISS's ``demo_ondisk_ivf.py`` and its wiki page "Indexes that do not fit in RAM":

1. train the IVF coarse quantizer (and the PQ codebooks) once, on a seeded sample of the catalog;
2. fill N shards with it, each holding a contiguous slice of the catalog under its global labels
   (here in parallel threads: faiss releases the GIL; on several machines each would fill one);
3. merge the shards' inverted lists into one file, ``index.ivfdata``, with
   ``faiss.contrib.ondisk.merge_ondisk`` (``OnDiskInvertedLists``): the merged index memory-maps it.

The index is an ``IndexRefine`` over an IVF-PQ (the ``ivfpq-rflat`` preset): the IVF-PQ finds candidates,
the exact vectors re-rank them. Both big parts live in files that are memory-mapped on load, so a
loaded index keeps only the centroids and codebooks in its own memory; the pages a search touches sit in
the page cache, which the kernel can drop:

    index.faiss     the IVF-PQ: centroids, PQ codebooks and the list offsets into index.ivfdata ("ilod")
    index.ivfdata   the inverted lists (PQ codes and labels), memory-mapped (``OnDiskInvertedLists``)
    refine.faiss    the exact vectors of the re-rank (an ``IndexFlat``), memory-mapped
                    (``IO_FLAG_MMAP_IFC``)

(One file cannot hold both: faiss finds ``index.ivfdata`` beside the file it reads only when it reads
from a path, and memory-maps flat codes only when it reads from a mapping.)

Labels are catalog rows, as in every ProductIndex; the merged lists hold each list's entries shard after
shard, in label order, exactly as one index filled in one go: searches give the same ids and scores.
The merged index is read-only (faiss packs the lists without room to grow): adding or removing products
means building it again. Fast-scan PQ (the ``ivfpq`` preset) keeps its lists in SIMD blocks that
``OnDiskInvertedLists`` cannot merge, so it has no on-disk layout.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from .layout import INDEX_FILE, IVF_DATA_FILE, REFINE_FILE, fsync_path

ONDISK_LAYOUT = "ondisk"


def check_shard_request(plan: Any, n_vectors: int, dim: int, shards: int, preset: str) -> None:
    """Refuse, before any training, a sharded build the plan (`index.presets.plan_index`) cannot make."""
    if plan.sweep is None:  # the IVF presets' fallback to Flat on a small catalog
        raise ValueError(f"cannot build {shards} shards: {plan.fallback_reason or 'an exact index'}")
    shard_bounds(n_vectors, shards)
    check_shardable(faiss.index_factory(dim, plan.factory_string, faiss.METRIC_INNER_PRODUCT), preset)


def fill_shards(
    cpu_index: Any, vectors: np.ndarray, shards: int, work_dir: Optional[os.PathLike]
) -> Tuple[Dict[str, Any], Path, Dict[str, float]]:
    """`build_ondisk` into a new staging folder inside `work_dir` (None: the system's temporary folder); returns
    (layout, the staging folder, which the caller removes when the index is gone, timings)."""
    staging = Path(tempfile.mkdtemp(prefix="street2shop-shards-", dir=work_dir))
    layout, timings = build_ondisk(cpu_index, vectors, shards, staging)
    return layout, staging, timings


def refuse_if_read_only(layout: Dict[str, Any], action: str, where: str) -> None:
    """A ValueError for `action` ("add products to", ...) on an on-disk layout, which cannot grow or shrink."""
    if layout["kind"] == ONDISK_LAYOUT:
        raise ValueError(
            f"cannot {action} the on-disk index{where}: its {layout['shards']} merged shards are "
            "read-only (faiss packs the lists without room to grow); build it again with the full catalog"
        )


def check_shardable(cpu_index: Any, preset: str) -> None:
    """Raise ValueError unless ``cpu_index`` (trained, empty) can be built as shards merged on disk: an
    ``IndexRefine`` over an IVF whose lists are not fast-scan blocks."""
    base = faiss.downcast_index(cpu_index.base_index) if isinstance(cpu_index, faiss.IndexRefine) else None
    if not isinstance(base, faiss.IndexIVF) or isinstance(base, faiss.IndexIVFFastScan):
        raise ValueError(
            f"preset {preset!r} ({type(cpu_index).__name__}) cannot be sharded and merged on disk: faiss merges "
            "the inverted lists of IVF indexes without fast-scan; use preset 'ivfpq-rflat'"
        )


def shard_bounds(n_vectors: int, n_shards: int) -> np.ndarray:
    """Row boundaries of ``n_shards`` contiguous, near-equal shards: shard s holds rows ``[b[s], b[s+1])``.

    Example:
        >>> shard_bounds(10, 4).tolist()
        [0, 2, 5, 7, 10]
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"shards must be a whole number >= 1, got {n_shards!r}")
    if n_shards > n_vectors:
        raise ValueError(f"{n_shards} shards for {n_vectors} vectors: use at most one shard per vector")
    return np.linspace(0, n_vectors, n_shards + 1).round().astype(np.int64)


def build_ondisk(
    trained: Any, vectors: np.ndarray, n_shards: int, work_dir: Path, workers: Optional[int] = None
) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Fill ``trained`` (an empty, trained ``IndexRefine`` over IVF, see :func:`check_shardable`) with
    ``vectors`` the sharded way: ``n_shards`` copies of its IVF filled in parallel, merged into
    ``work_dir/index.ivfdata``, which ``trained``'s IVF then memory-maps. Labels are rows of ``vectors``.

    Args:
        trained: modified in place; afterwards it searches like the same index filled with ``add``.
        vectors: the catalog, L2-normalised float32.
        n_shards: how many shards to fill (each a contiguous slice, :func:`shard_bounds`).
        work_dir: an empty folder for the shard files (deleted after the merge) and the merged lists;
            it must outlive the index (a save copies or hard-links ``index.ivfdata`` from there).
        workers: threads filling shards at once (None: ``min(n_shards, os.cpu_count())``).

    Shape:
        - vectors: :math:`(N, D)`.

    Returns:
        ``(layout, timings)``: the manifest's layout record (``kind``, ``shards``, ``shard_sizes``) and the
        seconds spent filling shards (``shards_s``) and merging them (``merge_s``).
    """
    bounds = shard_bounds(len(vectors), n_shards)
    base = faiss.downcast_index(trained.base_index)
    work_dir = Path(work_dir)
    trained_path = work_dir / "trained.faiss"
    faiss.write_index(base, str(trained_path))  # what every shard starts from (another machine would read it)

    def fill(shard: int) -> str:
        start, stop = int(bounds[shard]), int(bounds[shard + 1])
        part = faiss.read_index(str(trained_path))
        part.add_with_ids(vectors[start:stop], np.arange(start, stop, dtype=np.int64))
        path = work_dir / f"shard-{shard:04d}.faiss"
        faiss.write_index(part, str(path))
        return str(path)

    started = time.perf_counter()
    workers = max(1, min(n_shards, workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        shard_paths = list(pool.map(fill, range(n_shards)))
    filled = time.perf_counter()
    merge_ondisk(base, shard_paths, str(work_dir / IVF_DATA_FILE))
    for path in [*shard_paths, str(trained_path)]:
        os.unlink(path)
    trained.refine_index.add(vectors)
    trained.ntotal = len(vectors)  # IndexRefine's own count: its parts were filled directly
    layout = {"kind": ONDISK_LAYOUT, "shards": int(n_shards), "shard_sizes": np.diff(bounds).tolist()}
    return layout, {"shards_s": filled - started, "merge_s": time.perf_counter() - filled}


def ivfdata_path(cpu_index: Any) -> Path:
    """The ``index.ivfdata`` file an on-disk index's IVF memory-maps."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(cpu_index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise ValueError(f"the index keeps its inverted lists in {type(lists).__name__}, not on disk")
    return Path(lists.filename)


def write_ondisk_files(version: Path, cpu_index: Any) -> None:
    """Write an on-disk index into a version folder: ``index.faiss`` (the IVF, pointing at
    ``index.ivfdata`` by name), ``refine.faiss``, and ``index.ivfdata`` hard-linked from where the index
    maps it (copied across file systems; its content never changes once merged). Every file is fsynced."""
    source = ivfdata_path(cpu_index)
    faiss.write_index(faiss.downcast_index(cpu_index.base_index), str(version / INDEX_FILE))
    faiss.write_index(faiss.downcast_index(cpu_index.refine_index), str(version / REFINE_FILE))
    target = version / IVF_DATA_FILE
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(source, target)
    for name in (INDEX_FILE, REFINE_FILE, IVF_DATA_FILE):
        fsync_path(version / name)


READ_FLAGS = faiss.IO_FLAG_SKIP_IVF_DATA
"""How ``index.faiss`` of an on-disk index is read: the list offsets, without mapping the lists file yet
(the file name it recorded is where the merge wrote it; :func:`attach_ondisk_files` maps the one beside it)."""


def attach_ondisk_files(base: Any, folder: Path) -> Any:
    """The searchable on-disk index of a version folder (every file's checksum already verified), from
    ``base``, its ``index.faiss`` read with :data:`READ_FLAGS`: the IVF's lists memory-mapped read-only from
    ``folder/index.ivfdata``, under an ``IndexRefine`` whose exact vectors are memory-mapped from
    ``folder/refine.faiss``. Nothing is ever written into the folder.

    Both mappings are advised random access: a search reads a few lists and a few dozen re-rank vectors,
    and the kernel's readahead (8 MiB per fault on some disks) would otherwise read whole files into
    memory for them.
    """
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(base).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise ValueError(f"{folder / INDEX_FILE} keeps its lists in {type(lists).__name__}, not in {IVF_DATA_FILE}")
    lists.filename = str(folder / IVF_DATA_FILE)
    lists.read_only = True
    lists.do_mmap()
    refine = faiss.read_index(str(folder / REFINE_FILE), faiss.IO_FLAG_MMAP_IFC)
    _advise_random(int(lists.ptr), int(lists.totsize))
    _advise_random(int(refine.codes.data()), int(refine.codes.size()))
    index = faiss.IndexRefine(base, refine)
    # The C++ IndexRefine frees both parts with itself; their Python wrappers must not free them too.
    index.own_fields = True
    base.this.disown()
    refine.this.disown()
    return index


def _advise_random(address: int, length: int) -> None:
    """madvise(MADV_RANDOM) over a mapping (rounded out to whole pages); a no-op where libc lacks it."""
    if length <= 0 or not hasattr(mmap, "MADV_RANDOM"):
        return
    page = mmap.PAGESIZE
    start = address - address % page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + address - start), mmap.MADV_RANDOM)


def ondisk_bytes(cpu_index: Any) -> int:
    """Bytes of the merged inverted lists file an on-disk index maps (not counted by ``faiss.write_index``)."""
    return ivfdata_path(cpu_index).stat().st_size
