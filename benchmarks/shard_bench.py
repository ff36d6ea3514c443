"""Sharded on-disk index against one in-memory index: recall@k, resident memory, build time, QPS.

The measurement behind ``street2shop bench-shards`` (issue 16): a seeded descriptor-like catalog
(:func:`benchmarks.speed_suite.descriptor_like_vectors`, default 1M x 512) is indexed twice with the
``ivfpq-rflat`` preset:

- ``single``: one in-memory index, its search parameters tuned for recall@10 >= 0.95 (``ProductIndex.build``);
- ``ondisk``: the same preset and seed built as N shards filled in parallel and merged into one memory-mapped
  index (``index.ondisk``), searched with the single index's tuned parameters (the same parameters).

Both are saved, then each is loaded in a fresh Python process (so one's memory cannot hide in the other's
numbers) that searches the held-out queries twice and reports its memory from ``/proc/self/status``:
``RssAnon`` (memory the process owns: what the index costs), ``RssFile`` (pages of mapped files that are
resident: page cache, shared by every process mapping the index and dropped by the kernel under memory
pressure) and ``VmHWM`` (peak resident). Before the first pass the index files are evicted from the page
cache (``posix_fadvise(DONTNEED)``), so ``cold_qps`` reads from disk and ``RssFile`` counts only the pages
the searches touched. recall@k is against exact search (``faiss.knn``) over the same catalog.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import faiss
import numpy as np

from benchmarks.speed_suite import GENERATOR_DESCRIPTION, descriptor_like_vectors
from index import ProductIndex
from index.storage import live_version_dir
from retrieval.files import write_text_atomic

PRESET = "ivfpq-rflat"
_MEMORY_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def shard_bench(
    n: int = 1_000_000,
    dim: int = 512,
    shards: int = 4,
    work_dir: Optional[os.PathLike] = None,  # where both indexes are saved (default: a temporary folder)
    n_queries: int = 1000,
    k: int = 10,
    target_recall: float = 0.95,
    seed: int = 0,
    progress: Callable[[str], None] = lambda line: None,
) -> Dict[str, Any]:
    """Build, save and measure the single and the sharded on-disk index (see the module docstring).

    Args:
        n: catalog size N.
        dim: vector dimension D.
        shards: shards of the on-disk build (filled in parallel threads).
        n_queries: held-out queries (fresh draws of the same mixture).
        k: the k of recall@k.
        target_recall: what the single index tunes its search parameters for.
        seed: seeds the data, the training sample and the tuning sample.
        work_dir: where both indexes are saved (about 2 x N x D x 4 bytes); None: a temporary folder,
            deleted afterwards.
        progress: called with one line per step.

    Returns:
        ``{"n", "dim", "shards", "n_queries", "k", "preset", "factory_string", "search_params", "generator",
        "faiss_threads", "cpu_count", "single": {...}, "ondisk": {...}, "recall_gap"}`` where each side holds
        ``build_s`` (and its parts), ``disk_bytes`` (its saved files), ``recall_at_k``, ``cold_qps``,
        ``warm_qps`` and the memory keys in MiB (``rss_anon_mib``, ``rss_file_mib``, ``vm_rss_mib``,
        ``vm_hwm_mib``); ``recall_gap`` is single minus on-disk recall.
    """
    with tempfile.TemporaryDirectory(prefix="street2shop-bench-shards-", dir=work_dir) as scratch:
        scratch = Path(scratch)
        progress(f"generating {n + n_queries:,} x {dim} descriptor-like vectors")
        data, _ = descriptor_like_vectors(n + n_queries, dim, seed=seed)
        catalog, queries = data[:n], np.ascontiguousarray(data[n:])
        progress(f"exact top-{k} of {n_queries} queries (faiss.knn)")
        _, exact = faiss.knn(queries, catalog, k, faiss.METRIC_INNER_PRODUCT)
        np.save(scratch / "queries.npy", queries)
        np.save(scratch / "exact.npy", exact)
        ids = [f"p{i}" for i in range(n)]
        report: Dict[str, Any] = {
            "n": n,
            "dim": dim,
            "shards": shards,
            "n_queries": n_queries,
            "k": k,
            "preset": PRESET,
            "generator": GENERATOR_DESCRIPTION,
            "faiss_threads": faiss.omp_get_max_threads(),
            "cpu_count": os.cpu_count(),
        }

        progress(f"single in-memory {PRESET}: build and tune for recall@{k} >= {target_recall}")
        started = time.perf_counter()
        single = ProductIndex.build(catalog, ids, preset=PRESET, device="cpu", target_recall=target_recall, seed=seed)
        single_row = {"build_s": time.perf_counter() - started, **single.build_timings}
        params = single.search_params
        report.update(factory_string=single.factory_string, search_params=params)
        single.save(scratch / "single")
        del single
        gc.collect()

        progress(f"{shards} shards merged on disk: build (same preset and seed), search with {params}")
        started = time.perf_counter()
        merged = ProductIndex.build(
            catalog, ids, preset=PRESET, device="cpu", target_recall=None, seed=seed, shards=shards, work_dir=scratch
        )
        merged.use_search_params(params)
        ondisk_row = {"build_s": time.perf_counter() - started, **merged.build_timings}
        merged.save(scratch / "ondisk")
        del merged, data, catalog
        gc.collect()

        for name, row in (("single", single_row), ("ondisk", ondisk_row)):
            progress(f"{name}: load in a fresh process, search {n_queries} queries cold then warm, read its memory")
            row.update(measure_in_subprocess(scratch / name, scratch / "queries.npy", scratch / "exact.npy", k))
            report[name] = row
        report["recall_gap"] = report["single"]["recall_at_k"] - report["ondisk"]["recall_at_k"]
        return report


def measure_in_subprocess(directory: Path, queries_path: Path, exact_path: Path, k: int) -> Dict[str, Any]:
    """:func:`measure_loaded` in a fresh Python process (this module run as a script); its JSON result."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.shard_bench", str(directory), str(queries_path), str(exact_path), str(k)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")]))),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measuring {directory} failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_loaded(directory: Path, queries: np.ndarray, exact: np.ndarray, k: int) -> Dict[str, Any]:
    """Load the index saved in ``directory`` (in this process: call it in a fresh one), evict its files from
    the page cache, search ``queries`` twice (cold, then warm), and report recall@k, QPS and memory."""
    index = ProductIndex.load(directory, device="cpu")
    version = live_version_dir(directory)
    files = sorted(path for path in version.iterdir() if path.suffix in (".faiss", ".ivfdata"))
    for path in files:  # checksumming at load read them: start from a cold page cache
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        _, found = index.search(queries, k)
        timings.append(time.perf_counter() - started)
    labels = np.array([[int(pid[1:]) if pid is not None else -1 for pid in row] for row in found], dtype=np.int64)
    hits = (labels[:, :, None] == exact[:, None, :]).any(axis=1).sum(axis=1) / exact.shape[1]
    memory = _memory_mib()
    return {
        "layout": index.layout["kind"],
        "disk_bytes": sum(path.stat().st_size for path in files),
        "recall_at_k": float(hits.mean()),
        "cold_qps": len(queries) / timings[0],
        "warm_qps": len(queries) / timings[1],
        "rss_anon_mib": memory["RssAnon"],
        "rss_file_mib": memory["RssFile"],
        "vm_rss_mib": memory["VmRSS"],
        "vm_hwm_mib": memory["VmHWM"],
    }


def format_shard_bench(report: Dict[str, Any]) -> str:
    """A Markdown table of a :func:`shard_bench` report, one row per index, with a header on the setup."""
    lines = [
        f"> {report['n']:,} x {report['dim']} ({report['generator']}); {report['n_queries']} held-out queries; "
        f"preset {report['preset']} ({report['factory_string']}), search parameters {report['search_params']} "
        f"(tuned on the single index for recall@{report['k']} >= 0.95, used by both); faiss "
        f"{report['faiss_threads']} threads, {report['cpu_count']} CPUs",
        "",
        f"| index | build s | of which shards / merge s | on disk MiB | recall@{report['k']} | cold QPS | warm QPS "
        "| RssAnon MiB | RssFile MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("single", "one in-memory index"), ("ondisk", f"{report['shards']} shards merged on disk")):
        row = report[name]
        parts = f"{row['shards_s']:.0f} / {row['merge_s']:.1f}" if "shards_s" in row else ""
        lines.append(
            f"| {label} | {row['build_s']:.0f} | {parts} | {row['disk_bytes'] / 2**20:,.0f} | {row['recall_at_k']:.4f} "
            f"| {row['cold_qps']:,.0f} | {row['warm_qps']:,.0f} | {row['rss_anon_mib']:,.0f} "
            f"| {row['rss_file_mib']:,.0f} | {row['vm_hwm_mib']:,.0f} |"
        )
    lines.append("")
    lines.append(f"recall@{report['k']} gap (single - on disk): {report['recall_gap']:+.4f}")
    return "\n".join(lines)


def write_shard_bench(report: Dict[str, Any], out_dir: os.PathLike) -> Path:
    """Write ``shards.json`` and ``shards.md`` into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "shards.json", json.dumps(report, indent=1) + "\n")
    return write_text_atomic(out_dir / "shards.md", format_shard_bench(report) + "\n")


def _memory_mib() -> Dict[str, float]:
    """This process's memory counters of ``_MEMORY_KEYS`` from /proc/self/status, in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in _MEMORY_KEYS:
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values


def _root() -> str:
    """The folder holding the ``benchmarks`` package, so the child imports this same code."""
    return str(Path(__file__).resolve().parents[1])


if __name__ == "__main__":  # the child process of measure_in_subprocess
    directory_arg, queries_arg, exact_arg, k_arg = sys.argv[1:5]
    result = measure_loaded(Path(directory_arg), np.load(queries_arg), np.load(exact_arg), int(k_arg))
    print(json.dumps(result))
