"""Batched feature extraction over image files, with a resumable on-disk cache.

The expensive part of indexing and benchmarking is running a descriptor over thousands of images.
`extract_features` reads, decodes and resizes images in worker processes (a `torch.utils.data.DataLoader`,
`retrieval.batching.iter_path_batches`) while the descriptor works on earlier batches, and stores each
image's features in a `FeatureCache` keyed by the image's content hash, under a stage key holding the
fingerprints of proxy and descriptor. An entry depends on nothing but its image and the models, never on where the image
stands in a list: inserting one product into an indexed catalog embeds that one image, an interrupted
run resumes from the images it finished, and a changed image, a refit codebook or another proxy never
reuses stale features. Every entry is verified when read (SHA-256 footer, shape (1, D), float32,
finite): a damaged or edited one is recomputed, never built into an index.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.batching import iter_batches, iter_path_batches
from retrieval.files import file_sha1, read_checked_bytes, write_checked_bytes
from retrieval.io import ImageReadError, read_image
from retrieval.proxy_stage import proxy_input_size, to_descriptor_input

DEFAULT_CHUNK = 256

log = logging.getLogger("street2shop.features")


def decode_feature_chunk(payload: bytes, rows: Optional[int] = None, dim: Optional[int] = None) -> np.ndarray:
    """An .npy payload -> (rows, dim) float32 features, or ValueError saying what is wrong with it.

    Checks what a checksum cannot: that the chunk has one finite float32 row per image (a chunk written
    for other images or by a broken descriptor has a valid checksum too).
    """
    features = np.load(io.BytesIO(payload), allow_pickle=False)
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {getattr(features, 'shape', None)}")
    if features.dtype != np.float32:
        raise ValueError(f"expected float32, got {features.dtype}")
    if (rows is not None and features.shape[0] != rows) or (dim is not None and features.shape[1] != dim):
        raise ValueError(f"expected shape ({rows}, {dim if dim is not None else 'D'}), got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("holds NaN or infinite values")
    return features


class FeatureCache:
    """Features on disk: `<root>/<stage key>/<key>.npy`, written atomically; `extract_features` keys
    each image by its content hash (`retrieval.files.file_sha1`), one (1, D) entry per image.

    Each file is an .npy array followed by a SHA-256 footer (`retrieval.files.write_checked_bytes`);
    `get` verifies footer, shape, dtype and finiteness, and records what it refused in `damaged`.
    """

    def __init__(self, root: os.PathLike, stage_key: str):
        self.directory = Path(root) / stage_key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.damaged: List[str] = []  # "chunk file: why", one per refused entry, for a single warning

    @staticmethod
    def chunk_key(content_hashes: Sequence[str]) -> str:
        """One key for a list of images (for callers that cache a whole list, e.g. local features)."""
        return hashlib.sha1("\n".join(content_hashes).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str, rows: Optional[int] = None, dim: Optional[int] = None) -> Optional[np.ndarray]:
        """The verified (rows, dim) float32 chunk, or None when absent or damaged (then deleted, noted in `damaged`)."""
        path = self.path(key)
        if not os.path.lexists(path):
            return None
        try:
            return decode_feature_chunk(read_checked_bytes(path), rows, dim)
        except (ValueError, OSError, EOFError) as error:  # ImageReadError / DamagedCacheError are ValueErrors
            self.discard(key, str(error))
            return None

    def discard(self, key: str, reason: str) -> None:
        """Forget a chunk that must be recomputed, noting why (a damaged chunk is never trusted)."""
        self.damaged.append(f"{key}.npy: {reason}")
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError:  # a directory planted there: `put` will fail loudly when it writes the chunk
            pass

    def put(self, key: str, features: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        write_checked_bytes(self.path(key), buffer.getvalue())


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str],
    size: Tuple[int, int],
    *,
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    cache: Optional[FeatureCache] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Optional[str] = None,
    dim: Optional[int] = None,
    workers: Optional[int] = None,
) -> np.ndarray:
    """Run `embed` (e.g. descriptor(proxy(x))) over image files, reusing the cached features of each image.

    Only images without a valid cache entry are embedded (an image listed twice, once), `chunk_size` at
    a time; each finished chunk's entries are written before the next starts, so an interrupted run
    loses at most one chunk. Cached entries are verified (checksum, shape (1, D), float32, finite);
    failures are recomputed, with one warning naming the cache directory.

    Args:
        embed: (B, 3, H, W) on `device` -> (B, D) features.
        paths: image files; unreadable ones raise `ImageReadError` naming the file.
        size: (H, W) every image is resized to.
        cache: where features go, one entry per image content; None disables caching.
        chunk_size: images embedded between two cache writes.
        progress: a label for the progress bar, or None for no bar.
        dim: D, when the caller knows it (descriptor.dim); else taken from a freshly computed image.
        workers: decoding worker processes (None: `retrieval.batching.default_workers`; 0: this process);
            the vectors are the same for any number.

    Returns:
        (N, D) float32, row i for paths[i].
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to extract features from")
    # Without a cache every position is its own entry; with one, an image's content is its key.
    keys = [file_sha1(p) for p in paths] if cache is not None else [str(i) for i in range(len(paths))]
    unique = list(dict.fromkeys(keys))
    source = dict(zip(keys, paths))  # key -> one path holding that content
    damaged_before = len(cache.damaged) if cache is not None else 0
    found = {key: (cache.get(key, rows=1, dim=dim) if cache is not None else None) for key in unique}
    bar = tqdm(total=len(unique), desc=progress, unit="img", disable=progress is None, leave=False)

    def compute(todo: List[str]) -> None:
        chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
        # One loader for every chunk (its workers start once), its batches cut within each chunk as before.
        groups = [
            [source[key] for key in chunk[i : i + batch_size]]
            for chunk in chunks
            for i in range(0, len(chunk), batch_size)
        ]
        batches = iter_path_batches(groups, size, workers)
        try:
            for chunk in chunks:
                parts = []
                for _ in range(-(-len(chunk) // batch_size)):
                    batch = next(batches)
                    parts.append(embed(batch.to(device)).float().cpu().numpy())
                    bar.update(len(batch))
                rows = np.concatenate(parts).astype(np.float32)
                for key, row in zip(chunk, rows):
                    found[key] = row[None]
                    # A non-finite entry would be refused by every later read: it is returned, never cached.
                    if cache is not None and np.isfinite(row).all():
                        cache.put(key, row[None])
        finally:
            batches.close()  # stops the decoding workers now, also after an error

    try:
        todo = [key for key in unique if found[key] is None]
        if cache is not None and dim is None and len(todo) < len(unique):
            # Without `dim` the width D is only known from `embed` itself: a fresh image sets it, and a
            # cached entry of another width is recomputed. When every image is cached and their widths
            # disagree, the first image is recomputed to tell which is right.
            widths = Counter(f.shape[1] for f in found.values() if f is not None)
            first = unique[0]
            first_width = None
            if not todo and len(widths) > 1:
                todo, first_width = [first], found[first].shape[1]
            if todo:
                compute(todo[:1])
            reference = todo[0] if todo else first
            width = found[reference].shape[1]
            if first_width is not None and first_width != width:
                cache.damaged.append(f"{first}.npy: width {first_width}, expected {width}")
            for key in unique:
                features = found[key]
                if key != reference and key not in todo and features is not None and features.shape[1] != width:
                    cache.discard(key, f"width {features.shape[1]}, expected {width}")
                    found[key] = None
            todo = [key for key in unique if found[key] is None]
        bar.update(sum(found[key] is not None for key in unique) - bar.n)
        if cache is not None and len(cache.damaged) > damaged_before:
            refused = cache.damaged[damaged_before:]
            # One warning per run, not one per image: a damaged cache usually has many bad entries.
            log.warning(
                "feature cache %s: %d of %d cached features failed verification and are recomputed (e.g. %s)",
                cache.directory,
                len(refused),
                len(unique),
                refused[0],
            )
        compute(todo)
    finally:
        bar.close()
    return np.concatenate([found[key] for key in keys])


def _stored_output_problem(path: str, size: Tuple[int, int]) -> Optional[str]:
    """Why a stored proxy output cannot be reused ("missing", damaged, other size), or None when it can."""
    if not os.path.lexists(path):
        return "missing"
    try:
        shape = read_image(path).shape  # ~1 ms for 256x192; refuses FIFOs and damaged PNGs
    except (ImageReadError, FileNotFoundError) as error:
        return str(error)
    return (
        None
        if shape[:2] == tuple(size)
        else f"{Path(path).name} is {shape[0]}x{shape[1]}, expected {size[0]}x{size[1]}"
    )


#: (H, W) proxy outputs are rendered and stored at: VITON's native photo size. Descriptors resize from it.
PROXY_OUTPUT_SIZE = (256, 192)


@torch.no_grad()
def materialize_proxy_outputs(
    proxy: torch.nn.Module,
    paths: Sequence[str],
    root: os.PathLike,
    *,
    size: Tuple[int, int] = PROXY_OUTPUT_SIZE,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    progress: Optional[str] = None,
) -> List[str]:
    """Run a proxy stage once over image files and keep its outputs as PNGs; return their paths.

    The proxy (parser, PaintNet, ...) is the expensive part of a query and does not depend on the
    descriptor after it, so a grid runs it once per proxy, not once per proxy x descriptor. Outputs go
    to `root/<proxy name>-<proxy fingerprint>/<image sha1>.png` (the fingerprint covers config and
    checkpoint weights), each written atomically: an interrupted run resumes, a retrained proxy never
    reuses stale images. Descriptors then read these files like any photo, and the feature cache keys
    on their content.

    Args:
        proxy: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1], with `name` and `fingerprint()`.
        paths: the input photos.
        size: (H, W) the outputs are stored at; the photos are read at `proxy_input_size(proxy, size)`.

    A stored output is reused only if it decodes (PNG's chunk CRCs catch a flipped byte) at `size`;
    anything else is generated again, with one warning naming the directory.

    Returns:
        paths of the outputs, aligned with `paths`.
    """
    from retrieval.files import write_image_atomic

    directory = Path(root) / f"{proxy.name}-{proxy.fingerprint()}-{size[0]}x{size[1]}"
    directory.mkdir(parents=True, exist_ok=True)
    outputs = [str(directory / f"{file_sha1(p)}.png") for p in paths]
    problems = [_stored_output_problem(out, size) for out in outputs]
    todo = [i for i, problem in enumerate(problems) if problem]
    damaged = [problem for problem in problems if problem and problem != "missing"]
    if damaged:
        log.warning(
            "proxy outputs %s: %d stored images failed verification and are generated again (e.g. %s)",
            directory,
            len(damaged),
            damaged[0],
        )
    bar = tqdm(
        total=len(paths),
        initial=len(paths) - len(todo),
        desc=progress,
        unit="img",
        disable=progress is None,
        leave=False,
    )
    try:
        todo_paths = [str(paths[i]) for i in todo]
        position = 0
        for batch in iter_batches(todo_paths, proxy_input_size(proxy, size), batch_size):
            generated = to_descriptor_input(proxy(batch.to(device)), size)  # as at query time
            images = generated.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for image in images:
                write_image_atomic(outputs[todo[position]], image, compress_level=1)
                position += 1
            bar.update(len(images))
    finally:
        bar.close()
    return outputs
