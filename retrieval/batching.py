"""Images from files to batches on a device: decoding threads, seeded samples, descriptor fitting."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from retrieval.io import images_to_tensor, read_image, resize_image

if TYPE_CHECKING:  # descriptors import this module; a runtime import would be circular
    from retrieval.descriptors.base import Descriptor


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
    descriptor: Descriptor, paths: Sequence[str], *, batch_size: int = 32, progress: bool = True
) -> Descriptor:
    """Fit (codebook, whitening) on training images; a no-op for descriptors that need nothing."""
    if not descriptor.needs_fit:
        return descriptor
    if not paths:
        raise ValueError(f"descriptor {descriptor.name!r} needs training images to fit, got none")
    size = descriptor.input_spec.size
    device = descriptor.device
    batches = iter_batches(list(paths), size, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(paths) // batch_size), desc=f"fit {descriptor.name}", unit="batch", leave=False)
    return descriptor.fit(batch.to(device) for batch in batches)
