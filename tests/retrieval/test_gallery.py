"""ProductImages: image ids of a catalog with several images per product, and the collapse to products."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.gallery import MAX_SEARCH_DEPTH, ProductImages, max_per_group, products_and_images


def test_image_ids_keep_the_product_id_for_the_first_image_and_never_collide():
    images = ProductImages.of_catalog(["a", "b", "a", "a#1", "a"])
    # "a#1" is a real product: the second image of "a" must not take its id
    assert images.image_ids == ["a", "b", "a#1", "a#1#1", "a#2"]
    assert [images.product_of(i) for i in images.image_ids] == ["a", "b", "a", "a#1", "a"]
    assert images.images_of("a") == ["a", "a#1", "a#2"] and images.images_of("a#1") == ["a#1#1"]
    assert (images.n_products, images.n_images, images.max_images) == (3, 5, 3)
    assert images.sizes() == "3 products (5 images)" and products_and_images(2, 2) == "2 products"
    assert images.product_of("never-seen") == "never-seen"  # an older index's id is its own product


def test_one_image_per_product_is_the_identity():
    images = ProductImages.of_catalog(["x", "y", "z"])
    assert images.image_ids == ["x", "y", "z"] and images.one_per_product and images.search_depth(5) == 5
    scores = np.array([[0.9, 0.5, 0.1]], dtype=np.float32)
    ids = np.array([["z", "x", "y"]], dtype=object)
    out_scores, out_ids = images.collapse(scores, ids, k=2)
    np.testing.assert_array_equal(out_scores, scores[:, :2])
    assert out_ids.tolist() == [["z", "x"]]


def test_add_remove_discard_and_pairs_round_trip():
    images = ProductImages.of_catalog(["a", "b"])
    assert images.add(["a", "c", "c"]) == ["a#1", "c", "c#1"]
    again = ProductImages.from_pairs(images.image_ids, images.product_ids)
    assert again.image_ids == images.image_ids and again.product_ids == images.product_ids
    assert sorted(images.remove(["c", "a"])) == ["a", "a#1", "c", "c#1"] and images.image_ids == ["b"]
    with pytest.raises(KeyError, match="'zz'"):
        images.remove(["zz"])
    added = images.add(["b", "d"])
    images.discard(added)
    assert images.image_ids == ["b"] and "d" not in images
    with pytest.raises(ValueError, match="twice"):
        ProductImages.from_pairs(["i", "i"], ["p", "q"])


def test_collapse_keeps_each_products_best_image_pads_and_caps_depth():
    images = ProductImages.of_catalog(["a", "a", "b", "c", "c", "c"])
    assert images.search_depth(2) == 6 and images.search_depth(10_000) == 10_000
    assert images.search_depth(1000) == MAX_SEARCH_DEPTH
    ids = np.array([["c#1", "a", "c", "a#1", "b", "c#2"], ["b", None, None, None, None, None]], dtype=object)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.3] + [-np.inf] * 5], dtype=np.float32)
    out_scores, out_ids = images.collapse(scores, ids, k=3)
    assert out_ids.tolist() == [["c", "a", "b"], ["b", None, None]]
    np.testing.assert_allclose(out_scores, [[0.9, 0.8, 0.5], [0.3, -np.inf, -np.inf]])


def test_max_per_group_is_the_plain_loop():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 7))
    groups = np.array([2, 0, 1, 2, 0, 2, 1])
    expected = np.array([[max(scores[q, i] for i in range(7) if groups[i] == g) for g in range(3)] for q in range(4)])
    np.testing.assert_array_equal(max_per_group(scores, groups, 3), expected)
    with pytest.raises(ValueError, match="at least one image"):
        max_per_group(scores, groups, 4)
