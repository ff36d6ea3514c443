"""Spatial verification: matching, both RANSAC back-ends, the feature store and re-ranking."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from retrieval.descriptors import create_descriptor
from retrieval.rerank import (
    LocalFeatureStore,
    SpatialVerifier,
    mutual_nearest_neighbours,
    ransac,
    ransac_opencv,
    solve_small_systems,
)

HEIGHT, WIDTH = 256, 192


def textured_image(seed: int) -> np.ndarray:
    """A seeded (H, W, 3) uint8 image of filled ellipses, polygons and lines: plenty of SIFT corners."""
    rng = np.random.default_rng(seed)
    image = np.full((HEIGHT, WIDTH, 3), rng.integers(40, 215, 3), np.uint8)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    def point():
        return int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))

    for _ in range(14):
        axes = (int(rng.integers(6, 40)), int(rng.integers(6, 40)))
        cv2.ellipse(image, point(), axes, float(rng.uniform(0, 180)), 0, 360, colour(), -1)
    for _ in range(8):
        cv2.fillPoly(image, [np.array([point() for _ in range(4)], np.int32)], colour())
    for _ in range(10):
        cv2.line(image, point(), point(), colour(), int(rng.integers(1, 4)))
    return image


def affine_point_set(seed: int, n_inliers: int = 40, n_outliers: int = 30):
    """Points under a known affine map (rotation, anisotropic scale, shear, shift) plus gross outliers."""
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, size=(n_inliers + n_outliers, 2))
    angle = math.radians(15)
    linear = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ np.array(
        [[1.2, 0.15], [0.0, 0.9]]
    )
    dst = src @ linear.T + np.array([12.0, -7.0])
    dst[n_inliers:] = rng.uniform(0, 200, size=(n_outliers, 2))  # outliers: anywhere
    # keep only outliers that are really off the model by more than the threshold
    off = np.linalg.norm(dst[n_inliers:] - (src[n_inliers:] @ linear.T + [12.0, -7.0]), axis=1) > 10
    src = np.concatenate([src[:n_inliers], src[n_inliers:][off]])
    dst = np.concatenate([dst[:n_inliers], dst[n_inliers:][off]])
    return torch.tensor(src, dtype=torch.float32), torch.tensor(dst, dtype=torch.float32), linear


def test_solve_small_systems_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    x, ok = solve_small_systems(a, b)
    assert ok.all() and np.allclose(x.numpy(), np.linalg.solve(a.numpy(), b.numpy()[..., None])[..., 0], atol=1e-8)
    _, ok = solve_small_systems(torch.ones(1, 2, 2), torch.ones(1, 2))  # singular
    assert not ok.item()


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_ransac_recovers_known_affine_and_its_inliers(backend):
    src, dst, linear = affine_point_set(seed=0)
    valid = torch.ones(1, len(src), dtype=torch.bool)
    valid[0, 5] = False  # a padding entry is never an inlier
    if backend == "torch":
        matrices, inliers = ransac(
            src[None],
            dst[None],
            valid,
            model="affine",
            threshold=2.0,
            iterations=512,
            generator=torch.Generator().manual_seed(0),
        )
    else:
        cv2.setRNGSeed(0)
        matrices, inliers = ransac_opencv(src[None], dst[None], valid, model="affine", threshold=2.0)
    expected = torch.zeros(len(src), dtype=torch.bool)
    expected[:40] = True
    expected[5] = False
    assert torch.equal(inliers[0], expected)
    assert np.allclose(matrices[0, :2, :2].numpy(), linear, atol=1e-3)
    assert np.allclose(matrices[0, :2, 2].numpy(), [12.0, -7.0], atol=1e-2)
    # a similarity cannot explain the shear and anisotropic scale: far fewer inliers at the same threshold
    _, similarity_inliers = ransac(
        src[None], dst[None], valid, model="similarity", threshold=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert similarity_inliers.sum() < 20


def test_ransac_batches_independent_sets_and_handles_too_few_matches():
    src, dst, _ = affine_point_set(seed=1)
    few = torch.zeros(len(src), dtype=torch.bool)
    few[:2] = True  # fewer than the 3 an affine needs
    valid = torch.stack([torch.ones(len(src), dtype=torch.bool), few])
    _, inliers = ransac(
        torch.stack([src, src]),
        torch.stack([dst, dst]),
        valid,
        model="affine",
        threshold=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert inliers[0].sum() == 40 and inliers[1].sum() == 0
    _, homography_inliers = ransac(
        src[None],
        dst[None],
        valid[:1],
        model="homography",
        threshold=2.0,
        iterations=1024,
        generator=torch.Generator().manual_seed(0),
    )
    assert homography_inliers.sum() == 40  # an affine map is a homography


def test_mutual_nearest_neighbours_golden():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    gallery = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])  # third row is padding
    mask = torch.tensor([[True, True, False]])
    match, valid = mutual_nearest_neighbours(query, torch.ones(3, dtype=torch.bool), gallery, mask)
    assert match[0, :2].tolist() == [1, 0] and valid.tolist() == [[True, True, False]]  # 3rd: not mutual


def test_store_pads_batches_and_round_trips_bytes():
    sift = create_descriptor("sift", max_keypoints=50)
    images = torch.stack([torch.from_numpy(textured_image(s)).permute(2, 0, 1).float() / 255 for s in range(3)])
    store = LocalFeatureStore.from_features([sift.extract(images[:1]), sift.extract(images[1:])])
    assert len(store) == 3 and store.desc.dtype == torch.float16 and store.mask.sum(dim=1).max() <= 50
    back = LocalFeatureStore.from_bytes(store.to_bytes())
    assert torch.equal(back.desc, store.desc) and torch.equal(back.mask, store.mask)
    assert torch.equal(back.keypoints, store.keypoints)


def street_copy(image: np.ndarray) -> np.ndarray:
    """Rotate 10 degrees, zoom 1.15 and crop about the centre: the same object seen differently."""
    matrix = cv2.getRotationMatrix2D((WIDTH / 2 + 8, HEIGHT / 2 - 5), 10.0, 1.15)
    return cv2.warpAffine(image, matrix, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_verification_moves_the_true_product_from_rank_5_to_1(backend):
    to_tensor = lambda arrays: torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])  # noqa: E731
    gallery_images = [textured_image(100 + i) for i in range(8)]
    queries = to_tensor([street_copy(gallery_images[3]), textured_image(999)])  # a copy of item 3, an unrelated one
    sift = create_descriptor("sift", max_keypoints=300)
    gallery = LocalFeatureStore.from_features([sift.extract(to_tensor(gallery_images))])
    query_store = LocalFeatureStore.from_features([sift.extract(queries)])
    # a fake first stage: item 3 at rank 5 for the copy, some arbitrary order for the unrelated query
    positions = torch.tensor([[0, 1, 2, 4, 3, 5, 6, 7], [6, 2, 0, 7, 1, 3, 5, 4]])
    global_scores = torch.linspace(0.9, 0.5, 8).expand(2, -1)
    # SIFT localises to a pixel or two: a tight threshold keeps chance inliers of unrelated images out;
    # classic verification (the most inliers win): log(1 + 15) * 1.0 outweighs the 0.23 of global score
    verifier = SpatialVerifier(threshold=4.0, min_inliers=8, inlier_weight=1.0, backend=backend)
    scores, reranked, inliers = verifier.rerank(query_store, positions, global_scores, gallery)
    assert reranked[0, 0].item() == 3 and inliers[0, 0] >= 15
    assert torch.equal(reranked[0, 1:], torch.tensor([0, 1, 2, 4, 5, 6, 7]))  # the others keep their order
    assert torch.equal(reranked[1], positions[1]) and inliers[1].sum() == 0
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown options"):
        SpatialVerifier(nope=1)
    with pytest.raises(ValueError, match="geometric model"):
        SpatialVerifier(model="projective")


def _small_synthetic(synthetic_root, n_products: int = 8):
    from retrieval.datasets import RetrievalSet, load_dataset

    data = load_dataset(f"viton:{synthetic_root}", split="all")
    catalog = data.catalog.head(n_products).reset_index(drop=True)
    queries = data.queries[data.queries["product_id"].isin(catalog["product_id"])].reset_index(drop=True)
    return RetrievalSet("synthetic-small", catalog, queries, None)


def test_bench_rows_with_spatial_reranking(synthetic_root):
    from benchmarks.runner import run_grid

    data = _small_synthetic(synthetic_root)
    results = run_grid(data, ["sift"], rerank=5, rerank_conf={"threshold": 6.0}, ks=(1, 5), progress=False)
    assert list(results["descriptor"]) == ["sift", "sift+sv"]
    assert results["rerank_s"].notna().iloc[1] and ((results["mAP@5"] >= 0) & (results["mAP@5"] <= 1)).all()
    # recall@5 cannot change: re-ranking only re-orders the top 5
    assert results["recall@5"].iloc[0] == results["recall@5"].iloc[1]


def test_a_repeated_rerank_bench_reads_fit_and_local_features_from_the_cache(synthetic_root, tmp_path, monkeypatch):
    from benchmarks.runner import run_grid
    from retrieval.descriptors.sift import SIFT

    data = _small_synthetic(synthetic_root)
    options = dict(
        rerank=5,
        rerank_conf={"threshold": 6.0},
        ks=(1, 5),
        progress=False,
        cache_dir=tmp_path / "cache",
        proxy_output_dir=tmp_path / "proxy",
    )
    first = run_grid(data, ["sift"], **options)
    assert len(list((tmp_path / "cache").rglob("local-*.npz"))) == 2  # the gallery's and the queries'
    monkeypatch.setattr(SIFT, "fit", lambda *a, **k: pytest.fail("fitted again"))
    monkeypatch.setattr(SIFT, "extract", lambda *a, **k: pytest.fail("extracted again"))
    again = run_grid(data, ["sift"], **options)
    assert again["descriptor"].tolist() == ["sift", "sift+sv"]
    assert again["mAP@5"].tolist() == first["mAP@5"].tolist()


def test_searcher_reranks_with_the_catalog_local_features(synthetic_root, tmp_path):
    from retrieval.descriptors import create_descriptor
    from street2shop.engine import Searcher, build_index

    data = _small_synthetic(synthetic_root)
    sift = create_descriptor("sift", n_clusters=4, pca_dim=None, max_keypoints=200).eval()
    paths = list(data.catalog["image"])
    build_index(data.catalog, sift, tmp_path / "plain", fit_paths=paths, progress=False, faiss_device="cpu")
    build_index(
        data.catalog, sift, tmp_path / "local", fit_paths=paths, progress=False, faiss_device="cpu", local_features=True
    )
    with pytest.raises(FileNotFoundError, match="--local-features"):
        Searcher(tmp_path / "plain", device="cpu", rerank=5)
    searcher = Searcher(
        tmp_path / "local", device="cpu", rerank=5, rerank_conf={"threshold": 4.0, "inlier_weight": 1.0}
    )
    results = searcher.search(paths[:2], k=3)
    assert len(results) == 6 and set(results["product_id"]) <= set(data.catalog["product_id"].astype(str))
    # a catalog photo used as the query verifies against itself: first, every keypoint an inlier
    # (the first synthetic product is plain and has only 7 SIFT keypoints, the second 53), so its
    # score is its cosine similarity 1 plus log(1 + 7) at least
    firsts = results[results["rank"] == 1]
    assert list(firsts["product_id"]) == list(data.catalog["product_id"].astype(str)[:2])
    assert (firsts["score"] >= 1.0 + np.log1p(7) - 1e-4).all()


def test_a_damaged_local_feature_cache_is_extracted_again(synthetic_root, tmp_path, caplog):
    """The bench's re-ranking cache is sealed: a flipped byte is noticed and the features extracted again."""
    import logging

    import torch

    from benchmarks.runner import _local_features
    from retrieval.datasets import load_dataset
    from retrieval.descriptors.sift import SIFT

    sift = SIFT(n_clusters=4, pca_dim=None, image_size=(96, 64), max_keypoints=50)
    paths = list(load_dataset(f"viton:{synthetic_root}", split="val").catalog["image"][:3])
    first = _local_features(sift, paths, tmp_path, "sift", 4, torch.device("cpu"), None)
    (stored,) = list((tmp_path / "sift").glob("local-*.npz"))
    payload = bytearray(stored.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    stored.write_bytes(bytes(payload))
    with caplog.at_level(logging.WARNING):
        again = _local_features(sift, paths, tmp_path, "sift", 4, torch.device("cpu"), None)
    assert "unreadable" in caplog.text
    assert torch.equal(again.desc, first.desc) and torch.equal(again.mask, first.mask)
