"""Images from files to batches on a device: decoding threads, seeded samples, descriptor fitting."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from retrieval.files import file_sha1, read_checked_bytes, write_checked_bytes
from retrieval.io import images_to_tensor, read_image, resize_image

if TYPE_CHECKING:  # descriptors import this module; a runtime import would be circular
    from retrieval.descriptors.base import Descriptor

log = logging.getLogger("street2shop.retrieval")


def load_batch(paths: Sequence[str], size: Tuple[int, int]) -> torch.Tensor:
    """Read, convert and resize images into one (B, 3, H, W) float tensor in [0, 1]."""
    return images_to_tensor([resize_image(read_image(path), size) for path in paths])


def iter_batches(
    paths: Sequence[str], size: Tuple[int, int], batch_size: int, workers: int = 2
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) batches in order, decoding the next batches while the caller computes."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(load_batch, chunk, size) for chunk in chunks[: workers + 1]]
        next_chunk = len(pending)
        for _ in range(len(chunks)):
            batch = pending.pop(0).result()
            if next_chunk < len(chunks):
                pending.append(pool.submit(load_batch, chunks[next_chunk], size))
                next_chunk += 1
            yield batch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def sample_paths(paths: Sequence[str], limit: Optional[int], seed: int = 0) -> List[str]:
    """At most `limit` of `paths`, a seeded sample in the original order."""
    paths = list(paths)
    if limit is None or len(paths) <= limit:
        return paths
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
    return [paths[i] for i in keep]


def fit_descriptor(
    descriptor: Descriptor,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = True,
    cache_dir: Optional[os.PathLike] = None,
) -> Descriptor:
    """Fit (codebook, whitening) on training images; a no-op for descriptors that need nothing.

    With `cache_dir`, the fitted state is kept in ``cache_dir/fitted/`` under a key of the unfitted
    descriptor's fingerprint (name, config, weights) and the images' contents, so a second benchmark of
    the same descriptor on the same images loads it instead of fitting again (k-means over 200,000
    local descriptors is minutes on a CPU). Only the tensors that fitting changed are stored.
    """
    if not descriptor.needs_fit:
        return descriptor
    if not paths:
        raise ValueError(f"descriptor {descriptor.name!r} needs training images to fit, got none")
    stored = None
    if cache_dir is not None:
        stored = fitted_state_path(descriptor, paths, cache_dir)
        if load_fitted_state(descriptor, stored):
            return descriptor
        before = {k: v.detach().clone() for k, v in descriptor.state_dict().items()}
    size = descriptor.input_spec.size
    device = descriptor.device
    batches = iter_batches(list(paths), size, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(
            batches, total=-(-len(paths) // batch_size), desc=f"fit {descriptor.name}", unit="batch", leave=False
        )
    descriptor.fit(batch.to(device) for batch in batches)
    if stored is not None:
        changed = {
            k: v.detach().cpu()
            for k, v in descriptor.state_dict().items()
            if k not in before or v.shape != before[k].shape or not torch.equal(v, before[k])
        }
        buffer = io.BytesIO()
        torch.save(changed, buffer)
        write_checked_bytes(stored, buffer.getvalue())  # torch.load reads a flipped byte without complaint
    return descriptor


def fitted_state_path(descriptor: Descriptor, paths: Sequence[str], cache_dir: os.PathLike) -> Path:
    """Where `fit_descriptor` keeps this (unfitted) descriptor's state fitted on these images."""
    digest = hashlib.sha1(descriptor.fingerprint().encode())
    for path in paths:
        digest.update(file_sha1(path).encode())
    return Path(cache_dir) / "fitted" / f"{descriptor.name}-{digest.hexdigest()[:20]}.pt"


def load_fitted_state(descriptor: Descriptor, path: Path) -> bool:
    """Load a stored fitted state into `descriptor`; False (and a fresh fit) when absent or unusable."""
    if not path.exists():
        return False
    state = descriptor.state_dict()
    try:
        stored = torch.load(io.BytesIO(read_checked_bytes(path)), map_location="cpu", weights_only=True)
        unusable = [
            k
            for k, v in stored.items()
            if k not in state or state[k].shape != v.shape or (v.is_floating_point() and not torch.isfinite(v).all())
        ]
    except Exception as error:  # a damaged file is refitted, never trusted
        log.warning("fitted state %s is unreadable (%s): fitting again", path, error)
        return False
    if unusable or not stored:
        log.warning("fitted state %s does not fit %s (%s): fitting again", path, descriptor.name, unusable[:3])
        return False
    with torch.no_grad():
        for key, value in stored.items():
            state[key].copy_(value)
    log.info("%s: loaded the fitted state of an earlier run from %s", descriptor.name, path)
    return True
