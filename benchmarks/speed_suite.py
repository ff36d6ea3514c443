"""Index speed suite: build time, memory, QPS, latency and recall of every preset at several catalog sizes.

For each catalog size N (default 10k, 100k and 1M vectors of dimension 512) the suite builds every index
preset over the same seeded vectors and reports, one row per preset:

- ``build_s`` (train + add + automatic tuning), with ``train_s`` and ``tune_s`` broken out;
- ``memory_bytes``: the serialised index (what ``index.faiss`` holds: vectors, codes, ids, centroids,
  graph), and ``memory_vs_flat``;
- ``qps``: batched throughput, all ``n_queries`` in one ``search`` call with every faiss thread;
- ``p50_ms`` / ``p99_ms``: single-query latency, one query per call, measured with ONE faiss thread
  (a server answering concurrent requests runs one thread per request, and on a busy CPU the fork/join
  of a thread team for one query costs more than it saves);
- ``recall_at_k`` against the exact (``flat``) results on the same queries, and ``speedup_vs_flat`` (QPS);
- the tuned search parameters (see ``ProductIndex.tune``: each approximate preset picks its own nprobe /
  re-rank depth / efSearch for recall@10 >= 0.95 on perturbed catalog vectors at build time).

Beside them, per N: the bound of flat search (``bound: flat``) and a plain numpy brute force (matmul +
argpartition, ``numpy brute force``). The bound's p50 is memory bandwidth: one query cannot finish before
the catalog has streamed through one core, ``N*D*4 / bandwidth_1thread`` (it only binds once the catalog
outgrows the last-level cache, reported in ``llc_mib``). Its QPS is the slower of two limits for a batch:
streaming the catalog once per 4096 queries at the all-thread bandwidth, and ``2*N*D`` flops per query
at the float32 matrix-multiply rate measured with numpy (``sgemm_gflops``); batched flat search is a
matrix multiply, so it is the second that binds. When faiss sees GPUs, ``gpu_qps``, ``gpu_p50_ms`` and
``gpu_recall_at_k`` are filled for the presets that have a GPU version (flat, ivfpq-rflat).

Data (:func:`descriptor_like_vectors`): a gaussian mixture on the unit sphere shaped like real image
descriptors rather than uniform noise. Centres and within-cluster offsets share one anisotropic
covariance with a power-law spectrum (eigenvalue j proportional to 1/j, a randomly rotated basis), so
most of the variance lies in a few dozen directions (effective dimension (sum s)^2 / sum s^2 = 28 at
D=512), like the decaying PCA spectra of CNN descriptors and unlike uniform noise, which spreads it
evenly over all 512; cluster sizes are skewed (Zipf-like weights); the within-cluster spread (0.7 of the
centre norm) puts a query's nearest neighbour at cosine ~0.8, its cluster at ~0.67 and unrelated vectors
at ~0. Queries are further draws from the same mixture, not perturbed copies of catalog vectors, so the exact top-10 are
genuine neighbours with close scores (10th and 11th differ by ~0.002), not one obvious duplicate.

Timings on a shared machine: with more runnable threads than cores, OpenMP threads that spin while
waiting slow every parallel faiss call (k-means was ~8x slower here with two threads on a loaded
2-core machine); run with ``OMP_WAIT_POLICY=PASSIVE`` there, and read ``load_avg_1min``.

Example:
    >>> frame = index_speed_suite(sizes=(2_000,), dim=32, n_queries=50, n_single=5, sgemm_size=256)
    >>> print(format_speed_suite(frame))  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import pandas as pd

from benchmarks.search_speed import measure_read_bandwidth, numpy_top_k
from index import ProductIndex
from index.device import faiss_gpu_count

_FAISS_QUERY_BLOCK = 4096
"""IndexFlat computes inner products in blocks of this many queries: one catalog pass per block."""

BOUND_ROW = "bound: flat"
NUMPY_ROW = "numpy brute force"

GENERATOR_DESCRIPTION = (
    "gaussian mixture on the unit sphere: clip(N/100, 1000, 10000) centres, Zipf(0.5) cluster sizes, "
    "shared covariance with power-law spectrum (eigenvalue_j ~ 1/j, random rotation), within-cluster "
    "spread 0.7; queries = fresh draws from the same mixture"
)


def descriptor_like_vectors(
    n: int,
    dim: int,
    n_centres: Optional[int] = None,
    seed: int = 0,
    spectrum_decay: float = 1.0,
    spread: float = 0.7,
    size_skew: float = 0.5,
    block: int = 65536,
) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors from a gaussian mixture shaped like image descriptors (see the module docstring).

    Each vector is ``normalise(c + spread * e)`` where ``c`` is its (unit) cluster centre and ``e`` a
    gaussian offset; centres and offsets are drawn with covariance ``R^T diag(s) R`` (``s_j ~ j^-decay``,
    summing to 1, ``R`` a random rotation), so ``spread`` is the offset's expected norm relative to the
    centre's. Rows are generated in blocks into one preallocated array: memory is the output plus one block.

    Args:
        n: number of vectors.
        dim: dimension D.
        n_centres: mixture components; None means ``clip(n / 100, 1000, 10000)`` (at most n).
        seed: seeds everything.
        spectrum_decay: exponent of the power-law spectrum; 0 gives isotropic (uniform-noise) clusters.
        spread: expected norm of the within-cluster offset relative to the centre.
        size_skew: cluster weights are ``rank ** -size_skew`` (0: equal sizes).
        block: rows generated at a time.

    Returns:
        ``(vectors, labels)``: float32 unit rows and the int64 component of each.

    Shape:
        - vectors: :math:`(n, dim)`; labels: :math:`(n,)`.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"n and dim must be >= 1, got n={n}, dim={dim}")
    if n_centres is None:
        n_centres = int(np.clip(n // 100, 1000, 10000))
    n_centres = max(1, min(n_centres, n))
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, dim + 1, dtype=np.float64) ** (-spectrum_decay)
    spectrum /= spectrum.sum()
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    # Row j of basis is sqrt(s_j) times the j-th rotated axis: z @ basis has covariance R^T diag(s) R.
    basis = (np.sqrt(spectrum)[:, None] * rotation).astype(np.float32)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32) @ basis
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    weights = rng.permutation(np.arange(1, n_centres + 1, dtype=np.float64) ** (-size_skew))
    labels = rng.choice(n_centres, size=n, p=weights / weights.sum())
    vectors = np.empty((n, dim), dtype=np.float32)
    offset_basis = basis * np.float32(spread)
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = rng.standard_normal((stop - start, dim), dtype=np.float32) @ offset_basis
        rows += centres[labels[start:stop]]
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        vectors[start:stop] = rows
    return vectors, labels


def measure_sgemm_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Float32 matrix-multiply rate of numpy's BLAS (all its threads), in GFLOP/s: best of ``repeats``
    products of two ``size x size`` matrices (the first, untimed, warms up the thread pool)."""
    rng = np.random.default_rng(0)
    left = rng.standard_normal((size, size), dtype=np.float32)
    right = rng.standard_normal((size, size), dtype=np.float32)
    left @ right
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best / 1e9


def last_level_cache_bytes() -> Optional[int]:
    """Size of CPU 0's largest cache from Linux sysfs, or None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KM")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def index_speed_suite(
    sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    dim: int = 512,
    presets: Sequence[str] = ("flat", "ivfpq", "hnsw"),
    n_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    n_single: int = 200,
    single_budget_s: float = 30.0,
    target_recall: float = 0.95,
    bandwidth_bytes: int = 1 << 30,
    sgemm_size: int = 2048,
    progress: Optional[Callable[[str], None]] = None,
) -> pd.DataFrame:
    """Build and time every preset at every catalog size; one row per (N, preset) plus bound and numpy rows.

    ``flat`` always runs (it is the reference for recall and speedup), whether listed or not. Indexes are
    built, measured and freed one at a time, so memory peaks at about 3x the float32 catalog (the
    catalog, ProductIndex's normalised copy during build, and one index): ~6.5 GB at 1M x 512.

    Args:
        sizes: catalog sizes N.
        dim: vector dimension D.
        presets: index presets to measure (``ProductIndex`` names).
        n_queries: fresh queries for the batched QPS and the recall.
        k: results per query (recall@k against flat).
        seed: seeds the data (the same catalog for every preset at one N).
        n_single: single-query searches timed for p50/p99 (fewer when they exceed ``single_budget_s``;
            at least 20). The count used is in ``n_single``.
        single_budget_s: time allowed for the single-query timings of one index.
        target_recall: recall@10 the approximate presets tune themselves for at build time.
        bandwidth_bytes: array size for the memory-bandwidth measurement.
        sgemm_size: matrix size for the matrix-multiply rate (:func:`measure_sgemm_gflops`).
        progress: called with one line per step (e.g. ``print``), or None.

    Returns:
        DataFrame with columns N, dim, preset, factory_string, search_params, build_s, train_s, tune_s,
        memory_bytes, memory_vs_flat, qps, p50_ms, p99_ms, n_single, recall_at_k, speedup_vs_flat,
        tuned_recall, gpu_qps, gpu_p50_ms, gpu_recall_at_k, and machine columns (faiss_threads,
        cpu_count, load_avg_1min, gpus, faiss_version, bandwidth_1thread_gbs, bandwidth_all_threads_gbs,
        sgemm_gflops, llc_mib, n_queries, k, generator).
    """
    say = progress or (lambda line: None)
    threads = faiss.omp_get_max_threads()
    say(f"measuring memory read bandwidth ({bandwidth_bytes / 2**20:.0f} MiB array)")
    bandwidth_1 = measure_read_bandwidth(bandwidth_bytes, threads=1)
    bandwidth_all = measure_read_bandwidth(bandwidth_bytes, threads=threads)
    sgemm_gflops = measure_sgemm_gflops(sgemm_size)
    llc = last_level_cache_bytes()
    gpus = faiss_gpu_count()
    machine = {
        "faiss_threads": threads,
        "cpu_count": os.cpu_count(),
        "faiss_version": faiss.__version__,
        "gpus": gpus,
        "bandwidth_1thread_gbs": bandwidth_1 / 1e9,
        "bandwidth_all_threads_gbs": bandwidth_all / 1e9,
        "sgemm_gflops": sgemm_gflops,
        "llc_mib": llc / 2**20 if llc else float("nan"),
        "n_queries": n_queries,
        "k": k,
        "generator": GENERATOR_DESCRIPTION,
    }
    approximate = [preset for preset in dict.fromkeys(presets) if preset != "flat"]
    rows: List[Dict[str, Any]] = []
    for n in sizes:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        say(f"N={n:,}: generating {n + n_queries:,} x {dim} vectors (load average {load:.1f})")
        data, _ = descriptor_like_vectors(n + n_queries, dim, seed=seed)
        catalog, queries = data[:n], data[n:]  # views: the catalog is the leading, contiguous block
        product_ids = [f"p{i}" for i in range(n)]
        k_n = min(k, n)
        common = dict(machine, N=n, dim=dim, load_avg_1min=load)

        say(f"N={n:,}: flat")
        flat_row, exact_labels = _measure_preset(
            "flat", catalog, product_ids, queries, k_n, None, n_single, single_budget_s, target_recall, seed, gpus
        )
        flat_row.update(recall_at_k=1.0, speedup_vs_flat=1.0, memory_vs_flat=1.0)
        flat_qps, flat_bytes = flat_row["qps"], flat_row["memory_bytes"]
        rows.append(dict(common, **flat_row))

        catalog_bytes = n * dim * 4
        passes = math.ceil(n_queries / _FAISS_QUERY_BLOCK)
        stream_s = passes * catalog_bytes / bandwidth_all
        compute_s = 2.0 * n * dim * n_queries / (sgemm_gflops * 1e9)
        rows.append(
            dict(
                common,
                preset=BOUND_ROW,
                factory_string=f"QPS: {'compute' if compute_s >= stream_s else 'bandwidth'}-bound; p50: bandwidth",
                memory_bytes=catalog_bytes,
                memory_vs_flat=catalog_bytes / flat_bytes,
                qps=n_queries / max(stream_s, compute_s),
                p50_ms=catalog_bytes / bandwidth_1 * 1e3,
                speedup_vs_flat=n_queries / max(stream_s, compute_s) / flat_qps,
            )
        )

        say(f"N={n:,}: numpy brute force")
        started = time.perf_counter()
        numpy_rows = numpy_top_k(catalog, queries, k_n, block=64)
        numpy_s = time.perf_counter() - started
        rows.append(
            dict(
                common,
                preset=NUMPY_ROW,
                factory_string="queries @ catalog.T, argpartition",
                memory_bytes=catalog_bytes,
                memory_vs_flat=catalog_bytes / flat_bytes,
                qps=n_queries / numpy_s,
                speedup_vs_flat=n_queries / numpy_s / flat_qps,
                recall_at_k=float(np.mean(_recall_per_query(numpy_rows, exact_labels))),
            )
        )

        for preset in approximate:
            say(f"N={n:,}: {preset} (build, tune for recall@10 >= {target_recall}, measure)")
            row, _ = _measure_preset(
                preset,
                catalog,
                product_ids,
                queries,
                k_n,
                exact_labels,
                n_single,
                single_budget_s,
                target_recall,
                seed,
                gpus,
            )
            row.update(memory_vs_flat=row["memory_bytes"] / flat_bytes, speedup_vs_flat=row["qps"] / flat_qps)
            rows.append(dict(common, **row))
            say(
                f"N={n:,}: {preset}: {row['qps']:.0f} QPS ({row['speedup_vs_flat']:.1f}x flat), recall@{k_n} "
                f"{row['recall_at_k']:.3f}, {row['memory_vs_flat']:.0%} of flat's memory"
            )
        del data, catalog, queries, product_ids
        gc.collect()
    return pd.DataFrame(rows, columns=_COLUMNS)


_COLUMNS = [
    "N",
    "dim",
    "preset",
    "factory_string",
    "search_params",
    "build_s",
    "train_s",
    "tune_s",
    "memory_bytes",
    "memory_vs_flat",
    "qps",
    "p50_ms",
    "p99_ms",
    "n_single",
    "recall_at_k",
    "speedup_vs_flat",
    "tuned_recall",
    "gpu_qps",
    "gpu_p50_ms",
    "gpu_recall_at_k",
    "faiss_threads",
    "cpu_count",
    "load_avg_1min",
    "gpus",
    "faiss_version",
    "bandwidth_1thread_gbs",
    "bandwidth_all_threads_gbs",
    "sgemm_gflops",
    "llc_mib",
    "n_queries",
    "k",
    "generator",
]


def _measure_preset(
    preset: str,
    catalog: np.ndarray,
    product_ids: List[str],
    queries: np.ndarray,
    k: int,
    exact_labels: Optional[np.ndarray],
    n_single: int,
    single_budget_s: float,
    target_recall: float,
    seed: int,
    gpus: int,
) -> Tuple[Dict[str, Any], np.ndarray]:
    """Build one preset on the CPU, time it, free it. Returns its row and its top-k labels (Q, k)."""
    started = time.perf_counter()
    index = ProductIndex.build(
        catalog, product_ids, preset=preset, device="cpu", target_recall=target_recall, seed=seed
    )
    build_s = time.perf_counter() - started
    timings = index.build_timings or {}
    labels = _labels(index, queries, k)  # also the warm-up: thread pool start, first-call allocations
    batched_s = _best_batched_seconds(index, queries, k)
    single_ms = _single_query_ms(index, queries, k, n_single, single_budget_s)
    tuning = index.tuning or {}
    row: Dict[str, Any] = {
        "preset": preset,
        "factory_string": index.factory_string,
        "search_params": " ".join(f"{key}={value}" for key, value in index.search_params.items()),
        "build_s": build_s,
        "train_s": timings.get("train_s"),
        "tune_s": timings.get("tune_s"),
        "memory_bytes": index.serialized_size(),
        "qps": len(queries) / batched_s,
        "p50_ms": float(np.percentile(single_ms, 50)),
        "p99_ms": float(np.percentile(single_ms, 99)),
        "n_single": len(single_ms),
        "tuned_recall": tuning.get("recall"),
    }
    if exact_labels is not None:
        row["recall_at_k"] = float(np.mean(_recall_per_query(labels, exact_labels)))
    if gpus > 0 and index.use_device("cuda") == "cuda":
        gpu_labels = _labels(index, queries, k)  # first call clones the index to the GPU: untimed
        row["gpu_qps"] = len(queries) / _best_batched_seconds(index, queries, k)
        row["gpu_p50_ms"] = float(np.percentile(_single_query_ms(index, queries, k, n_single, single_budget_s), 50))
        reference = exact_labels if exact_labels is not None else labels
        row["gpu_recall_at_k"] = float(np.mean(_recall_per_query(gpu_labels, reference)))
        index.use_device("cpu")
    del index
    gc.collect()
    return row, labels


def _labels(index: ProductIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k catalog rows (FAISS labels; -1 where nothing was found) of one batched search."""
    _, ids = index.search(queries, k)
    # Product ids are "p<row>", so the row is recoverable without a reverse map of N entries.
    return np.array([[int(pid[1:]) if pid is not None else -1 for pid in row] for row in ids], dtype=np.int64)


def _best_batched_seconds(index: ProductIndex, queries: np.ndarray, k: int) -> float:
    """Seconds of one batched search call, best of two (one when a call takes over 5 s)."""
    best = math.inf
    for attempt in range(2):
        started = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - started)
        if best > 5.0:
            break
    return best


def _single_query_ms(
    index: ProductIndex, queries: np.ndarray, k: int, n_single: int, budget_s: float, min_count: int = 20
) -> np.ndarray:
    """Latency in ms of one-query searches with ONE faiss thread, cycling through ``queries``; stops
    after ``n_single`` or once ``budget_s`` is spent (but not before ``min_count``)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times_ms: List[float] = []
    try:
        deadline = time.perf_counter() + budget_s
        for i in range(n_single):
            query = queries[i % len(queries) : i % len(queries) + 1]
            started = time.perf_counter()
            index.search(query, k)
            times_ms.append((time.perf_counter() - started) * 1e3)
            if len(times_ms) >= min_count and time.perf_counter() > deadline:
                break
    finally:
        faiss.omp_set_num_threads(threads)
    return np.array(times_ms)


def _recall_per_query(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Share of each row of ``exact`` found in the same row of ``found``.

    Shape:
        - found, exact: :math:`(Q, k)` int labels (-1 = nothing).
        - Output: :math:`(Q,)`.
    """
    hits = (found[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return hits.any(axis=1).sum(axis=1) / exact.shape[1]


_DISPLAY = [
    # column, header, format
    ("preset", "preset", "{}"),
    *((f"{step}_s", f"{step} s", "{:.1f}") for step in ("build", "train", "tune")),
    ("memory_bytes", "memory MiB", "{:.1f}"),
    ("memory_vs_flat", "mem/flat", "{:.0%}"),
    ("qps", "QPS batched", "{:,.0f}"),
    ("speedup_vs_flat", "x flat", "{:.1f}"),
    *((f"{quantile}_ms", f"{quantile} ms 1thr", "{:.3f}") for quantile in ("p50", "p99")),
    ("recall_at_k", "recall@k", "{:.4f}"),
    ("search_params", "tuned params", "{}"),
]
_GPU_DISPLAY = [
    ("gpu_qps", "GPU QPS", "{:,.0f}"),
    ("gpu_p50_ms", "GPU p50 ms", "{:.3f}"),
    ("gpu_recall_at_k", "GPU recall@k", "{:.4f}"),
]


def format_speed_suite(frame: pd.DataFrame) -> str:
    """Plain-text tables of an :func:`index_speed_suite` result, one per N, with a header on the machine."""
    return _render(frame, markdown=False)


def speed_suite_markdown(frame: pd.DataFrame) -> str:
    """The same tables as :func:`format_speed_suite`, in Markdown."""
    return _render(frame, markdown=True)


def write_speed_suite(frame: pd.DataFrame, out_dir: str | Path) -> Tuple[Path, Path]:
    """Write ``speed_suite.csv`` (every column) and ``speed_suite.md`` (the readable tables) to ``out_dir``.

    Returns:
        The two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "speed_suite.csv", out_dir / "speed_suite.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(speed_suite_markdown(frame) + "\n", encoding="utf-8")
    return csv_path, md_path


def _render(frame: pd.DataFrame, markdown: bool) -> str:
    if frame.empty:
        return "index speed suite: no rows"
    first = frame.iloc[0]
    display = list(_DISPLAY)
    if frame[[column for column, _, _ in _GPU_DISPLAY]].notna().any().any():
        display += _GPU_DISPLAY
    header = [
        f"index speed suite: D={first['dim']}, {first['n_queries']} queries, k={first['k']}; faiss "
        f"{first['faiss_version']}, {first['faiss_threads']} faiss threads, {first['cpu_count']} CPUs, "
        f"{first['gpus']} GPUs; memory read bandwidth {first['bandwidth_1thread_gbs']:.1f} GB/s (1 thread), "
        f"{first['bandwidth_all_threads_gbs']:.1f} GB/s (all threads); numpy sgemm "
        f"{first['sgemm_gflops']:.0f} GFLOP/s; last-level cache {first['llc_mib']:.0f} MiB",
        f"data: {first['generator']}",
        "QPS: all queries in one search call, all faiss threads. p50/p99: one query per call, ONE faiss "
        "thread. recall@k and 'x flat' against flat on the same queries. memory: serialised index size.",
        f"'{BOUND_ROW}': QPS = the slower of streaming the catalog once per 4096 queries and 2*N*D flops per "
        "query at the sgemm rate; p50 = one pass over the catalog at 1-thread bandwidth (binds only for "
        "catalogs larger than the last-level cache).",
    ]
    blocks = ["\n".join(("> " if markdown else "") + line for line in header)]
    for n, group in frame.groupby("N", sort=False):
        title = f"N = {n:,} (load average {group['load_avg_1min'].iloc[0]:.1f} when it started)"
        cells = [
            [_cell(row.get(column), fmt, column) for column, _, fmt in display] for row in group.to_dict("records")
        ]
        headers = [name for _, name, _ in display]
        blocks.append((f"### {title}" if markdown else title) + "\n" + _table(headers, cells, markdown))
    return "\n\n".join(blocks)


def _cell(value: Any, fmt: str, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "memory_bytes":
        value = value / 2**20
    return fmt.format(value)


def _table(headers: List[str], cells: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(headers) - 2) + ["---"]) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]

    def line(values: List[str]) -> str:
        parts = [values[0].ljust(widths[0])] + [value.rjust(width) for value, width in zip(values[1:-1], widths[1:-1])]
        return "  ".join(parts + [values[-1].ljust(widths[-1])]).rstrip()

    return "\n".join([line(headers), "  ".join("-" * width for width in widths)] + [line(row) for row in cells])
