"""Batched feature extraction over image files, with a resumable on-disk cache.

The expensive part of indexing and benchmarking is running a descriptor over thousands of images.
`extract_features` reads and decodes images on a thread pool (Pillow and OpenCV release the GIL)
while the descriptor works on the previous batch, and stores each chunk of results in a
`FeatureCache` keyed by the images' content hashes and the fingerprints of proxy and descriptor.
An interrupted run therefore resumes from its last finished chunk, and a changed image, a refit
codebook or another proxy never reuses stale features.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.batching import iter_batches
from retrieval.io import file_sha1, write_bytes_atomic

DEFAULT_CHUNK = 256


class FeatureCache:
    """Chunks of features on disk: `<root>/<stage key>/<chunk key>.npy`, written atomically."""

    def __init__(self, root: os.PathLike, stage_key: str):
        self.directory = Path(root) / stage_key
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def chunk_key(content_hashes: Sequence[str]) -> str:
        return hashlib.sha1("\n".join(content_hashes).encode()).hexdigest()

    def get(self, key: str) -> Optional[np.ndarray]:
        path = self.directory / f"{key}.npy"
        if not path.exists():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)  # a damaged chunk is recomputed, never trusted
            return None

    def put(self, key: str, features: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, features, allow_pickle=False)
        write_bytes_atomic(self.directory / f"{key}.npy", buffer.getvalue())


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
) -> np.ndarray:
    """Run `embed` (e.g. descriptor(proxy(x))) over image files.

    Args:
        embed: (B, 3, H, W) on `device` -> (B, D) features.
        paths: image files; unreadable ones raise `ImageReadError` naming the file.
        size: (H, W) every image is resized to.
        cache: where finished chunks go; None disables caching.
        progress: a label for the progress bar, or None for no bar.

    Returns:
        (N, D) float32, row i for paths[i].
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to extract features from")
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    results: List[Optional[np.ndarray]] = [None] * len(chunks)
    keys: List[Optional[str]] = [None] * len(chunks)
    if cache is not None:
        for i, chunk in enumerate(chunks):
            keys[i] = FeatureCache.chunk_key([file_sha1(p) for p in chunk])
            results[i] = cache.get(keys[i])
    todo = [i for i, r in enumerate(results) if r is None]
    n_cached = len(paths) - sum(len(chunks[i]) for i in todo)
    bar = tqdm(total=len(paths), initial=n_cached, desc=progress, unit="img", disable=progress is None, leave=False)
    try:
        for i in todo:
            parts = []
            for batch in iter_batches(chunks[i], size, batch_size):
                parts.append(embed(batch.to(device)).float().cpu().numpy())
                bar.update(len(batch))
            results[i] = np.concatenate(parts).astype(np.float32)
            if cache is not None:
                cache.put(keys[i], results[i])
    finally:
        bar.close()
    return np.concatenate(results)  # type: ignore[arg-type]


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
        size: (H, W) the photos are read at and the outputs stored at.

    Returns:
        paths of the outputs, aligned with `paths`.
    """
    from retrieval.io import write_image_atomic

    directory = Path(root) / f"{proxy.name}-{proxy.fingerprint()}-{size[0]}x{size[1]}"
    directory.mkdir(parents=True, exist_ok=True)
    outputs = [str(directory / f"{file_sha1(p)}.png") for p in paths]
    todo = [i for i, out in enumerate(outputs) if not Path(out).exists()]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc=progress, unit="img", disable=progress is None, leave=False)
    try:
        todo_paths = [str(paths[i]) for i in todo]
        position = 0
        for batch in iter_batches(todo_paths, size, batch_size):
            generated = proxy(batch.to(device)).clamp(0, 1)
            if generated.shape[-2:] != tuple(size):
                generated = torch.nn.functional.interpolate(generated, size=size, mode="bilinear", align_corners=False)
            images = generated.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for image in images:
                write_image_atomic(outputs[todo[position]], image, compress_level=1)
                position += 1
            bar.update(len(images))
    finally:
        bar.close()
    return outputs
