"""A bounded, self-stopping load test of `street2shop serve`, on loopback only.

`run_loadtest` starts the service itself (a `street2shop serve` subprocess on a free 127.0.0.1 port, so
the clients' Python threads do not share the server's interpreter), sends POST /search from C client
threads for each concurrency C for a fixed duration (and never more than `max_requests`), optionally
POSTs /admin/reload while under load, and reports p50/p90/p99 latency, throughput, failed requests, the
server's mean batch size and the machine's load average. It stops the server when done, whatever happens.

`pad_catalog` makes the large catalog a load test needs without embedding 100k photos: a copy of a saved
pipeline whose index is padded with seeded random unit vectors (ids `synthetic-0000001`...), each shown
with the first real product's photo. Real query photos then search 100k products at the real cost of
the proxy, the descriptor and the index; the padding vectors are only competitors in the scan.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from index import KNOWN_ATTACHMENTS, ProductIndex
from street2shop.pipeline import CATALOG_FILE, catalog_table_bytes

from .metrics import percentiles_ms
from .server import free_port, is_loopback

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_QUERY_PHOTOS = 200


def pad_catalog(index_dir: Path, out_dir: Path, products: int, *, seed: int = 0) -> int:
    """Copy the pipeline saved in `index_dir` to `out_dir`, its index padded to `products` with random vectors.

    Returns the number of products in `out_dir`. `index_dir` is not changed.

    Raises:
        ValueError: the pipeline keeps local features for re-ranking (padding rows would have none), or
            keeps no catalog table.
    """
    index = ProductIndex.load(index_dir, device="cpu")
    attachments: Dict[str, bytes] = {}
    for name in sorted(KNOWN_ATTACHMENTS):
        try:
            attachments[name] = index.read_attachment(name)
        except FileNotFoundError:
            pass
    if "local_features.npz" in attachments:
        raise ValueError(f"{index_dir} re-ranks with local features: pad a pipeline without --rerank")
    if CATALOG_FILE not in attachments:
        raise ValueError(f"{index_dir} keeps no {CATALOG_FILE}: rebuild it with `street2shop index`")
    table = pd.read_csv(io.BytesIO(attachments[CATALOG_FILE]), dtype=str, keep_default_na=False)
    extra = products - index.ntotal
    if extra > 0:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((extra, index.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"synthetic-{i:07d}" for i in range(1, extra + 1)]
        index.add(vectors, ids)
        filler = str(Path(table["image"].iloc[0]).resolve())  # an absolute path: images/ objects stay behind
        attachments[CATALOG_FILE] = catalog_table_bytes(
            list(table["product_id"]) + ids, list(table["image"]) + [filler] * extra
        )
    index.save(out_dir, attachments=attachments)
    return index.ntotal


def query_photos(sources: Sequence[Path], limit: int = MAX_QUERY_PHOTOS) -> List[Path]:
    """Photo files from files and directories (searched recursively, sorted), at most `limit`."""
    photos: List[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            photos += sorted(p for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
        elif source.is_file():
            photos.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such photo or directory of photos")
    if not photos:
        raise ValueError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(map(str, sources))}")
    return photos[:limit]


def multipart_body(photo: bytes, k: int, boundary: str) -> bytes:
    """A multipart/form-data body with the file field `image` and the field `k`."""
    return b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            photo,
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n--{boundary}--\r\n'.encode(),
        ]
    )


@dataclass
class LevelReport:
    """One concurrency level's numbers."""

    concurrency: int
    requests: int
    failed: int
    seconds: float
    throughput: float  # successful requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    reloads: int
    reload_failures: int
    load_average: str  # 1, 5, 15 minutes, after the level


class _Client:
    """One keep-alive HTTP connection to the service."""

    def __init__(self, host: str, port: int, timeout: float):
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None) -> tuple:
        try:
            self.connection.request(method, path, body=body, headers=headers or {})
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            self.connection.close()  # reconnect on the next request
            return 0, str(error).encode()


def _wait_until_up(host: str, port: int, server: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the service exited with {server.returncode} before answering; its log: {log}")
        status, _ = _Client(host, port, 2.0).request("GET", "/health")
        if status == 200:
            return
        time.sleep(0.25)
    raise RuntimeError(f"the service did not answer /health within {timeout_s:g} s; its log: {log}")


def _get_json(host: str, port: int, path: str) -> dict:
    status, body = _Client(host, port, 30.0).request("GET", path)
    return json.loads(body) if status == 200 else {}


def _run_level(
    host: str,
    port: int,
    bodies: List[bytes],
    content_type: str,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    reload_every_s: Optional[float],
    token: str,
) -> LevelReport:
    latencies: List[List[float]] = [[] for _ in range(concurrency)]
    failures = [0] * concurrency
    reloads = {"done": 0, "failed": 0}
    budget = threading.Semaphore(max_requests)
    deadline = time.monotonic() + duration_s
    stop = threading.Event()

    def client(slot: int) -> None:
        connection = _Client(host, port, timeout=60.0)
        n = slot
        while time.monotonic() < deadline and budget.acquire(blocking=False):
            started = time.perf_counter()
            status, _ = connection.request("POST", "/search", bodies[n % len(bodies)], {"Content-Type": content_type})
            if status == 200:
                latencies[slot].append(time.perf_counter() - started)
            else:
                failures[slot] += 1
            n += concurrency

    def reloader() -> None:
        connection = _Client(host, port, timeout=120.0)
        while not stop.wait(reload_every_s):
            status, _ = connection.request("POST", "/admin/reload", headers={"Authorization": f"Bearer {token}"})
            reloads["done"] += 1
            reloads["failed"] += status != 200

    before = _get_json(host, port, "/metrics").get("batching", {})
    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in range(concurrency)]
    extra = threading.Thread(target=reloader, daemon=True) if reload_every_s else None
    started = time.perf_counter()
    for thread in threads + ([extra] if extra else []):
        thread.start()
    for thread in threads:
        thread.join(duration_s + 120.0)
    seconds = time.perf_counter() - started
    stop.set()
    if extra:
        extra.join(130.0)
    after = _get_json(host, port, "/metrics").get("batching", {})
    done = [value for values in latencies for value in values]
    points = percentiles_ms(done) or {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    batches = after.get("batches", 0) - before.get("batches", 0)
    photos = after.get("photos", 0) - before.get("photos", 0)
    return LevelReport(
        concurrency=concurrency,
        requests=len(done) + sum(failures),
        failed=sum(failures),
        seconds=round(seconds, 2),
        throughput=round(len(done) / seconds, 2),
        p50_ms=points["p50"],
        p90_ms=points["p90"],
        p99_ms=points["p99"],
        mean_batch=round(photos / batches, 2) if batches else 0.0,
        reloads=reloads["done"],
        reload_failures=reloads["failed"],
        load_average=" ".join(f"{value:.2f}" for value in os.getloadavg()),
    )


def run_loadtest(
    index_dir: Path,
    photos: Sequence[Path],
    *,
    concurrencies: Sequence[int] = (1, 8, 32),
    duration_s: float = 10.0,
    reload_during: bool = False,
    k: int = 10,
    host: str = "127.0.0.1",
    device: str = "cpu",
    max_requests: int = 20_000,
    warmup: int = 5,
    start_timeout_s: float = 300.0,
    log_path: Optional[Path] = None,
    echo: Callable[[str], None] = print,
) -> List[LevelReport]:
    """Start the service on `index_dir`, load it at each concurrency, stop it; one report per level.

    Raises:
        ValueError: a host that is not loopback (this tool never loads another machine), bad bounds.
    """
    if not is_loopback(host):
        raise ValueError(f"the load test runs on loopback only (127.0.0.1, ::1, localhost), not {host!r}")
    if duration_s <= 0 or duration_s > 600 or max_requests < 1 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("duration must be in (0, 600] s, max_requests >= 1 and every concurrency >= 1")
    if max(concurrencies) > 256:
        raise ValueError(f"concurrency {max(concurrencies)} is over the load test's bound of 256 clients")
    port = free_port(host)
    token = secrets.token_hex(16)
    boundary = "loadtest" + secrets.token_hex(8)
    bodies = [multipart_body(Path(photo).read_bytes(), k, boundary) for photo in photos]
    content_type = f"multipart/form-data; boundary={boundary}"
    log_path = Path(log_path or Path(index_dir).parent / "loadtest-server.log")
    command = [sys.executable, "-m", "street2shop", "serve", str(index_dir), "--host", host, "--port", str(port)]
    command += ["--device", device, "--max-batch", str(max(32, max(concurrencies)))]
    env = {**os.environ, "STREET2SHOP_TOKEN": token}  # not on the command line, where `ps` would show it
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        started = time.perf_counter()
        _wait_until_up(host, port, server, start_timeout_s, log_path)
        described = _get_json(host, port, "/health").get("pipeline", {})
        echo(
            f"service up in {time.perf_counter() - started:.1f} s: {described.get('products')} products, proxy "
            f"{described.get('proxy')}, descriptor {described.get('descriptor')}, {len(bodies)} query photos"
        )
        warm = _Client(host, port, 120.0)
        for body in bodies[:warmup]:
            warm.request("POST", "/search", body, {"Content-Type": content_type})
        reports = []
        for concurrency in concurrencies:
            every = duration_s / 3.0 if reload_during else None
            report = _run_level(
                host, port, bodies, content_type, concurrency, duration_s, max_requests, every, token
            )  # fmt: skip
            echo(format_report(report))
            reports.append(report)
        return reports
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def format_report(report: LevelReport) -> str:
    reload = f", reloads {report.reloads} ({report.reload_failures} failed)" if report.reloads else ""
    return (
        f"c={report.concurrency:<3} {report.throughput:7.1f} req/s  p50 {report.p50_ms:7.1f} ms  p90 "
        f"{report.p90_ms:7.1f} ms  p99 {report.p99_ms:7.1f} ms  failed {report.failed}/{report.requests}  "
        f"mean batch {report.mean_batch:.2f}{reload}  load {report.load_average}"
    )


def reports_json(reports: Sequence[LevelReport]) -> str:
    return json.dumps([asdict(report) for report in reports], indent=2)
