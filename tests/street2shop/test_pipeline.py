"""The saved pipeline and its Python API: one directory that records proxy, descriptor, preset and catalog.

Tiny synthetic sets and the cheap colorhist descriptor; the hp proxy's weights come from a one-step training.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from index import IndexMismatchError, ProductIndex
from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from street2shop import BadImageError, Pipeline, SearchHit, SearchResult
from street2shop.cli import cli
from street2shop.engine import DESCRIPTOR_FILE, build_index
from street2shop.pipeline import SEARCH_BATCH

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from retrieval.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", n_products=12, seed=0)
    return load_viton(root, split="val")


@pytest.fixture
def shop(dataset, tmp_path):
    """A colorhist pipeline of the synthetic catalog (proxy none), as `street2shop index` writes it."""
    build_index(dataset.catalog, create_descriptor("colorhist"), tmp_path / "shop", progress=False)
    return tmp_path / "shop"


def _invoke(*arguments):
    return CliRunner().invoke(cli, [str(a) for a in arguments])


# ------------------------------------------------------------------------------------ search
def test_search_takes_every_kind_of_image_and_agrees_with_the_file(shop, dataset):
    pipeline = Pipeline.load(shop, device="cpu")
    path = dataset.catalog["image"].iloc[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    kinds = [
        path,
        Path(path),
        Path(path).read_bytes(),
        Image.open(path),
        rgb,
        rgba,
        rgb.astype(np.uint16) * 257,
        rgb.astype(np.float32) / 255,
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255,
    ]
    results = pipeline.search(kinds, k=3)
    assert len(results) == len(kinds) and all(isinstance(r, SearchResult) for r in results)
    reference = results[0]
    assert reference.hits[0] == SearchHit(1, str(dataset.catalog["product_id"].iloc[0]), pytest.approx(1.0, abs=1e-4))
    for result in results[1:]:
        assert [h.product_id for h in result.hits] == [h.product_id for h in reference.hits]
        assert [h.rank for h in result.hits] == [1, 2, 3]
        np.testing.assert_allclose([h.score for h in result.hits], [h.score for h in reference.hits], atol=2e-3)
    assert reference.descriptor_input.dtype == np.uint8 and reference.descriptor_input.shape == (128, 96, 3)
    assert reference.crop_box is None and {"decode", "proxy", "describe", "search"} <= set(reference.timings_ms)
    # one image alone, grey, and a 4-D batch give one result per image
    assert len(pipeline.search(path, k=100)[0].hits) == pipeline.ntotal
    assert len(pipeline.search(np.asarray(Image.open(path).convert("L")), k=2)) == 1
    assert len(pipeline.search(np.stack([rgb, rgb]), k=2)) == 2
    assert len(pipeline.search(torch.stack([kinds[-1]] * 3), k=2)) == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "empty"),
        (b"this is a text file, not a photo", "not an image"),
        ("TRUNCATED", "corrupt or truncated"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "zero size"),
        (torch.full((3, 4, 4), 2.0), "outside \\[0, 1\\]"),
        (12345, "give a file path"),
        ("/no/such/photo.jpg", "not found"),
    ],
    ids=["empty", "text", "truncated", "channels", "zero", "tensor-range", "int", "missing"],
)
def test_bad_images_are_refused_with_a_clear_error(shop, dataset, bad, message):
    pipeline = Pipeline.load(shop, device="cpu")
    if isinstance(bad, str) and bad == "TRUNCATED":
        bad = Path(dataset.catalog["image"].iloc[0]).read_bytes()[:300]
    with pytest.raises(BadImageError, match=message):
        pipeline.search([dataset.catalog["image"].iloc[0], bad], k=2)
    with pytest.raises(ValueError, match="k must be"):
        pipeline.search(dataset.catalog["image"].iloc[0], k=0)


# ------------------------------------------------------------------------------------ catalog updates
def test_add_remove_save_reload_and_product_images(shop, dataset):
    pipeline = Pipeline.load(shop, device="cpu")
    first = str(dataset.catalog["product_id"].iloc[0])
    assert pipeline.product_image_path(first) == Path(dataset.catalog["image"].iloc[0]).resolve()
    query = dataset.queries["image"].iloc[0]
    new_photo = 255 - np.asarray(Image.open(dataset.catalog["image"].iloc[1]).convert("RGB"))  # a negative
    encoded = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(new_photo[..., [2, 0, 1]])).save(encoded, format="JPEG")
    before = pipeline.ntotal
    pipeline.add(["flipped", "mirrored"], [new_photo, encoded.getvalue()])
    with pytest.raises(ValueError, match="already in the index"):
        pipeline.add(["flipped"], [new_photo])
    with pytest.raises(KeyError, match="nope"):
        pipeline.remove(["nope", first])
    pipeline.remove([first])
    assert pipeline.ntotal == before + 1
    assert pipeline.search(new_photo, k=1)[0].hits[0].product_id == "flipped"
    pipeline.save()
    again = Pipeline.load(shop, device="cpu")
    assert again.ntotal == before + 1 and first not in again.index
    stored = again.product_image_path("flipped")
    assert stored.parent == shop / "images" and stored.suffix == ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(stored)), new_photo)
    assert again.product_image_path("mirrored").suffix == ".jpg"
    assert again.product_image_path("mirrored").read_bytes() == encoded.getvalue()
    assert again.search(new_photo, k=1)[0].hits[0].product_id == "flipped"
    with pytest.raises(KeyError, match="not in the index"):
        again.product_image_path(first)
    described = again.describe()
    assert described == {
        "recipe": None,
        "proxy": "none",
        "descriptor": "colorhist",
        "preset": "flat",
        "products": before + 1,
        "dim": 256,
        "rerank": 0,
        "query_bank": None,
        "device": "cpu",
    }
    assert len(again.search(query, k=3)[0].hits) == 3
    # a copy of the directory is self-contained: stored images travel with it
    copy = shop.parent / "copy"
    shutil.copytree(shop, copy, symlinks=True)
    assert Pipeline.load(copy, device="cpu").product_image_path("flipped").read_bytes() == stored.read_bytes()


def test_query_bank_scores_are_similarity_minus_offsets_through_add_remove_save_and_load(shop, dataset):
    pipeline, reference = Pipeline.load(shop, device="cpu"), Pipeline.load(shop, device="cpu")  # reference: no bank
    query = dataset.queries["image"].iloc[0]
    bank_photos = list(dataset.queries["image"].iloc[1:])  # typical query photos (not `query` itself)
    pipeline.use_query_bank(bank_photos, beta=5.0, sources=("synthetic",))
    assert pipeline.describe()["query_bank"] == {"photos": len(bank_photos), "beta": 5.0, "sources": ["synthetic"]}

    def ranked(p):
        return [(hit.score, hit.product_id) for hit in p.search(query, k=p.ntotal)[0].hits]

    def expected():
        """The reference's cosines minus each product's offset against the bank, best first."""
        offsets = dict(zip(pipeline.index.product_ids, pipeline.index.bank_offsets(pipeline.bank.vectors, 5.0)))
        return sorted(((score - offsets[pid], pid) for score, pid in ranked(reference)), reverse=True)

    def assert_ranked_as_expected(p):
        got, want = ranked(p), expected()
        assert [pid for _, pid in got] == [pid for _, pid in want]
        np.testing.assert_allclose([score for score, _ in got], [score for score, _ in want], atol=1e-5)

    assert_ranked_as_expected(pipeline)
    negative = 255 - np.asarray(Image.open(dataset.catalog["image"].iloc[1]).convert("RGB"))
    for p in (pipeline, reference):
        p.add(["negative"], [negative])  # the pipeline's new offset comes from its stored bank
        p.remove([str(dataset.catalog["product_id"].iloc[2])])
    assert_ranked_as_expected(pipeline)
    pipeline.save()
    again = Pipeline.load(shop, device="cpu")
    assert again.describe()["query_bank"]["photos"] == len(bank_photos)
    assert_ranked_as_expected(again)


def test_a_cached_query_bank_is_reused_and_a_damaged_one_embedded_again(shop, dataset, tmp_path, caplog):
    pipeline = Pipeline.load(shop, device="cpu")
    bank_photos = list(dataset.queries["image"])
    pipeline.use_query_bank(bank_photos, cache_dir=tmp_path)
    first = pipeline.bank.vectors.copy()
    (stored,) = (tmp_path / "query-banks").glob("*.npy")
    embedded = []
    original = pipeline._embed_queries
    pipeline._embed_queries = lambda *args: embedded.append(1) or original(*args)
    pipeline.use_query_bank(bank_photos, cache_dir=tmp_path)
    assert embedded == [] and np.array_equal(pipeline.bank.vectors, first)
    stored.write_bytes(stored.read_bytes()[:-5])  # damaged: the checksum footer no longer matches
    with caplog.at_level(logging.WARNING):
        pipeline.use_query_bank(bank_photos, cache_dir=tmp_path)
    assert embedded and "embedding the bank again" in caplog.text
    np.testing.assert_allclose(pipeline.bank.vectors, first, atol=1e-6)


def test_an_interrupted_query_bank_goes_on_from_its_saved_batches(shop, dataset, tmp_path, monkeypatch):
    import street2shop.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "BANK_CHECKPOINT_S", -1.0)  # save after every batch
    photos = list(dataset.queries["image"])
    bank_photos = (photos * (2 * SEARCH_BATCH // len(photos) + 2))[: 2 * SEARCH_BATCH + 5]  # three batches
    reference = Pipeline.load(shop, device="cpu")
    reference.use_query_bank(bank_photos)  # no cache: the uninterrupted vectors
    pipeline = Pipeline.load(shop, device="cpu")
    original, starts = pipeline._embed_queries, []

    def interrupted_at_the_third_batch(items, start, clock):
        starts.append(start)
        if len(starts) == 3:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return original(items, start, clock)

    pipeline._embed_queries = interrupted_at_the_third_batch
    with pytest.raises(KeyboardInterrupt):
        pipeline.use_query_bank(bank_photos, cache_dir=tmp_path)
    (partial,) = (tmp_path / "query-banks").glob("*.partial.npy")
    starts.clear()
    pipeline._embed_queries = lambda items, start, clock: starts.append(start) or original(items, start, clock)
    pipeline.use_query_bank(bank_photos, cache_dir=tmp_path)
    assert starts == [2 * SEARCH_BATCH]  # only the batch that was cut off
    np.testing.assert_allclose(pipeline.bank.vectors, reference.bank.vectors, atol=1e-6)
    assert not partial.exists() and len(list((tmp_path / "query-banks").glob("*.npy"))) == 1


class _CountingEmbed:
    """Wraps a descriptor's single pass (`embed_unaugmented`) and counts the images it embeds."""

    def __init__(self, descriptor):
        self.embed, self.images = descriptor.embed_unaugmented, 0

    def __call__(self, images):
        self.images += len(images)
        return self.embed(images)


def _tiny_catalog(folder: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """`count` distinct 12x9 product photos (random colours) and their table."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        path = folder / f"p{seed}-{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)).save(path)
        rows.append({"product_id": f"p{seed}-{i:04d}", "image": str(path)})
    return pd.DataFrame(rows)


def test_adding_one_product_to_an_indexed_catalog_of_1000_embeds_one_image(tmp_path, monkeypatch):
    catalog = _tiny_catalog(tmp_path / "photos", 1000)
    descriptor = create_descriptor("colorhist")
    counter = _CountingEmbed(descriptor)
    monkeypatch.setattr(descriptor, "embed_unaugmented", counter)  # the one pass a catalog photo gets
    cache = tmp_path / "cache"
    build_index(catalog, descriptor, tmp_path / "first", progress=False, cache_dir=cache)
    assert counter.images == 1000
    # one new product inserted at the front: every later row moves, the cache still knows them all
    grown = pd.concat([_tiny_catalog(tmp_path / "new", 1, seed=1), catalog], ignore_index=True)
    counter.images = 0
    build_index(grown, descriptor, tmp_path / "second", progress=False, cache_dir=cache)
    assert counter.images == 1
    # `street2shop add` with the grown catalog embeds only the product the index lacks
    grown.to_csv(tmp_path / "grown.csv", index=False)
    from retrieval.descriptors.colorhist import ColorHistogram

    calls = []
    original = ColorHistogram.embed_unaugmented
    monkeypatch.setattr(
        ColorHistogram,
        "embed_unaugmented",
        lambda self, images: (calls.append(len(images)), original(self, images))[1],
    )
    result = _invoke("add", tmp_path / "first", "--catalog", f"csv:{tmp_path / 'grown.csv'}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sum(calls) == 1 and "added 1 products" in result.output and "1000 already there" in result.output
    added = Pipeline.load(tmp_path / "first", device="cpu")
    assert added.ntotal == 1001 and added.product_image_path("p1-0000") == Path(grown["image"].iloc[0]).resolve()
    result = _invoke("remove", tmp_path / "first", "p1-0000", "p0-0003")
    assert result.exit_code == 0, result.output
    assert Pipeline.load(tmp_path / "first", device="cpu").ntotal == 999
    result = _invoke("remove", tmp_path / "first", "p0-0003")
    assert result.exit_code == 2 and "p0-0003" in result.output and "not in the index" in result.output


# ------------------------------------------------------------------------------------ the recorded proxy
@pytest.fixture(scope="module")
def parser_checkpoint(dataset, tmp_path_factory):
    from generation.proxies import create_proxy

    tiny = {"epochs": 1, "batch_size": 16, "image_size": (32, 32), "progress": False, "val_images": 0}
    return create_proxy("hp").train_on(dataset, tmp_path_factory.mktemp("parser") / "run", **tiny)


def test_the_index_records_its_proxy_weights_and_refuses_another_proxy(dataset, parser_checkpoint, tmp_path):
    from generation.proxies import create_proxy

    catalog = dataset.catalog.assign(product_id=dataset.catalog["product_id"].astype(str))
    catalog.to_csv(tmp_path / "catalog.csv", index=False)
    weights = tmp_path / "moved" / "final.pt"
    weights.parent.mkdir()
    shutil.copy(parser_checkpoint, weights)
    spec = f"hp@{weights}"
    out = tmp_path / "idx"
    result = _invoke(
        "index", "--catalog", f"csv:{tmp_path / 'catalog.csv'}", "--proxy", spec, "--descriptor", "colorhist",
        "--out", out, "--device", "cpu", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = create_proxy(spec).eval()
    shutil.rmtree(weights.parent)  # the index must not need the checkpoint any more
    pipeline = Pipeline.load(out, device="cpu")
    assert pipeline.proxy.uses_parser and pipeline.proxy.fingerprint() == expected.fingerprint()
    assert pipeline.describe()["proxy"] == spec and (out / "proxy.pt").exists()
    photo = dataset.queries["image"].iloc[0]
    seen = pipeline.search(photo, k=2)[0].descriptor_input
    with torch.no_grad():
        from retrieval.io import images_to_tensor, read_image, resize_image
        from retrieval.proxy_stage import to_descriptor_input

        batch = images_to_tensor([resize_image(read_image(photo), (128, 96))])
        manual = to_descriptor_input(expected(batch), (128, 96)).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(seen, manual)
    # the crop is reported in the photo's own pixels: the box hp cut the garment from, scaled back
    _, boxes = expected.forward_with_boxes(batch)
    photo_h, photo_w = read_image(photo).shape[:2]
    box = pipeline.search(photo, k=1)[0].crop_box
    if boxes[0] is None:
        assert box is None
    else:
        x0, y0, x1, y1 = boxes[0]
        sx, sy = photo_w / 96, photo_h / 128
        assert box == (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
        assert 0 <= box[0] < box[2] <= photo_w and 0 <= box[1] < box[3] <= photo_h
    # query needs nothing else; a conflicting --proxy is refused with the fix
    plain = _invoke("query", "--index", out, photo, "--k", "2", "--format", "json", "--device", "cpu")
    assert plain.exit_code == 0, plain.output
    assert '"product_id"' in plain.output
    refused = _invoke("query", "--index", out, photo, "--proxy", "none", "--device", "cpu")
    assert refused.exit_code == 2 and "drop --proxy" in refused.output, refused.output
    refused = _invoke("query", "--index", out, photo, "--descriptor", "gem", "--device", "cpu")
    assert refused.exit_code == 2 and "drop --descriptor" in refused.output, refused.output
    same = _invoke("query", "--index", out, photo, "--proxy", "hp", "--descriptor", "colorhist", "--device", "cpu")
    assert same.exit_code == 0, same.output
    # a damaged proxy.pt is caught by its checksum
    live = (out / "proxy.pt").resolve()
    live.write_bytes(live.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="checksum"):
        Pipeline.load(out, device="cpu")


def test_an_index_without_a_recorded_proxy_loads_as_proxy_none_and_says_so(shop, dataset, caplog):
    index = ProductIndex.load(shop, device="cpu")
    index._metadata.pop("pipeline")  # what an index written before pipelines looks like
    index.save(shop, attachments={DESCRIPTOR_FILE: index.read_attachment(DESCRIPTOR_FILE)})
    with caplog.at_level(logging.WARNING, logger="street2shop"):
        pipeline = Pipeline.load(shop, device="cpu")
    assert pipeline.proxy.name == "none" and "records no proxy" in caplog.text
    assert Pipeline.load(shop, device="cpu", proxy="hp").proxy.name == "hp", "the old way: the caller names it"
    with pytest.raises(KeyError, match="keeps no image"):
        pipeline.product_image_path(str(dataset.catalog["product_id"].iloc[0]))


def test_load_refuses_a_conflicting_descriptor(shop):
    with pytest.raises(IndexMismatchError, match="drop --descriptor"):
        Pipeline.load(shop, device="cpu", descriptor="gem")


# ------------------------------------------------------------------------------------ README
def test_the_readme_python_example_runs(shop, dataset, tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shop.rename(tmp_path / "shop-index")
    shutil.copy(dataset.queries["image"].iloc[0], tmp_path / "street.jpg")
    shutil.copy(dataset.catalog["image"].iloc[2], tmp_path / "new-product.jpg")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert Pipeline.load(tmp_path / "shop-index", device="cpu").ntotal == len(dataset.catalog)


def test_a_fused_pipeline_is_self_contained(dataset, tmp_path):
    """A fusion of trained branches, indexed: the index loads with the branches' checkpoints gone, rebuilds the
    same fusion (fingerprint, weights) and ranks exactly as the fusion's own vectors do."""
    branches = "colorhist[image_size=(48, 32)]|colorhist[image_size=(48, 32);bins=(8, 2, 2)]"
    fused = create_descriptor(f"fused[branches={branches}]")
    final = fused.train_on(dataset, tmp_path / "run", seed=0, progress=False, grid_step=0.25)
    moved = tmp_path / "moved.pt"
    shutil.move(final, moved)
    trained = create_descriptor(f"fused@{moved}")
    build_index(dataset.catalog, trained, tmp_path / "shop", progress=False)
    moved.unlink()  # the index must not need it
    pipeline = Pipeline.load(tmp_path / "shop", device="cpu")
    assert pipeline.descriptor.fingerprint() == trained.fingerprint()
    assert pipeline.descriptor.fusion_weights.tolist() == trained.fusion_weights.tolist()
    photo = dataset.queries["image"].iloc[0]
    hits = pipeline.search(photo, k=3)[0].hits
    from retrieval.io import images_to_tensor, read_image, resize_image

    query = trained.embed(images_to_tensor([resize_image(read_image(photo), trained.input_spec.size)]))
    gallery = trained.embed(
        images_to_tensor([resize_image(read_image(p), trained.input_spec.size) for p in dataset.catalog["image"]])
    )
    order = torch.argsort(gallery @ query[0], descending=True)[:3].tolist()
    assert [h.product_id for h in hits] == [str(dataset.catalog["product_id"].iloc[i]) for i in order]
