"""The FastAPI application: `create_app(index_dir, ...)` -> an ASGI app (uvicorn serves it; tests use TestClient).

Endpoints (OpenAPI at /openapi.json, rendered at /docs by a page the package ships; no CDN):

    GET    /                              the search page (static/index.html)
    POST   /search                        multipart `image` (+ `k`, `proxy_image`) -> ranked products
    GET    /products/{product_id}/image   the catalog photo of a product
    POST   /products                      multipart `product_id` + `image`: add a product   (token)
    DELETE /products/{product_id}         remove a product                                    (token)
    POST   /admin/reload                  load the saved index again, swap it in live          (token)
    GET    /health, GET /metrics

Errors are JSON `{"error": MESSAGE, "status": CODE}` with a 4xx for anything the client can fix.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException

from retrieval.io import get_max_pixels

from .batcher import MicroBatcher
from .host import DuplicateProductError, PipelineHost
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware, TimeoutMiddleware
from .uploads import MEDIA_TYPES, UploadError, check_upload, sniff_format

log = logging.getLogger("street2shop.service")
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_K = 100
#: Room the multipart framing and the small form fields take beside the photo itself.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_PRODUCT_ID_CHARS = 200


@dataclass(frozen=True)
class ServiceSettings:
    """Everything `street2shop serve` configures besides the index directory.

    Attributes:
        token: when set, writes (add, remove, reload) need `Authorization: Bearer <token>`.
        device: "auto", "cpu" or "cuda", for `Pipeline.load`.
        max_upload_bytes: cap on one uploaded photo (the whole body may add FORM_OVERHEAD_BYTES).
        max_pixels: cap on a photo's width x height, checked on its header before decoding.
        request_timeout_s: a request still running after this is cancelled with 504.
        batch_wait_ms: how long the batcher waits for more concurrent searches to join a batch.
        max_batch: the most photos searched in one `pipeline.search` call.
    """

    token: Optional[str] = None
    device: str = "auto"
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = get_max_pixels()
    request_timeout_s: float = 30.0
    batch_wait_ms: float = 2.0
    max_batch: int = 32


def default_loader(index_dir: Path, device: str = "auto") -> Any:
    from street2shop import Pipeline

    return Pipeline.load(index_dir, device=device)


def image_url(product_id: str) -> str:
    return f"/products/{quote(product_id, safe='')}/image"


def png_data_url(image: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB -> "data:image/png;base64,...", for the page to show without another request."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def trim_result(result: Any, k: int) -> Any:
    """A SearchResult of a batch run at the batch's largest k, cut to one request's k."""
    return replace(result, hits=list(result.hits[:k])) if len(result.hits) > k else result


def search_payload(result: Any, proxy_image: bool = False) -> dict:
    """A `SearchResult` -> the JSON body of POST /search (the hits exactly as the pipeline returned them)."""
    payload = {
        "results": [
            {"rank": int(hit.rank), "product_id": str(hit.product_id), "score": float(hit.score)}
            | {"image_url": image_url(str(hit.product_id))}
            for hit in result.hits
        ],
        "timings_ms": {name: round(float(ms), 3) for name, ms in result.timings_ms.items()},
        "crop_box": None if result.crop_box is None else [int(v) for v in result.crop_box],
    }
    if proxy_image:
        payload["proxy_image"] = png_data_url(result.descriptor_input)
    return payload


def _error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _field_problems(errors) -> str:
    problems = []
    for error in errors:
        name = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
        if error.get("type") == "missing":
            problems.append(f"field {name!r} is missing")
        elif "UploadFile" in str(error.get("msg", "")) or "file" in str(error.get("type", "")):
            problems.append(f"field {name!r} must be a file upload")
        else:
            problems.append(f"field {name!r}: {error.get('msg')}")
    return "; ".join(problems)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError):
        return _error_response(error.status, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        route = f"{request.method} {request.url.path}"
        if request.method == "POST" and not content_type.startswith("multipart/form-data"):
            return _error_response(
                415,
                f"{route} takes a multipart/form-data body (an HTML form with a file field), "
                f"got content type {content_type or 'none'!r}; e.g. curl -F image=@photo.jpg",
            )
        return _error_response(422, f"{route}: {_field_problems(error.errors())}")


def _check_product_id(product_id: str) -> str:
    product_id = product_id.strip()
    if not product_id or len(product_id) > MAX_PRODUCT_ID_CHARS or not product_id.isprintable():
        raise HTTPException(
            422, f"product_id must be 1 to {MAX_PRODUCT_ID_CHARS} printable characters, got {product_id[:40]!r}"
        )
    return product_id


def create_app(
    index_dir: Path | str,
    settings: ServiceSettings = ServiceSettings(),
    *,
    loader: Callable[..., Any] = default_loader,
) -> FastAPI:
    """Load the pipeline of `index_dir` once and build the service around it.

    Args:
        index_dir: a saved pipeline (`street2shop index --out DIR`).
        settings: caps, token, batching (ServiceSettings).
        loader: `(index_dir, device=...) -> Pipeline`; `Pipeline.load` unless a caller needs another.
    """
    host = PipelineHost(Path(index_dir), loader, settings.device)
    batcher = MicroBatcher(
        host.search, trim=trim_result, max_wait_ms=settings.batch_wait_ms, max_batch=settings.max_batch
    )
    metrics = Metrics()

    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="street2shop",
        summary="Find the shop product a person wears, from a photo.",
        version=__import__("street2shop").__version__,
        docs_url=None,  # FastAPI's /docs pulls Swagger UI from a CDN: static/docs.html renders /openapi.json instead
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.host = host
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.settings = settings
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(TimeoutMiddleware, seconds=settings.request_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it sees timeouts and refusals too
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
            raise HTTPException(
                401,
                "this request changes the service: send the header 'Authorization: Bearer <token>' "
                "with the token the service was started with (--token)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def checked_upload(upload: UploadFile) -> bytes:
        data = await upload.read()
        checked = await run_in_threadpool(
            check_upload, data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels
        )
        return checked.data

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    @app.post("/search", summary="Top-k products for one photo")
    async def search(
        image: UploadFile = File(..., description="The photo (JPEG, PNG, WebP, GIF, BMP or TIFF)."),
        k: int = Form(10, ge=1, le=MAX_K, description="How many products to return."),
        proxy_image: bool = Form(False, description="Also return what the descriptor saw, as a PNG data URL."),
    ) -> dict:
        """Searches the catalog for the product in the photo.

        Returns `results` (rank from 1, product_id, score, image_url), best first, `timings_ms` (the
        pipeline's stages for the batch this photo ran in, plus `queue` and `total` on the server),
        `batch_size`, `crop_box` ([x0, y0, x1, y1] in the photo's pixels where the proxy localised
        the garment, or null) and, with `proxy_image=true`, `proxy_image` (a PNG data URL).
        """
        started = time.perf_counter()
        data = await checked_upload(image)
        try:
            result, info = await asyncio.wrap_future(batcher.submit(data, k))
        except ValueError as error:  # the pipeline's BadImageError: a photo it cannot use
            raise HTTPException(400, f"the photo cannot be searched: {error}") from None
        payload = await run_in_threadpool(search_payload, result, proxy_image)
        payload["timings_ms"]["queue"] = round(info.queue_ms, 3)
        payload["timings_ms"]["total"] = round((time.perf_counter() - started) * 1000.0, 3)
        payload["batch_size"] = info.size
        return payload

    @app.get("/products/{product_id:path}/image", summary="A product's catalog photo")
    async def product_image(product_id: str):
        # The id is looked up in the pipeline: the path comes from the index, never from the URL.
        try:
            path = host.product_image_path(product_id)
        except KeyError:
            raise HTTPException(404, f"no product {product_id!r} in the catalog") from None
        with open(path, "rb") as handle:
            kind = sniff_format(handle.read(16))
        return FileResponse(path, media_type=MEDIA_TYPES.get(kind, "application/octet-stream"))

    @app.post("/products", status_code=201, dependencies=[Depends(require_token)], summary="Add a product")
    async def add_product(
        product_id: str = Form(..., description="A new, unique product id."),
        image: UploadFile = File(..., description="The product's catalog photo."),
    ) -> dict:
        """Embeds the photo, adds it to the index and saves the index (a new version on disk)."""
        product_id = _check_product_id(product_id)
        data = await checked_upload(image)
        try:
            await run_in_threadpool(host.add, product_id, data)
        except DuplicateProductError as error:
            raise HTTPException(409, str(error)) from None
        except ValueError as error:  # the pipeline's BadImageError
            raise HTTPException(400, f"product {product_id!r} was not added: {error}") from None
        return {"added": product_id, "products": host.pipeline.n_products, "generation": host.generation}

    @app.delete("/products/{product_id:path}", dependencies=[Depends(require_token)], summary="Remove a product")
    async def remove_product(product_id: str) -> dict:
        """Removes the product from the index and saves the index (a new version on disk)."""
        try:
            await run_in_threadpool(host.remove, product_id)
        except KeyError:
            raise HTTPException(404, f"no product {product_id!r} in the catalog") from None
        return {"removed": product_id, "products": host.pipeline.n_products, "generation": host.generation}

    @app.post("/admin/reload", dependencies=[Depends(require_token)], summary="Reload the index from disk")
    async def reload() -> dict:
        """Loads the index directory's current version and swaps it in; searches continue meanwhile."""
        timing = await run_in_threadpool(host.reload)
        return {
            "reloaded": str(host.index_dir),
            **timing,
            "products": host.pipeline.n_products,
            "generation": host.generation,
        }

    @app.get("/health", summary="Liveness and what is loaded")
    async def health() -> dict:
        return {"status": "ok", "pipeline": await run_in_threadpool(host.describe)}

    @app.get("/metrics", summary="Request counts, latency percentiles, batching")
    async def metrics_endpoint() -> dict:
        return {
            **metrics.snapshot(),
            "batching": batcher.stats(),
            "reloads": host.reloads,
            "settings": {key: value for key, value in asdict(settings).items() if key != "token"},
        }

    return app
