"""`street2shop serve | loadtest`: the HTTP search service (`street2shop.service`) and its load test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import click

from street2shop.commands.options import (
    cache_dir_path,
    opt,
    parse_counts,
    whole,
)


def _service():
    """street2shop.service, or a one-line error naming the install command when the `serve` extra is missing."""
    import street2shop.service as service  # raises MissingServeExtraError (a RuntimeError) saying what to install

    return service


@click.command("serve")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@opt("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface; then set --token).")
@opt("--port", default=8000, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    default=None,
    envvar="STREET2SHOP_TOKEN",
    help="Writes (add, remove, reload) need 'Authorization: Bearer TOKEN'. Also from $STREET2SHOP_TOKEN.",
)
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@opt("--max-upload-mb", default=20.0, type=click.FloatRange(min=0, min_open=True), help="Cap on one photo.")
@whole("--max-pixels", 64_000_000, 1, "Cap on a photo's width x height, checked before decoding it.")
@opt("--timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), help="Seconds a request may take.")
@opt(
    "--batch-wait-ms",
    default=2.0,
    type=click.FloatRange(min=0),
    help="How long a search waits for others to batch with.",
)
@whole("--max-batch", 32, 1, "Most photos searched together.")
def serve_command(index_dir, host, port, token, device, max_upload_mb, max_pixels, timeout, batch_wait_ms, max_batch):
    """Serve an index over HTTP: a search page at /, the JSON API (docs at /docs).

    \b
    Needs the serve extra: pip install -e ".[serve]"
    Endpoints: POST /search (multipart image, k), GET /products/ID/image, POST /products (product_id + image),
    DELETE /products/ID, POST /admin/reload, GET /health, GET /metrics.
    \b
    Example:
      street2shop serve shop-index --port 8000
      curl -F image=@photo.jpg -F k=5 http://127.0.0.1:8000/search
    """
    service = _service()
    from street2shop.service.server import serve

    settings = service.ServiceSettings(
        token=token,
        device=device,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        request_timeout_s=timeout,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
    )
    serve(Path(index_dir), host=host, port=port, settings=settings, echo=click.echo)


def _loadtest_photos(sources, cache_dir) -> List[Path]:
    """--queries values -> photo files: files, directories, or a data set spec (its validation queries)."""
    from street2shop.service.loadtest import MAX_QUERY_PHOTOS, query_photos

    paths = []
    for source in sources:
        if ":" in source and not Path(source).exists():
            from retrieval.datasets import load_dataset

            data = load_dataset(source, split="val", cache_dir=cache_dir_path(cache_dir))
            paths += list(dict.fromkeys(data.queries["image"]))[:MAX_QUERY_PHOTOS]
        else:
            paths.append(source)
    return query_photos([Path(p) for p in paths])


@click.command("loadtest")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--queries",
    "sources",
    multiple=True,
    required=True,
    help="Query photos: files, directories, or a data set spec (its validation queries), e.g. "
    "viton:../shared/data/viton. Repeatable; at most 200 photos are used.",
)
@opt("--concurrency", default="1,8,32", callback=lambda ctx, param, value: parse_counts(value), help="Client counts.")
@opt("--duration", default=10.0, type=click.FloatRange(0, 600, min_open=True), help="Seconds per concurrency.")
@click.option("--reload-during", is_flag=True, help="POST /admin/reload 3 times per level while under load.")
@whole("--products", 0, 0, "Pad a temporary copy of the index to N products with random vectors (0: as is).")
@whole("--k", 10, 1, "Products asked per search.")
@opt("--host", default="127.0.0.1", help="Loopback address to serve on (anything else is refused).")
@opt("--device", default="cpu", type=click.Choice(["auto", "cpu", "cuda"]))
@whole("--max-requests", 20000, 1, "Bound on the requests of one concurrency level.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the numbers.")
@click.option("--cache-dir", default=None)
def loadtest_command(index_dir, sources, concurrency, duration, reload_during, products, k, host, device, **rest):
    """Load-test `street2shop serve` on this machine: p50/p99 latency, throughput, failures, load average.

    Starts the service itself on a free loopback port, runs each concurrency for --duration seconds
    (bounded by --max-requests), stops the service. With --products N it serves a temporary copy of
    INDEX_DIR padded to N products with seeded random vectors (INDEX_DIR is not changed).

    \b
    Example (the `fast` recipe on 100k products, VITON validation photos as queries):
      street2shop index --catalog viton:../shared/data/viton --split val --recipe fast --out fast-index
      street2shop loadtest fast-index --products 100000 --queries viton:../shared/data/viton --reload-during
    """
    import tempfile

    _service()
    from street2shop.service.loadtest import pad_catalog, reports_json, run_loadtest

    photos = _loadtest_photos(sources, rest["cache_dir"])
    with tempfile.TemporaryDirectory(prefix="street2shop-loadtest-") as scratch:
        served = Path(index_dir)
        if products:
            started = time.perf_counter()
            served = Path(scratch) / "index"
            total = pad_catalog(Path(index_dir), served, products)
            click.echo(f"padded a copy of {index_dir} to {total} products in {time.perf_counter() - started:.1f} s")
        reports = run_loadtest(
            served,
            photos,
            concurrencies=concurrency,
            duration_s=duration,
            reload_during=reload_during,
            k=k,
            host=host,
            device=device,
            max_requests=rest["max_requests"],
            log_path=Path(scratch) / "server.log",
            echo=click.echo,
        )
    if rest["json_path"]:
        Path(rest["json_path"]).write_text(reports_json(reports))
    failed = sum(r.failed + r.reload_failures for r in reports)
    click.echo(f"{failed} failed requests in all" + (" (reloads included)" if reload_during else ""))
    if failed:
        raise click.exceptions.Exit(1)


COMMANDS = (
    serve_command,
    loadtest_command,
)
