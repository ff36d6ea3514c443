"""Micro-batching: concurrent search requests share one `pipeline.search` call.

One worker thread takes the first waiting request, collects whatever else arrives within `max_wait_ms`
(up to `max_batch` photos), runs the batch once with k = the largest k asked, and hands each request
its own top k. Models and FAISS are far cheaper per photo on a batch (one matrix product against the
catalog instead of one scan per photo), so throughput grows with the number of concurrent clients,
while a lone request waits at most `max_wait_ms` more than it would alone.

A batch that fails is retried photo by photo, so one bad photo fails only its own request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence

log = logging.getLogger("street2shop.service")

SearchFn = Callable[[Sequence[Any], int], Sequence[Any]]


@dataclass
class _Request:
    image: Any
    k: int
    future: Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchInfo:
    """What a request's batch was: its size and how long the request waited in the queue (ms)."""

    size: int
    queue_ms: float


class MicroBatcher:
    """Runs `search_fn(images, k)` (returning one result per image, in order) on batches of requests.

    `submit` returns a Future resolving to `(result, BatchInfo)`, where `result` is the search result
    trimmed to the request's k by `trim(result, k)`.

    Example:
        >>> batcher = MicroBatcher(lambda images, k: [x * k for x in images], trim=lambda r, k: r)
        >>> batcher.submit(2, k=3).result()[0]
        6
        >>> batcher.close()
    """

    def __init__(
        self,
        search_fn: SearchFn,
        *,
        trim: Callable[[Any, int], Any],
        max_wait_ms: float = 2.0,
        max_batch: int = 32,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self._search = search_fn
        self._trim = trim
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_batch = max_batch
        self._queue: "queue.Queue[_Request | None]" = queue.Queue()
        self._closed = False
        self.batches = 0
        self.photos = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="street2shop-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: Any, k: int) -> Future:
        if self._closed:
            raise RuntimeError("the search batcher is closed (the service is shutting down)")
        request = _Request(image, int(k), Future())
        self._queue.put(request)
        return request.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish the requests already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "photos": self.photos,
            "mean_batch": round(self.photos / self.batches, 3) if self.batches else 0.0,
            "largest_batch": self.largest_batch,
            "queued": self._queue.qsize(),
        }

    def _collect(self, first: _Request) -> tuple[List[_Request], bool]:
        """`first` plus what arrives within max_wait (at most max_batch); True when the stop marker came."""
        batch = [first]
        deadline = time.perf_counter() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._collect(first)
            # A request whose client gave up (timeout) was cancelled: no work for it.
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: List[_Request]) -> None:
        started = time.perf_counter()
        try:
            results = self._search([request.image for request in batch], max(request.k for request in batch))
        except Exception as error:  # noqa: BLE001  (handed to the requests, never lost in this thread)
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            log.info("a batch of %d failed (%s): retrying its photos one by one", len(batch), error)
            for request in batch:
                self._run_batch([request])
            return
        self.batches += 1
        self.photos += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for request, result in zip(batch, results):
            info = BatchInfo(size=len(batch), queue_ms=(started - request.queued_at) * 1000.0)
            request.future.set_result((self._trim(result, request.k), info))
