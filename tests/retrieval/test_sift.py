"""VLAD aggregation and the SIFT descriptor, on tiny hand-made and seeded synthetic images."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from retrieval.aggregation import fit_codebook, vlad
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.base import NotFittedError
from retrieval.descriptors.sift import SIFT
from retrieval.whitening import apply_pca_whitening, fit_pca_whitening

HEIGHT, WIDTH = 256, 192
# Small codebook and no PCA keep the fits in these tests to a fraction of a second.
SMALL_CONF = dict(n_clusters=16, pca_dim=None, max_keypoints=300)


# ---- synthetic images ---------------------------------------------------------------------------
def textured_image(seed: int) -> np.ndarray:
    """A seeded (H, W, 3) uint8 RGB image of random filled shapes, lines and a checker patch."""
    rng = np.random.default_rng(seed)
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = rng.integers(40, 215, 3)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    def point():
        return int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))

    for _ in range(12):
        centre, axes = point(), (int(rng.integers(6, 40)), int(rng.integers(6, 40)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour(), -1)
    for _ in range(8):
        corners = np.array([point() for _ in range(int(rng.integers(3, 6)))], np.int32)
        cv2.fillPoly(image, [corners], colour())
    for _ in range(10):
        cv2.line(image, point(), point(), colour(), int(rng.integers(1, 4)))
    cell = int(rng.integers(5, 12))
    y0, x0 = int(rng.integers(0, HEIGHT - 6 * cell)), int(rng.integers(0, WIDTH - 6 * cell))
    for i in range(6):
        for j in range(6):
            if (i + j) % 2:
                image[y0 + i * cell : y0 + (i + 1) * cell, x0 + j * cell : x0 + (j + 1) * cell] = colour()
    return image


def distorted(image: np.ndarray, angle: float = 12.0, scale: float = 0.9, gain: float = 1.15) -> np.ndarray:
    """Rotate and scale about the centre, then brighten: a street-photo-like nuisance."""
    matrix = cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 2), angle, scale)
    warped = cv2.warpAffine(image, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.clip(warped.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def to_batch(images) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def flat_grey() -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), 128, np.uint8)


@pytest.fixture(scope="module")
def training_batches():
    """Two batches of training images, disjoint from any gallery below (seeds 100+)."""
    images = [textured_image(100 + i) for i in range(8)]
    return [to_batch(images[:4]), to_batch(images[4:])]


@pytest.fixture(scope="module")
def fitted_sift(training_batches):
    return SIFT(**SMALL_CONF).fit(training_batches)


# ---- VLAD ---------------------------------------------------------------------------------------
def vlad_reference(desc: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Plain-loop VLAD of one image's real descriptors: the definition, line by line."""
    n_clusters, dim = centroids.shape
    sums = np.zeros((n_clusters, dim))
    for x in desc:
        distances = [np.sum((x - c) ** 2) for c in centroids]
        k = int(np.argmin(distances))
        sums[k] += x - centroids[k]
    for k in range(n_clusters):
        norm = np.linalg.norm(sums[k])
        if norm > 0:
            sums[k] /= norm
    flat = np.sign(sums.ravel()) * np.sqrt(np.abs(sums.ravel()))
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 0 else flat


def test_vlad_hand_computed_golden_value():
    # Centroids e0=(1,0), e1=(0,1). (2,0) and (0.5,-0.5) go to e0, residuals (1,0) + (-0.5,-0.5)
    # = (0.5,-0.5) -> intra-normalised (1,-1)/sqrt2. (0,3) goes to e1, residual (0,2) -> (0,1).
    # Signed sqrt: (a, -a, 0, 1) with a = 2^-1/4; L2 norm sqrt(2 a^2 + 1) = sqrt(sqrt2 + 1).
    desc = torch.tensor([[[2.0, 0.0], [0.5, -0.5], [0.0, 3.0]]])
    out = vlad(desc, torch.ones(1, 3, dtype=torch.bool), torch.eye(2))
    a, norm = 2**-0.25, math.sqrt(math.sqrt(2) + 1)
    expected = torch.tensor([[a / norm, -a / norm, 0.0, 1.0 / norm]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([[0.541196, -0.541196, 0.0, 0.643594]]), atol=1e-6, rtol=0)


def test_vlad_matches_plain_loop_reference_on_a_padded_batch():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(5, 6)).astype(np.float32)
    counts = [7, 0, 3, 12]
    desc = rng.normal(size=(4, 12, 6)).astype(np.float32)
    mask = np.arange(12)[None, :] < np.array(counts)[:, None]
    out = vlad(torch.from_numpy(desc), torch.from_numpy(mask), torch.from_numpy(centroids)).numpy()
    assert out.shape == (4, 30)
    for b, count in enumerate(counts):
        np.testing.assert_allclose(out[b], vlad_reference(desc[b, :count], centroids), atol=1e-5)


def test_soft_vlad_golden_and_its_hard_limit():
    """Hand computed: x1=(2,0), x2=(.5,-.5) -> c1, x3=(0,3) -> c2; residual sums (.5,-.5), (0,2)."""
    from retrieval.aggregation import signed_sqrt, soft_vlad

    desc = torch.tensor([[[2.0, 0.0], [0.5, -0.5], [0.0, 3.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = soft_vlad(desc, mask, torch.eye(2), alpha=1e3)
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.5, 0.0, 0.5**0.5]]))
    # with a soft assignment every descriptor reaches both centroids, and gradients flow to all inputs
    desc.requires_grad_(True)
    centroids = torch.eye(2).requires_grad_(True)
    soft = soft_vlad(desc, mask, centroids, alpha=0.5)
    assert not torch.allclose(soft, out)
    soft[0, 3].backward()
    assert desc.grad.abs().sum() > 0 and centroids.grad.abs().sum() > 0
    # sharp: the hard `vlad` is its signed square root (re-normalised), on a random padded batch
    generator = torch.Generator().manual_seed(3)
    desc, centroids = torch.randn(2, 7, 5, generator=generator), torch.randn(4, 5, generator=generator)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    expected = vlad(desc, mask, centroids)
    torch.testing.assert_close(
        torch.nn.functional.normalize(signed_sqrt(soft_vlad(desc, mask, centroids, 1e4)), dim=-1), expected
    )


def test_vlad_without_keypoints_is_finite_zero():
    out = vlad(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), torch.randn(3, 4))
    assert out.shape == (2, 12) and torch.isfinite(out).all() and (out == 0).all()
    garbage = torch.full((1, 5, 4), float("nan"))
    out = vlad(garbage, torch.zeros(1, 5, dtype=torch.bool), torch.randn(3, 4))
    assert torch.isfinite(out).all() and (out == 0).all()


def test_vlad_ignores_masked_padding_even_if_garbage():
    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(4, 8, generator=generator)
    real = torch.randn(1, 6, 8, generator=generator)
    garbage = torch.tensor([float("nan"), float("inf"), -1e30, 1e30]).repeat(2).expand(1, 3, 8)
    padded = torch.cat([real, garbage], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    expected = vlad(real, torch.ones(1, 6, dtype=torch.bool), centroids)
    torch.testing.assert_close(vlad(padded, mask, centroids), expected)


def test_fit_codebook_shapes_and_too_few_descriptors():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(loc=c, scale=0.05, size=(50, 2)) for c in ((0, 0), (5, 5), (0, 5))])
    centroids = fit_codebook(blobs.astype(np.float32), n_clusters=3, seed=0, max_points=120)
    assert centroids.shape == (3, 2) and centroids.dtype == np.float32
    # Each true centre is recovered even from a 120-point subsample.
    for centre in ((0, 0), (5, 5), (0, 5)):
        assert np.min(np.linalg.norm(centroids - np.array(centre), axis=1)) < 0.1
    with pytest.raises(ValueError, match="only 3 descriptors"):
        fit_codebook(np.zeros((3, 2), np.float32), n_clusters=4)


def test_pca_whitening_decorrelates_and_keeps_zero_rows_zero():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10))
    mean, projection = fit_pca_whitening(data, out_dim=6, shrinkage=0.0)
    whitened = (data - mean) @ projection
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(6), atol=1e-3)
    out = apply_pca_whitening(
        torch.cat([torch.zeros(1, 10), torch.from_numpy(data[:2]).float()]),
        torch.from_numpy(mean),
        torch.from_numpy(projection),
    )
    assert out.shape == (3, 6) and (out[0] == 0).all()
    torch.testing.assert_close(out[1:].norm(dim=1), torch.ones(2))


# ---- SIFT ---------------------------------------------------------------------------------------
def test_sift_is_registered():
    assert isinstance(create_descriptor("sift", **SMALL_CONF), SIFT)


def test_extract_shapes_mask_and_root_sift_rows():
    images = to_batch([textured_image(0), flat_grey(), textured_image(1)])
    features = SIFT(max_keypoints=50).extract(images)
    b, n = features.mask.shape
    assert b == 3 and 0 < n <= 50
    assert features.desc.shape == (3, n, 128) and features.keypoints.shape == (3, n, 2)
    assert features.scales.shape == features.orientations.shape == features.scores.shape == (3, n)
    assert not features.mask[1].any(), "a flat grey image has no keypoints"
    assert features.mask[0].sum() > 0 and features.mask[2].sum() > 0
    real = features.desc[features.mask]
    assert (real >= 0).all()
    torch.testing.assert_close(real.norm(dim=1), torch.ones(len(real)))
    # Padding is zero, keypoints lie inside the image, the strongest come first.
    assert (features.desc[~features.mask] == 0).all()
    xy = features.keypoints[features.mask]
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < WIDTH).all() and (xy[:, 1] < HEIGHT).all()
    scores = features.scores[0][features.mask[0]]
    assert (scores[:-1] >= scores[1:]).all()


def test_embed_before_fit_raises():
    with pytest.raises(NotFittedError):
        SIFT(**SMALL_CONF).embed(to_batch([textured_image(0)]))


def test_fit_then_embed_unit_rows_and_flat_image_is_finite(fitted_sift):
    out = fitted_sift.embed(to_batch([textured_image(0), flat_grey(), textured_image(1)]))
    assert out.shape == (3, fitted_sift.dim) == (3, 16 * 128)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 2]].norm(dim=1), torch.ones(2))
    assert (out[1] == 0).all(), "no keypoints -> the zero vector, which matches nothing"


def test_fit_with_pca_whitening(training_batches):
    sift = SIFT(n_clusters=4, pca_dim=6, max_keypoints=200).fit(training_batches)
    out = sift.embed(to_batch([textured_image(0), flat_grey()]))
    assert out.shape == (2, 6) and torch.isfinite(out).all()
    torch.testing.assert_close(out[0].norm(), torch.tensor(1.0))


def test_fit_on_flat_images_only_says_why():
    with pytest.raises(ValueError, match="codebook"):
        SIFT(**SMALL_CONF).fit([to_batch([flat_grey(), flat_grey()])])


def test_distorted_copy_is_nearest_neighbour(fitted_sift):
    gallery = [textured_image(i) for i in range(8)]
    queries = [distorted(image) for image in gallery]
    gallery_vectors = fitted_sift.embed(to_batch(gallery))
    query_vectors = fitted_sift.embed(to_batch(queries))
    similarity = query_vectors @ gallery_vectors.T
    assert similarity.argmax(dim=1).tolist() == list(range(8)), similarity


def test_state_dict_round_trip(training_batches):
    conf = dict(n_clusters=4, pca_dim=6, max_keypoints=200)
    fitted = SIFT(**conf).fit(training_batches)
    fresh = SIFT(**fitted.config())
    assert not fresh.fitted and fresh.fingerprint() != fitted.fingerprint()
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.fitted and fresh.fingerprint() == fitted.fingerprint()
    images = to_batch([textured_image(3), textured_image(4)])
    torch.testing.assert_close(fresh.embed(images), fitted.embed(images), rtol=0, atol=0)
