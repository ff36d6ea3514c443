"""The HTTP search service (`street2shop serve`): FastAPI + uvicorn around one loaded `Pipeline`.

Needs the optional `serve` extra (fastapi, uvicorn, python-multipart): ``pip install -e ".[serve]"``.
Importing this package without it raises `MissingServeExtraError` saying so.

Example:
    >>> from street2shop.service import create_app  # doctest: +SKIP
    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> client = TestClient(create_app("shop-index"))  # doctest: +SKIP
    >>> client.post("/search", files={"image": open("photo.jpg", "rb")}).json()["results"][0]  # doctest: +SKIP
    {'rank': 1, 'product_id': '000003_1', 'score': 0.93, 'image_url': '/products/000003_1/image'}
"""

from __future__ import annotations

SERVE_EXTRA_HINT = 'pip install -e ".[serve]"  (fastapi, uvicorn, python-multipart)'


class MissingServeExtraError(RuntimeError):
    """The `serve` extra is not installed."""


try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401  (FastAPI's form parser)
    import uvicorn  # noqa: F401
except ImportError as error:
    raise MissingServeExtraError(
        f"the HTTP service needs the optional 'serve' extra, which is not installed ({error}): "
        f"run {SERVE_EXTRA_HINT} in the project directory"
    ) from error

from .app import ServiceSettings, create_app  # noqa: E402

__all__ = ["ServiceSettings", "create_app", "MissingServeExtraError", "SERVE_EXTRA_HINT"]
