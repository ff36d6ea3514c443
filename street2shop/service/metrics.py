"""Request counters and latency percentiles for GET /metrics, kept in memory (one process)."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque
from typing import Deque, Dict, Iterable

import numpy as np

#: Latencies kept per route for the percentiles: recent behaviour, bounded memory.
WINDOW = 4096


def percentiles_ms(latencies_s: Iterable[float], points=(50, 90, 99)) -> Dict[str, float]:
    """{"p50": ms, "p90": ms, "p99": ms} of latencies in seconds (empty dict for none)."""
    values = np.fromiter(latencies_s, dtype=np.float64)
    if values.size == 0:
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)) * 1000.0, 3) for p in points}


class Metrics:
    """Counts per (method, route, status) and a sliding window of latencies per (method, route).

    Routes are the templates (`/products/{product_id}/image`), not the raw paths, so ids do not
    explode the table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._latencies: Dict[str, Deque[float]] = defaultdict(lambda: deque(maxlen=WINDOW))
        self.started = time.time()

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = f"{method} {route}"
        with self._lock:
            self._counts[(key, status)] += 1
            self._latencies[key].append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
            latencies = {key: list(values) for key, values in self._latencies.items()}
        routes = {}
        for (key, status), count in sorted(counts.items()):
            entry = routes.setdefault(key, {"count": 0, "by_status": {}})
            entry["count"] += count
            entry["by_status"][str(status)] = count
        for key, values in latencies.items():
            routes[key]["latency_ms"] = percentiles_ms(values)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": sum(counts.values()),
            "routes": routes,
        }
