"""The HTTP service (street2shop.service) through FastAPI's TestClient: endpoints, refusals, writes, batching."""

import base64
import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from retrieval.datasets import load_viton  # noqa: E402
from retrieval.descriptors import create_descriptor  # noqa: E402
from street2shop import Pipeline  # noqa: E402
from street2shop.engine import build_index  # noqa: E402
from street2shop.service import ServiceSettings, create_app  # noqa: E402
from street2shop.service.app import STATIC_DIR  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return load_viton(synthetic_root, split="val")


@pytest.fixture(scope="module")
def index_dir(dataset, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("service") / "idx"
    build_index(dataset.catalog, create_descriptor("colorhist"), index_dir, progress=False, faiss_device="cpu")
    return index_dir


def make_client(index_dir, **settings) -> TestClient:
    settings = {"device": "cpu", "token": TOKEN, **settings}
    return TestClient(create_app(index_dir, ServiceSettings(**settings)))


@pytest.fixture(scope="module")
def client(index_dir):
    with make_client(index_dir, max_pixels=4_000_000) as client:
        yield client


def photo_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def search(client, data: bytes, k: int = 5, **extra):
    return client.post("/search", files={"image": ("photo.jpg", data, "image/jpeg")}, data={"k": str(k), **extra})


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height RGB pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_search_returns_exactly_what_pipeline_search_returns(client, dataset, index_dir):
    query = photo_bytes(dataset.queries["image"].iloc[0])
    response = search(client, query, k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = Pipeline.load(index_dir, device="cpu").search(query, k=5)[0]
    assert [(r["rank"], r["product_id"], r["score"]) for r in body["results"]] == [
        (h.rank, h.product_id, h.score) for h in expected.hits
    ]
    assert all(r["image_url"] == f"/products/{r['product_id']}/image" for r in body["results"])
    assert {"decode", "describe", "search", "queue", "total"} <= set(body["timings_ms"]) and body["batch_size"] >= 1
    assert body["crop_box"] is None and "proxy_image" not in body


def test_search_finds_a_catalog_photo_and_returns_the_proxy_output(client, dataset, index_dir):
    product = dataset.catalog.iloc[3]
    photo = photo_bytes(product["image"])
    body = search(client, photo, k=3, proxy_image="true").json()
    assert body["results"][0]["product_id"] == str(product["product_id"])
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    header, encoded = body["proxy_image"].split(",", 1)
    assert header == "data:image/png;base64"
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
    expected = Pipeline.load(index_dir, device="cpu").search(photo, k=3)[0].descriptor_input
    np.testing.assert_array_equal(shown, expected)  # PNG: lossless


def _truncated_jpeg(dataset) -> bytes:
    data = photo_bytes(dataset.queries["image"].iloc[0])
    return data[: len(data) // 2]


MALFORMED = {
    "truncated JPEG": (lambda d: {"files": {"image": ("a.jpg", _truncated_jpeg(d), "image/jpeg")}}, 400, "truncated"),
    "bomb PNG": (lambda d: {"files": {"image": ("a.png", png_declaring(100_000, 100_000), "image/png")}}, 413, "pixel"),
    "bomb under Pillow's own guard": (
        lambda d: {"files": {"image": ("a.png", png_declaring(3000, 3000), "image/png")}},
        413,
        "9,000,000 pixels",
    ),
    "text named .jpg": (
        lambda d: {"files": {"image": ("a.jpg", b"just some text, not a photo", "image/jpeg")}},
        415,
        "not an image",
    ),
    "empty file": (lambda d: {"files": {"image": ("a.jpg", b"", "image/jpeg")}}, 400, "empty"),
    "empty body": (lambda d: {}, 415, "multipart/form-data"),
    "50 MB body": (
        lambda d: {"files": {"image": ("a.jpg", b"\xff\xd8\xff" + bytes(50 * 2**20), "image/jpeg")}},
        413,
        "cap",
    ),
    "JSON body": (lambda d: {"json": {"image": "photo.jpg"}}, 415, "multipart/form-data"),
    "image sent as a text field": (lambda d: {"data": {"image": "photo.jpg"}}, 415, "multipart/form-data"),
    "no image field": (lambda d: {"files": {"photo": ("a.jpg", b"x", "image/jpeg")}}, 422, "'image' is missing"),
    "k out of range": (
        lambda d: {
            "files": {"image": ("a.jpg", photo_bytes(d.catalog["image"].iloc[0]), "image/jpeg")},
            "data": {"k": "0"},
        },
        422,
        "'k'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_uploads_get_a_clear_4xx_and_the_server_keeps_serving(client, dataset, case):
    make_request, status, phrase = MALFORMED[case]
    response = client.post("/search", **make_request(dataset))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and phrase in body["error"], body
    assert search(client, photo_bytes(dataset.catalog["image"].iloc[0])).status_code == 200


def test_product_images_are_looked_up_never_joined_into_paths(client, dataset):
    product = dataset.catalog.iloc[0]
    response = client.get(f"/products/{product['product_id']}/image")
    assert response.status_code == 200 and response.content == photo_bytes(product["image"])
    assert response.headers["content-type"] == {".png": "image/png", ".jpg": "image/jpeg"}[product["image"][-4:]]
    for hostile in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..%2F" + product["image"].lstrip("/"), "nope"):
        response = client.get(f"/products/{hostile}/image")
        assert response.status_code == 404 and "no product" in response.json()["error"], hostile
    # an unencoded ../ is resolved by the client before it is sent: no route, still a JSON 404
    assert client.get("/products/../../etc/passwd/image").json()["status"] == 404


def test_writes_need_the_token_and_change_what_search_finds(index_dir, dataset, tmp_path):
    street = dataset.queries.iloc[0]
    new_photo = photo_bytes(street["image"])  # a street photo as a new product: it must then come first
    with make_client(index_dir) as client:
        before = client.get("/health").json()["pipeline"]["products"]
        form = {"data": {"product_id": "new-1"}, "files": {"image": ("n.jpg", new_photo, "image/jpeg")}}
        assert client.post("/products", **form).status_code == 401
        assert client.post("/products", **form, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        added = client.post("/products", **form, headers=auth)
        assert added.status_code == 201, added.text
        assert added.json()["products"] == before + 1
        assert search(client, new_photo).json()["results"][0]["product_id"] == "new-1"
        assert client.get("/products/new-1/image").content == new_photo
        assert client.post("/products", **form, headers=auth).status_code == 409
        bad = {"data": {"product_id": "new-2"}, "files": {"image": ("n.jpg", b"text", "image/jpeg")}}
        assert client.post("/products", **bad, headers=auth).status_code == 415
        # persisted: a reload from disk still has it
        assert client.post("/admin/reload").status_code == 401
        reloaded = client.post("/admin/reload", headers=auth)
        assert reloaded.status_code == 200 and reloaded.json()["products"] == before + 1
        assert client.delete("/products/new-1").status_code == 401
        assert client.delete("/products/new-1", headers=auth).json()["products"] == before
        assert client.delete("/products/new-1", headers=auth).status_code == 404
        assert search(client, new_photo).json()["results"][0]["product_id"] != "new-1"
        assert client.post("/admin/reload", headers=auth).json()["products"] == before


def test_health_metrics_docs_and_the_page_use_no_cdn(client, dataset):
    search(client, photo_bytes(dataset.catalog["image"].iloc[0]))
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["pipeline"]["products"] == len(dataset.catalog)
    metrics = client.get("/metrics").json()
    route = metrics["routes"]["POST /search"]
    assert route["count"] >= 1 and {"p50", "p90", "p99"} <= set(route["latency_ms"])
    assert metrics["batching"]["photos"] >= 1 and "token" not in metrics["settings"]
    schema = client.get("/openapi.json").json()
    assert {"/search", "/products", "/admin/reload", "/health", "/metrics"} <= set(schema["paths"])
    for page in ("/", "/docs"):
        response = client.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    for asset in STATIC_DIR.iterdir():
        text = asset.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset.name
        if asset.name != "index.html":
            assert client.get(f"/static/{asset.name}").status_code == 200


def test_concurrent_searches_are_batched_and_stay_consistent_with_writes(index_dir, dataset):
    """Searches from many threads while products are added, removed and the index reloaded: every search
    answers 200 with ids of the catalog at some point in time, and searches share pipeline calls."""
    catalog_ids = set(map(str, dataset.catalog["product_id"]))
    photos = [photo_bytes(p) for p in dataset.queries["image"].iloc[:-1]]
    extra = photo_bytes(dataset.queries["image"].iloc[-1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with make_client(index_dir, batch_wait_ms=20) as client:
        stop = threading.Event()

        def writer():
            n = 0
            while not stop.is_set():
                n += 1
                form = {"data": {"product_id": f"w{n}"}, "files": {"image": ("w.jpg", extra, "image/jpeg")}}
                assert client.post("/products", **form, headers=auth).status_code == 201
                assert client.delete(f"/products/w{n}", headers=auth).status_code == 200
                assert client.post("/admin/reload", headers=auth).status_code == 200

        def one_search(i):
            response = search(client, photos[i % len(photos)], k=24)
            assert response.status_code == 200, response.text
            ids = [r["product_id"] for r in response.json()["results"]]
            assert set(ids) - catalog_ids <= {f"w{n}" for n in range(1000)} and len(ids) == len(set(ids))
            return response.json()["batch_size"]

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                sizes = list(pool.map(one_search, range(48)))
        finally:
            stop.set()
            thread.join()
        assert max(sizes) > 1, "concurrent searches never shared a batch"
        assert client.get("/metrics").json()["batching"]["batches"] < 48
        assert client.get("/health").json()["pipeline"]["products"] == len(catalog_ids)
        assert json.loads(client.get("/metrics").text)["routes"]["POST /search"]["by_status"] == {"200": 48}


class _SlowPipeline:
    """Pipeline.load's result with a search that sleeps: for the request deadline."""

    def __init__(self, pipeline, delay_s: float):
        self._pipeline, self._delay_s = pipeline, delay_s

    def search(self, images, k=10):
        import time

        time.sleep(self._delay_s)
        return self._pipeline.search(images, k=k)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def test_a_request_past_the_deadline_gets_504_and_the_server_keeps_serving(index_dir, dataset):
    def slow_loader(directory, device="cpu"):
        return _SlowPipeline(Pipeline.load(directory, device=device), delay_s=1.0)

    settings = ServiceSettings(device="cpu", request_timeout_s=0.3)
    with TestClient(create_app(index_dir, settings, loader=slow_loader)) as slow:
        response = search(slow, photo_bytes(dataset.catalog["image"].iloc[0]))
        assert response.status_code == 504 and "0.3-second limit" in response.json()["error"]
        assert slow.get("/health").status_code == 200


def test_a_failing_batch_is_retried_photo_by_photo():
    import time

    from street2shop.service.batcher import MicroBatcher

    calls = []

    def search_fn(images, k):
        calls.append(list(images))
        time.sleep(0.05)  # the other submissions queue meanwhile
        if "bad" in images:
            raise ValueError("cannot decode 'bad'")
        return [f"{image}@{k}" for image in images]

    batcher = MicroBatcher(search_fn, trim=lambda result, k: result, max_wait_ms=50)
    try:
        futures = [batcher.submit(image, k) for image, k in (("a", 1), ("bad", 2), ("c", 3))]
        assert futures[0].result(5)[0] == "a@1" and futures[2].result(5)[0] == "c@3"  # each with its own k
        with pytest.raises(ValueError, match="cannot decode 'bad'"):
            futures[1].result(5)
        assert calls[0] == ["a", "bad", "c"] and ["bad"] in calls  # one batch, then one by one
    finally:
        batcher.close()
