"""Several images per product: the bench and the pipeline rank products by their best-matching image.

Both are checked against a brute-force reference (a numpy loop over the images, the max per product) on a
tiny synthetic catalog whose products have one to three images (the product photo and flipped / darkened
copies of it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.protocols import sampled_gallery_protocol
from benchmarks.runner import run_benchmark
from retrieval.datasets import RetrievalSet, load_viton
from retrieval.descriptors import create_descriptor
from retrieval.features import extract_features
from street2shop import Pipeline
from street2shop.engine import build_index

K = 5


@pytest.fixture(scope="module")
def several(tmp_path_factory):
    """(RetrievalSet with 1-3 catalog rows per product, 12 products, their queries)."""
    from retrieval.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("several") / "set", n_products=12, seed=3)
    data = load_viton(root, split="all")
    extra = tmp_path_factory.mktemp("extra")
    rows = []
    for n, (product_id, image) in enumerate(zip(data.catalog["product_id"], data.catalog["image"])):
        rows.append((product_id, image))
        photo = np.asarray(Image.open(image).convert("RGB"))
        variants = [photo[:, ::-1], (photo * 0.6).astype(np.uint8)][: n % 3]  # 1, 2 or 3 images
        for v, variant in enumerate(variants):
            path = extra / f"{product_id}-{v}.png"
            Image.fromarray(np.ascontiguousarray(variant)).save(path)
            rows.append((product_id, str(path)))
    catalog = pd.DataFrame(rows, columns=["product_id", "image"]).sample(frac=1.0, random_state=0)  # mixed order
    queries = data.queries.head(16).reset_index(drop=True)
    return RetrievalSet("several", catalog.reset_index(drop=True), queries, None, root).validate()


def _unit(vectors):
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def reference(data, descriptor):
    """Brute force: (Q, P) products best first, (Q, P) their scores, the max over each product's images."""
    size = descriptor.input_spec.size
    gallery = _unit(extract_features(descriptor.embed, list(data.catalog["image"]), size, progress=None))
    queries = _unit(extract_features(descriptor.embed, list(data.queries["image"]), size, progress=None))
    products = list(dict.fromkeys(data.catalog["product_id"]))
    ranked, ranked_scores = [], []
    for query in queries:
        best = {}
        for product_id, vector in zip(data.catalog["product_id"], gallery):
            best[product_id] = max(best.get(product_id, -np.inf), float(query @ vector))
        order = sorted(products, key=lambda p: -best[p])
        ranked.append(order)
        ranked_scores.append([best[p] for p in order])
    return ranked, np.array(ranked_scores), queries, gallery


def test_the_fixture_has_one_to_three_images_per_product(several):
    counts = several.catalog["product_id"].value_counts()
    assert sorted(counts.unique()) == [1, 2, 3] and several.describe().startswith("several: 12 products (24 images)")


def test_bench_ranks_products_by_their_best_image(several):
    descriptor = create_descriptor("colorhist")
    ranked, _, query_vectors, gallery_vectors = reference(several, descriptor)
    result = run_benchmark(
        several, ["colorhist"], ks=(1, 5), progress=False, bootstrap=0, protocol_draws=1, protocol_gallery=12
    )
    per_query = result.per_query
    assert per_query["top5"].tolist() == [";".join(order[:5]) for order in ranked]
    # AP@k of DESIGN.md with one relevant product, from the reference ranking, in a plain loop
    for k in (1, 5):
        expected = []
        for order, truth in zip(ranked, several.queries["product_id"]):
            rank = order.index(truth) + 1
            expected.append(1.0 / rank if rank <= k else 0.0)
        assert per_query[f"AP@{k}"].tolist() == pytest.approx(expected)
        assert result.summary[f"mAP@{k}"].iloc[0] == pytest.approx(np.mean(expected))
        accuracy = [float(order.index(truth) < k) for order, truth in zip(ranked, several.queries["product_id"])]
        assert result.summary[f"acc@{k}"].iloc[0] == pytest.approx(np.mean(accuracy))
    row = result.summary.iloc[0]
    assert (row["gallery"], row["gallery_images"]) == (12, 24)
    # the paper protocol with every product drawn is the full exact ranking, products at their best image
    assert row["paper_mAP@5"] == pytest.approx(row["mAP@5"])
    table = sampled_gallery_protocol(
        query_vectors, gallery_vectors, list(several.queries["product_id"]), list(several.catalog["product_id"]), 12, 1
    )
    assert table["mAP@1"].iloc[0] == pytest.approx(row["mAP@1"])


def test_pipeline_search_add_remove_with_several_images(several, tmp_path):
    descriptor = create_descriptor("colorhist")
    ranked, scores, _, _ = reference(several, descriptor)
    build_index(several.catalog, descriptor, tmp_path / "shop", progress=False)
    pipeline = Pipeline.load(tmp_path / "shop", device="cpu")
    assert pipeline.ntotal == 24 and pipeline.n_products == 12
    assert pipeline.describe()["products"] == 12 and pipeline.describe()["images"] == 24
    results = pipeline.search(list(several.queries["image"]), k=K)
    assert [[hit.product_id for hit in result.hits] for result in results] == [order[:K] for order in ranked]
    np.testing.assert_allclose([[hit.score for hit in r.hits] for r in results], scores[:, :K], atol=1e-5)
    # the first image is the product's photo
    first = several.catalog.drop_duplicates("product_id").iloc[0]
    assert pipeline.product_image_path(first["product_id"]) == Path(first["image"]).resolve()

    # one more image of an existing product: only with more_images=True
    query_photo = several.queries["image"].iloc[0]
    target = ranked[0][-1]  # the product the first query likes least
    with pytest.raises(ValueError, match="more_images=True"):
        pipeline.add([target], [query_photo])
    pipeline.add([target], [query_photo], more_images=True)
    assert pipeline.search(query_photo, k=1)[0].hits[0].product_id == target
    assert pipeline.search(query_photo, k=1)[0].hits[0].score == pytest.approx(1.0, abs=1e-5)
    pipeline.save()
    again = Pipeline.load(tmp_path / "shop", device="cpu")
    assert (again.ntotal, again.n_products) == (25, 12)
    assert again.search(query_photo, k=1)[0].hits[0].product_id == target
    # removing a product removes all its images
    n_images = len(again.images.images_of(target))
    again.remove([target])
    assert (again.ntotal, again.n_products) == (25 - n_images, 11)
    assert target not in [hit.product_id for hit in again.search(query_photo, k=11)[0].hits]
    with pytest.raises(KeyError, match="not in the index"):
        again.remove([target])


def test_one_image_per_product_writes_the_catalog_as_before(several, tmp_path):
    one = several.catalog.drop_duplicates("product_id")
    build_index(one, create_descriptor("colorhist"), tmp_path / "one", progress=False)
    table = pd.read_csv(tmp_path / "one" / "catalog.csv")
    assert list(table.columns) == ["product_id", "image"]
    assert "images" not in Pipeline.load(tmp_path / "one", device="cpu").describe()
