"""Flat-index search speed, set against what the memory bus allows.

Exact (``flat``) search reads every catalog vector for every query block, so its floor is set by memory
bandwidth: one query cannot finish faster than ``N * D * 4 bytes / bandwidth``. Batched queries share
each pass over the catalog (FAISS multiplies query blocks against catalog blocks with BLAS), so batched
throughput is bounded by compute long before bandwidth. This module measures both, the bandwidth they
are compared with, and a plain numpy brute force as a sanity baseline.

Pure functions, no CLI: ``street2shop`` calls them and prints :func:`format_speed_table`.

Example:
    >>> result = flat_search_speed(n=2_000, dim=64, n_queries=50, n_single=20, bandwidth_bytes=1 << 24)
    >>> sorted(result)[:3]
    ['batched_bound_qps', 'batched_gflops', 'batched_qps']
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Tuple

import faiss
import numpy as np

from index import ProductIndex

_FAISS_QUERY_BLOCK = 4096
"""IndexFlat computes inner products in blocks of this many queries: one catalog pass per block."""


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 3, threads: int = 1) -> float:
    """Sustained read bandwidth of main memory as numpy sees it, in bytes per second.

    Sums a float32 array of ``n_bytes`` (much larger than any CPU cache, so every byte comes from DRAM)
    and keeps the best of ``repeats`` runs. With ``threads > 1`` the array is split into ``threads``
    contiguous chunks summed concurrently (numpy releases the GIL inside the reduction), which is how
    a multi-threaded scan such as a batched FAISS search reads memory; ``threads=1`` is what one core
    can pull, the relevant figure for a single query scanned by one thread.

    Args:
        n_bytes: size of the array scanned; at least a few hundred MB for a DRAM (not cache) figure.
        repeats: timed runs; the fastest is kept (the first touch of pages is not timed).
        threads: concurrent readers.

    Returns:
        Bytes per second of the best run.
    """
    if n_bytes < 4 or repeats < 1 or threads < 1:
        raise ValueError("n_bytes >= 4, repeats >= 1 and threads >= 1 are required")
    data = np.ones(n_bytes // 4, dtype=np.float32)  # np.ones writes every page, so none is lazily mapped
    chunks = np.array_split(data, threads)
    best = math.inf
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            if threads == 1:
                data.sum()
            else:
                list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def clustered_unit_vectors(
    n: int, dim: int, seed: int = 0, clustered: bool = True, n_clusters: Optional[int] = None
) -> np.ndarray:
    """Seeded L2-normalised float32 vectors: gaussian clusters (like a catalog of product families) or iid.

    Shape:
        - Output: :math:`(n, dim)` float32, unit rows.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    if clustered:
        n_clusters = n_clusters or max(1, int(math.sqrt(n)))
        centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
        # Noise of about half the centre norm: clusters are distinct but neighbours are not trivial.
        vectors *= 0.5
        vectors += centres[rng.integers(0, n_clusters, size=n)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def flat_search_speed(
    n: int = 100_000,
    dim: int = 512,
    n_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    clustered: bool = True,
    n_single: int = 200,
    device: str = "auto",
    bandwidth_bytes: int = 1 << 30,
) -> Dict[str, Any]:
    """Time a ``flat`` ProductIndex: build, batched QPS, single-query latency, and their memory bounds.

    Queries are perturbed catalog vectors (a street photo of a catalog product, in descriptor space).

    Args:
        n: catalog size N.
        dim: vector dimension D.
        n_queries: queries in the batched measurement (one ``search`` call).
        k: results per query.
        seed: seeds catalog and queries.
        clustered: gaussian clusters (True) or iid vectors.
        n_single: one-query searches timed for the latency percentiles.
        device: index placement, as for ``ProductIndex.build``.
        bandwidth_bytes: array size for :func:`measure_read_bandwidth`.

    Returns:
        A flat dict (times in s or ms as named, bandwidth in bytes/s), see :func:`format_speed_table`.
    """
    k = min(k, n)  # as ProductIndex.search does
    faiss_threads = faiss.omp_get_max_threads()
    bandwidth_1 = measure_read_bandwidth(bandwidth_bytes, threads=1)
    bandwidth_all = measure_read_bandwidth(bandwidth_bytes, threads=faiss_threads)

    catalog = clustered_unit_vectors(n, dim, seed=seed, clustered=clustered)
    rng = np.random.default_rng(seed + 1)
    queries = catalog[rng.integers(0, n, size=n_queries)] + 0.05 * rng.standard_normal(
        (n_queries, dim), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    product_ids = [f"p{i}" for i in range(n)]

    started = time.perf_counter()
    index = ProductIndex.build(catalog, product_ids, preset="flat", device=device)
    build_s = time.perf_counter() - started

    index.search(queries[:8], k)  # warm-up: thread pool start, first-call allocations
    batched_s, (_, faiss_ids) = _best_of(2, lambda: index.search(queries, k))

    single_ms = _single_query_ms(index, queries, k, n_single)
    # The same with one OpenMP thread: for a single query the fork/join of a thread team can cost more
    # than it saves (much more on a busy machine), and a server may well run one thread per request.
    single_ms_1thread = single_ms
    if faiss_threads > 1:
        faiss.omp_set_num_threads(1)
        try:
            single_ms_1thread = _single_query_ms(index, queries, k, n_single)
        finally:
            faiss.omp_set_num_threads(faiss_threads)

    numpy_s, numpy_rows = _best_of(1, lambda: numpy_top_k(catalog, queries, k))
    numpy_ids = np.array(product_ids, dtype=object)[numpy_rows]
    agreement = np.mean([len(set(a) & set(b)) / k for a, b in zip(faiss_ids, numpy_ids)])

    index_bytes = n * dim * 4
    catalog_passes = math.ceil(n_queries / _FAISS_QUERY_BLOCK)
    return {
        "n": n,
        "dim": dim,
        "n_queries": n_queries,
        "k": k,
        "clustered": clustered,
        "device": index.device,
        "faiss_threads": faiss_threads,
        "faiss_version": faiss.__version__,
        "cpu_count": os.cpu_count(),
        "build_s": build_s,
        "index_bytes": index_bytes,
        "batched_s": batched_s,
        "batched_qps": n_queries / batched_s,
        "batched_gflops": 2.0 * n * dim * n_queries / batched_s / 1e9,
        "single_p50_ms": float(np.percentile(single_ms, 50)),
        "single_p99_ms": float(np.percentile(single_ms, 99)),
        "single_qps": 1e3 / float(np.mean(single_ms)),
        "single_p50_ms_1thread": float(np.percentile(single_ms_1thread, 50)),
        "read_bandwidth_1thread_bytes_s": bandwidth_1,
        "read_bandwidth_all_threads_bytes_s": bandwidth_all,
        "single_bound_ms_1thread": index_bytes / bandwidth_1 * 1e3,
        "single_bound_ms_all_threads": index_bytes / bandwidth_all * 1e3,
        "batched_bound_qps": n_queries / (catalog_passes * index_bytes / bandwidth_all),
        "numpy_qps": n_queries / numpy_s,
        "numpy_topk_agreement": float(agreement),
    }


def format_speed_table(result: Dict[str, Any]) -> str:
    """A plain-text table of a :func:`flat_search_speed` result, with the bounds beside the measurements."""
    gb = 1e9
    header = (
        f"flat search speed: N={result['n']:,} x D={result['dim']}, {result['n_queries']} queries, "
        f"k={result['k']}, {'clustered' if result['clustered'] else 'iid'} vectors, "
        f"device={result['device']}, faiss {result['faiss_version']} with {result['faiss_threads']} threads"
    )
    rows = [
        ("index memory (N*D*4)", f"{result['index_bytes'] / 2**20:.1f}", "MiB"),
        ("build", f"{result['build_s']:.3f}", "s"),
        ("memory read bandwidth, 1 thread", f"{result['read_bandwidth_1thread_bytes_s'] / gb:.1f}", "GB/s"),
        (
            f"memory read bandwidth, {result['faiss_threads']} threads",
            f"{result['read_bandwidth_all_threads_bytes_s'] / gb:.1f}",
            "GB/s",
        ),
        ("single query latency p50", f"{result['single_p50_ms']:.2f}", "ms"),
        ("single query latency p99", f"{result['single_p99_ms']:.2f}", "ms"),
        ("single query latency p50, 1 faiss thread", f"{result['single_p50_ms_1thread']:.2f}", "ms"),
        ("single query bound (1 thread bandwidth)", f"{result['single_bound_ms_1thread']:.2f}", "ms"),
        ("single query bound (all-thread bandwidth)", f"{result['single_bound_ms_all_threads']:.2f}", "ms"),
        ("single queries, one after another", f"{result['single_qps']:.1f}", "queries/s"),
        ("batched (one search call)", f"{result['batched_qps']:.1f}", "queries/s"),
        ("batched, arithmetic rate", f"{result['batched_gflops']:.1f}", "GFLOP/s"),
        ("batched bound (bandwidth only)", f"{result['batched_bound_qps']:.1f}", "queries/s"),
        ("numpy brute force (matmul + argpartition)", f"{result['numpy_qps']:.1f}", "queries/s"),
        ("numpy vs faiss top-k agreement", f"{result['numpy_topk_agreement']:.4f}", ""),
    ]
    label_width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines = [header, "-" * len(header)]
    lines += [f"{label:<{label_width}}  {value:>{value_width}}  {unit}".rstrip() for label, value, unit in rows]
    return "\n".join(lines)


def _single_query_ms(index: ProductIndex, queries: np.ndarray, k: int, n_single: int) -> np.ndarray:
    """Latency in ms of ``n_single`` one-query ``search`` calls (cycling through ``queries``)."""
    times_ms = np.empty(n_single)
    for i in range(n_single):
        query = queries[i % len(queries) : i % len(queries) + 1]
        started = time.perf_counter()
        index.search(query, k)
        times_ms[i] = (time.perf_counter() - started) * 1e3
    return times_ms


def numpy_top_k(catalog: np.ndarray, queries: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Row indices of the k best catalog vectors per query, best first; query blocks bound memory."""
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ catalog.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        rows[start : start + block] = np.take_along_axis(top, order, axis=1)
    return rows


def _best_of(repeats: int, run) -> Tuple[float, Any]:
    best, output = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        output = run()
        best = min(best, time.perf_counter() - started)
    return best, output
