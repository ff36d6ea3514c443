"""The loaded pipeline behind the service: searches, catalog writes and reloads, consistent under concurrency.

Discipline (the `Pipeline` contract: `search` may run in several threads, `add`/`remove`/`save` may not
run beside anything):

- searches hold the read side of a readers-writer lock, so they run together;
- add/remove (each followed by `save`, so the catalog on disk is what the service answers from) hold
  the write side: a search sees the catalog before the write or after it, never half of it;
- writes and reloads are also serialised end to end by one mutex, so two writes never interleave;
- a reload builds the new pipeline from disk *outside* the lock (seconds of model loading while
  searches continue on the old one), then swaps the reference under the write side (microseconds).

A write that fails half-way (e.g. the disk is full during `save`) reloads the last saved version, so
memory never drifts from disk.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Sequence

from .rwlock import ReadersWriterLock

log = logging.getLogger("street2shop.service")


class DuplicateProductError(ValueError):
    """An add of a product id the catalog already holds."""


Loader = Callable[..., Any]  # (index_dir, device=...) -> a Pipeline


class PipelineHost:
    """Owns the current pipeline; every access goes through its lock discipline (module docstring)."""

    def __init__(self, index_dir: Path, loader: Loader, device: str = "auto"):
        self.index_dir = Path(index_dir)
        self._loader = loader
        self._device = device
        self._lock = ReadersWriterLock()
        self._writes = threading.Lock()
        started = time.perf_counter()
        self._pipeline = loader(self.index_dir, device=device)
        self.load_s = time.perf_counter() - started
        self.generation = 1  # +1 per reload or write: lets clients see that the catalog changed
        self.reloads = 0

    @property
    def pipeline(self) -> Any:
        """The current pipeline (for read-only facts such as `describe()`; searches go through `search`)."""
        return self._pipeline

    def search(self, images: Sequence[Any], k: int) -> List[Any]:
        with self._lock.read():
            return self._pipeline.search(list(images), k=k)

    def product_image_path(self, product_id: str) -> Path:
        with self._lock.read():
            return self._pipeline.product_image_path(product_id)

    def describe(self) -> dict:
        with self._lock.read():
            return {**self._pipeline.describe(), "products": self._pipeline.n_products, "generation": self.generation}

    def add(self, product_id: str, image: Any) -> None:
        def change(pipeline: Any) -> None:
            try:
                pipeline.product_image_path(product_id)
            except KeyError:
                pipeline.add([product_id], [image])
            else:
                raise DuplicateProductError(f"the catalog already holds a product {product_id!r}: remove it first")

        self._write(change)

    def remove(self, product_id: str) -> None:
        self._write(lambda pipeline: pipeline.remove([product_id]))

    def reload(self) -> dict:
        """Load the saved version from disk and swap it in; searches keep running on the old one meanwhile."""
        with self._writes:
            started = time.perf_counter()
            fresh = self._loader(self.index_dir, device=self._device)
            loaded = time.perf_counter()
            self._swap(fresh)
            self.reloads += 1
            return {"load_s": round(loaded - started, 3), "swap_ms": round((time.perf_counter() - loaded) * 1e3, 3)}

    def _swap(self, fresh: Any) -> None:
        with self._lock.write():
            self._pipeline = fresh
            self.generation += 1

    def _write(self, change: Callable[[Any], None]) -> None:
        with self._writes:
            with self._lock.write():
                try:
                    change(self._pipeline)
                except (KeyError, ValueError):
                    raise  # refused before anything changed (unknown id, duplicate id, bad image)
                except BaseException:
                    self._restore()
                    raise
                try:
                    self._pipeline.save()
                except BaseException:
                    self._restore()
                    raise
                self.generation += 1

    def _restore(self) -> None:
        """After a failed write (lock held): back to the last saved version, so memory matches disk."""
        log.error("a catalog write failed half-way: reloading %s from disk", self.index_dir)
        self._pipeline = self._loader(self.index_dir, device=self._device)
        self.generation += 1
