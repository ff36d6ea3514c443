"""`street2shop index --engine ray`: the catalog's product photos embedded on a Ray cluster.

Needs the optional `distributed` extra: ``pip install -e ".[distributed]"`` (Ray with Ray Data).

Ray Data reads the (image content hash, path) rows of the photos not embedded yet; an actor pool (one actor
per GPU when the cluster has GPUs, else one per CPU) rebuilds the descriptor from its state and embeds them in
batches with `retrieval.features.extract_features`, the local engine's own loop, so both engines give the same
vectors. The driver writes each batch that comes back as one Parquet shard (columns ``key``: SHA-1 of the
image's bytes, ``vector``: float32 x D) under ``<feature cache>/<descriptor>-<fingerprint>/ray-shards/``,
atomically: a killed job leaves whole shards only, and the next run embeds only the photos no shard holds.
Catalog photos never go through the proxy (as in `street2shop.engine.build_index`).

On a cluster of several machines (``--address auto`` or ``ray://HOST:PORT``), every node needs this package
installed and the catalog's image paths readable; shards are written by the driver, so only it needs the
cache directory.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from retrieval.descriptors import Descriptor
from retrieval.features import FeatureCache, extract_features
from retrieval.files import file_sha1, write_bytes_atomic
from street2shop.engine import descriptor_from_state, descriptor_metadata, descriptor_state_bytes

log = logging.getLogger("street2shop")
DISTRIBUTED_EXTRA_HINT = 'pip install -e ".[distributed]"'
SHARD_FOLDER = "ray-shards"


class MissingDistributedExtraError(RuntimeError):
    """`--engine ray` without the `distributed` extra installed."""


def require_ray():
    """The `ray` module (with Ray Data), or `MissingDistributedExtraError` naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs ray[data]; plain ray lacks it)
    except ImportError as error:
        raise MissingDistributedExtraError(
            f"--engine ray needs the optional 'distributed' extra, which is not installed ({error}): "
            f"run {DISTRIBUTED_EXTRA_HINT} in the project directory, or use --engine local"
        ) from error
    return ray


def shard_directory(cache_dir: os.PathLike, descriptor: Descriptor) -> Path:
    """Where the shards of this descriptor's catalog vectors go (name and `catalog_fingerprint`: its weights, fitted
    state and catalog options)."""
    return Path(cache_dir) / f"{descriptor.name}-{descriptor.catalog_fingerprint()}" / SHARD_FOLDER


def write_shard(directory: Path, keys: Sequence[str], vectors: np.ndarray) -> Path:
    """One batch -> ``part-<sha1 of its keys>.parquet``, written atomically (readers never see half a shard).

    Args:
        keys: N image content hashes.
        vectors: (N, D) float32, row i for keys[i].
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"key": pa.array(list(keys), pa.string()), "vector": column})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return write_bytes_atomic(directory / f"part-{FeatureCache.chunk_key(keys)}.parquet", buffer.getvalue())


def read_shards(directory: Path, dim: int) -> Dict[str, np.ndarray]:
    """Every vector the shards under `directory` hold: content hash -> (D,) float32.

    A shard that cannot be read, or holds vectors of another width or non-finite ones, is deleted with one
    warning naming it: its photos are embedded again.
    """
    found: Dict[str, np.ndarray] = {}
    refused: List[str] = []
    for path in sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []:
        try:
            table = pq.read_table(path)
            keys = table.column("key").to_pylist()
            vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32)
            vectors = vectors.reshape(len(keys), -1) if keys else vectors.reshape(0, dim)
            if vectors.shape[1] != dim or not np.isfinite(vectors).all():
                raise ValueError(f"vectors of width {vectors.shape[1]} (expected {dim}) or not finite")
        except Exception as error:  # noqa: BLE001  (pyarrow raises many types for a damaged file)
            refused.append(f"{path.name} ({type(error).__name__}: {error})")
            path.unlink(missing_ok=True)
            continue
        found.update(zip(keys, vectors))
    if refused:
        warnings.warn(f"{directory}: {len(refused)} damaged shard(s) deleted, re-embedded: {refused[:3]}")
    return found


class _EmbedBatches:
    """The Ray Data actor: rebuilds the descriptor once, then embeds one batch of (key, path) rows per call."""

    def __init__(self, metadata: Dict[str, Any], state: bytes, batch_size: int):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = torch.load(io.BytesIO(state), map_location=device, weights_only=True)
        self.descriptor = descriptor_from_state(metadata, loaded, device, "the state sent to a Ray worker").eval()
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with torch.no_grad():
            vectors = extract_features(
                self.descriptor.embed_catalog,
                [str(p) for p in batch["path"]],
                self.descriptor.input_spec.size,
                batch_size=self.batch_size,
                device=self.descriptor.device,
                dim=self.descriptor.dim,
                workers=0,  # the actor pool is the parallelism: each actor decodes its own batch
            )
        return {"key": batch["key"], "vector": vectors}


class RayEmbedder:
    """`build_index`'s ``embed_catalog`` for ``--engine ray``: paths -> (N, D) float32, resumable from shards.

    ``address``: None starts a local Ray cluster for the job (and stops it after); "auto" or
    ``ray://HOST:PORT`` joins a running one. An already initialised Ray (a test's, a notebook's) is used as it is.
    ``shard_rows``: photos per Ray Data batch, i.e. per shard (what a killed job loses at most per actor).
    """

    def __init__(self, address: Optional[str] = None, shard_rows: int = 256):
        self.ray = require_ray()
        self.address = address
        self.shard_rows = int(shard_rows)
        self.embedded = 0  # photos embedded by the last call (the others came from shards)

    def __call__(
        self, descriptor: Descriptor, paths: Sequence[str], *, cache_dir: Optional[os.PathLike], **loop: Any
    ) -> np.ndarray:
        """`street2shop.engine.embed_locally`'s contract; ``loop``: its batch_size and progress."""
        if cache_dir is None:
            raise ValueError("--engine ray writes its Parquet shards under the feature cache: give a cache directory")
        directory = shard_directory(cache_dir, descriptor)
        keys = [file_sha1(p) for p in paths]
        found = read_shards(directory, descriptor.dim)
        todo = {key: str(path) for key, path in zip(keys, paths) if key not in found}  # a repeated photo once
        log.info("ray engine: %d of %d photos already in %s", len(set(keys)) - len(todo), len(set(keys)), directory)
        self.embedded = 0
        if todo:
            self._embed(descriptor, todo, directory, loop["batch_size"], found, loop["progress"])
        return np.stack([found[key] for key in keys]).astype(np.float32)

    def _embed(self, descriptor, todo, directory, batch_size, found, progress) -> None:
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = bool(progress)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            workers = gpus if gpus else cpus
            rows = ray.data.from_items([{"key": key, "path": path} for key, path in todo.items()])
            rows = rows.repartition(max(1, -(-len(todo) // self.shard_rows)))
            vectors = rows.map_batches(
                _EmbedBatches,
                fn_constructor_kwargs={
                    "metadata": descriptor_metadata(descriptor),
                    "state": descriptor_state_bytes(descriptor),
                    "batch_size": batch_size,
                },
                batch_size=self.shard_rows,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(workers, len(todo))),
                num_gpus=1 if gpus else 0,
                num_cpus=0 if gpus else 1,
            )
            bar = tqdm(total=len(todo), desc=f"index {descriptor.name} (ray)", unit="img", disable=not progress)
            for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
                batch_keys = [str(k) for k in batch["key"]]
                write_shard(directory, batch_keys, batch["vector"])
                found.update(zip(batch_keys, np.asarray(batch["vector"], dtype=np.float32)))
                self.embedded += len(batch_keys)
                bar.update(len(batch_keys))
            bar.close()
        finally:
            if started_here:
                ray.shutdown()
