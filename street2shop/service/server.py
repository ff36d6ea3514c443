"""Running the service: uvicorn in this process (`street2shop serve`), or on a free loopback port in a
background thread (the browser test and the load test)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import uvicorn

from .app import ServiceSettings, create_app, default_loader

log = logging.getLogger("street2shop.service")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve(
    index_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServiceSettings = ServiceSettings(),
    echo: Callable[[str], None] = print,
) -> None:
    """Load the pipeline, then serve until Ctrl-C (uvicorn's graceful shutdown finishes running requests)."""
    if not is_loopback(host) and settings.token is None:
        echo(
            f"warning: serving on {host} without --token: anyone who reaches it can add and remove products "
            "and reload the index"
        )
    started = time.perf_counter()
    app = create_app(index_dir, settings)
    described = app.state.host.describe()
    echo(
        f"loaded {index_dir} in {time.perf_counter() - started:.1f} s: {described.get('products')} products, "
        f"descriptor {described.get('descriptor')}, proxy {described.get('proxy')}"
    )
    echo(f"serving on http://{host}:{port}/  (API docs at /docs, Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


@contextmanager
def background_server(
    index_dir: Path,
    settings: ServiceSettings = ServiceSettings(),
    *,
    loader: Callable[..., Any] = default_loader,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    start_timeout_s: float = 60.0,
) -> Iterator[str]:
    """Serve `index_dir` on a free loopback port in a daemon thread; yields the base URL, stops on exit."""
    app = create_app(index_dir, settings, loader=loader)
    config = uvicorn.Config(app, host=host, port=port or free_port(host), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="street2shop-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the service on {host}:{config.port} did not start within {start_timeout_s:g} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(15)
