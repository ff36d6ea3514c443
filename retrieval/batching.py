"""Images from files to batches on a device: decoding worker processes, seeded samples, descriptor fitting."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple

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


def default_workers() -> int:
    """Decoding worker processes when the caller does not say; $STREET2SHOP_WORKERS overrides.

    0 (decode in-process) below 4 CPUs: on 2 cores the model is the whole cost and workers measured no faster
    (README, scale section); else min(4, CPUs // 2), leaving the other half to the model's threads.
    """
    configured = os.environ.get("STREET2SHOP_WORKERS")
    if configured is not None and configured.strip():
        try:
            return max(0, int(configured))
        except ValueError:
            raise ValueError(f"STREET2SHOP_WORKERS must be a whole number >= 0, got {configured!r}") from None
    cpus = os.cpu_count() or 1
    return 0 if cpus < 4 else min(4, cpus // 2)


class _Failed:
    """What a decoding worker sends back instead of a batch: the error (re-raised by the main process as it is,
    so a bad image gives the same error as without workers) or, if it cannot travel, its text."""

    def __init__(self, error: BaseException):
        try:
            pickle.loads(pickle.dumps(error))
            self.error = error
        except Exception:  # an exception type that cannot cross processes: keep what it said
            self.error = RuntimeError(f"{type(error).__name__}: {error}")


class _Mapped(torch.utils.data.Dataset):
    """Item i: ``function(items[i])``, or a `_Failed` carrying what it raised."""

    def __init__(self, function: Callable[[Any], Any], items: Sequence[Any]):
        self.function, self.items = function, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> Any:
        try:
            return self.function(self.items[item])
        except Exception as error:  # raised in the main process, in order, naming the file
            return _Failed(error)


def _as_is(item: Any) -> Any:
    return item


def _one_thread_worker(_: int) -> None:
    # Each worker decodes one item at a time; torch's own threads would only fight the others for cores.
    torch.set_num_threads(1)


def iter_mapped(
    function: Callable[[Any], Any], items: Sequence[Any], workers: Optional[int] = None, what: str = "item"
) -> Iterator[Any]:
    """Yield ``function(item)`` for each of ``items``, in order, computed a few items ahead in ``workers``
    processes of a `torch.utils.data.DataLoader` (None: `default_workers`; 0, or a single item: in this process).

    For the CPU-bound part of embedding (decoding and resizing photos) while the caller runs the model in the
    main process. What ``function`` raises for an item is raised here, as it is, when that item is reached
    (so a bad image gives the same error with or without workers); a worker that dies (killed, out of
    memory) raises a RuntimeError naming the items (``what`` numbers, the first by ``str(item)``) in flight.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: decode in this process), got {workers}")
    workers = min(workers, len(items)) if len(items) > 1 else 0
    loader = torch.utils.data.DataLoader(
        _Mapped(function, items),
        batch_size=None,  # an item is what the caller wants (a whole batch, for `iter_path_batches`)
        collate_fn=_as_is,  # not torch's default, which turns numpy arrays into tensors
        num_workers=workers,
        worker_init_fn=_one_thread_worker if workers else None,
        prefetch_factor=2 if workers else None,
    )
    stream = iter(loader)
    try:
        for position in range(len(items)):
            try:
                result = next(stream)
            except RuntimeError as error:  # the DataLoader's words for a dead worker
                # Which of the items in flight killed it cannot be known: name them all.
                last = min(len(items), position + 2 * workers)
                raise RuntimeError(
                    f"a decoding worker died while {what}s {position + 1}-{last} of {len(items)} were being decoded "
                    f"(from {str(items[position])[:200]} on): {error}; run with --workers 0 to decode in this process"
                ) from error
            if isinstance(result, _Failed):
                raise result.error
            yield result
    finally:
        del stream  # shuts the workers down now, also when the caller stops early


def decode_batch(paths: Sequence[str], size: Tuple[int, int]) -> torch.Tensor:
    """Read and resize images into one (B, H, W, 3) uint8 tensor: what a loader worker sends back (a quarter
    of the float batch's bytes through shared memory); `images_to_tensor` of its rows is `load_batch`."""
    return torch.from_numpy(np.stack([resize_image(read_image(path), size) for path in paths]))


def iter_path_batches(
    batches: Sequence[Sequence[str]], size: Tuple[int, int], workers: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """Yield each group of image files of ``batches`` as one (B, 3, H, W) float tensor in [0, 1], in order,
    read and resized by ``workers`` loader processes (`iter_mapped`, `decode_batch`), made float here.

    A batch is exactly `load_batch` of its files, so vectors do not depend on the number of workers; an
    unreadable image raises what `load_batch` raises (``ImageReadError`` naming the file).
    """
    decoded = iter_mapped(partial(decode_batch, size=size), [list(batch) for batch in batches], workers, "batch")
    try:
        for batch in decoded:
            yield images_to_tensor(list(batch.numpy()))
    finally:
        decoded.close()  # stops the workers now, also when the caller stops early


def iter_batches(
    paths: Sequence[str], size: Tuple[int, int], batch_size: int, workers: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) batches of ``batch_size`` files in order, decoded ahead by ``workers`` processes
    (`iter_path_batches`)."""
    yield from iter_path_batches([paths[i : i + batch_size] for i in range(0, len(paths), batch_size)], size, workers)


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
    workers: Optional[int] = None,
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
    batches = iter_batches(list(paths), size, batch_size, workers)
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
