"""L2-Net descriptor and the homography patch-pair training data (`retrieval.patches`), on tiny seeded images."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kornia.geometry.linalg import transform_points

from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.l2net import L2Net, keypoints_to_lafs
from retrieval.patches import (
    hardest_in_batch_triplet_loss,
    hardnet_loss,
    homography_patch_pairs,
    patch_matching_metrics,
    photometric_jitter,
    random_homographies,
    same_place_mask,
    warp_images,
)
from retrieval.training.patch import L2NetTrainConfig, step_generator
from retrieval.training.patch_losses import (
    choose_random_subset,
    initial_vlad_head,
    l2net_homography_loss,
    vlad_anchor_images,
    vlad_loss,
)

TINY = dict(image_size=(96, 64), n_clusters=4, pca_dim=None, max_keypoints=48)


def textured_grey(n: int, seed: int, size=(96, 64)) -> torch.Tensor:
    """Seeded grey images with blocks, oblique stripes and noise: DoG keypoints everywhere."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    blocks = torch.nn.functional.interpolate(
        torch.rand(n, 1, h // 8, w // 8, generator=generator), size=size, mode="nearest"
    )
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin(0.45 * (xx + 0.6 * yy)).expand(n, 1, h, w)
    return (0.6 * blocks + 0.3 * stripes + 0.1 * torch.rand(n, 1, h, w, generator=generator)).clamp(0, 1)


def translation(tx: float, ty: float) -> torch.Tensor:
    return torch.tensor([[[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]]])


def square_lafs(centres, radius: float) -> torch.Tensor:
    xy = torch.tensor([centres], dtype=torch.float32)
    return keypoints_to_lafs(
        torch.cat([xy, torch.full((1, len(centres), 1), radius / 3.0), torch.zeros(1, len(centres), 2)], -1),
        patch_scale=3.0,
        min_radius=1.0,
        max_radius=100.0,
        upright=True,
    )


# ---- the network ------------------------------------------------------------------------------
def test_patch_network_is_l2net_shaped_and_unit_norm():
    net = L2Net(**TINY).net.eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 128]
    assert convs[-1].kernel_size == (8, 8) and [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 1]
    desc = net(torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert desc.shape == (5, 128)
    assert torch.allclose(desc.norm(dim=1), torch.ones(5), atol=1e-5)


def test_untrained_network_is_seeded():
    a, b, c = L2Net(**TINY), L2Net(**TINY), L2Net(**TINY, seed=1)
    assert torch.equal(a.net.features[0].weight, b.net.features[0].weight)
    assert not torch.equal(a.net.features[0].weight, c.net.features[0].weight)


# ---- loss -------------------------------------------------------------------------------------
def test_hardest_in_batch_loss_golden():
    d = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.3, 1.4], [1.1, 0.6, 0.4]])
    # hardest negatives min(row, column) off the diagonal: 0.5, 0.6, 0.5 -> (0.7 + 0.7 + 0.9) / 3
    assert hardest_in_batch_triplet_loss(d, margin=1.0).item() == pytest.approx(2.3 / 3)
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 2] = True  # (anchor 0, positive 2) is the same place: negatives become 0.7, 0.6, 0.6
    assert hardest_in_batch_triplet_loss(d, 1.0, exclude).item() == pytest.approx((0.5 + 0.7 + 0.8) / 3)
    assert hardest_in_batch_triplet_loss(d, margin=0.1).item() == pytest.approx(0.0)


def test_hardnet_loss_on_descriptors():
    eye = torch.eye(4, 8)
    # matching rows identical, non-matching ones orthogonal (distance sqrt 2 > margin): no loss
    assert hardnet_loss(eye, eye).item() == pytest.approx(0.0, abs=1e-6)
    # swapped positives: every positive distance is sqrt 2 and a negative is 0 -> 1 + sqrt 2 each
    assert hardnet_loss(eye, eye[[1, 0, 3, 2]]).item() == pytest.approx(1 + math.sqrt(2), abs=2e-3)


def test_same_place_mask():
    centres = torch.tensor([[10.0, 10.0], [12.0, 10.0], [30.0, 10.0], [10.0, 11.0]])
    image = torch.tensor([0, 0, 0, 1])
    mask = same_place_mask(centres, image, radius=4.0)
    assert mask.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]


# ---- homographies and patch pairs -------------------------------------------------------------
def test_random_homographies_move_points_where_the_warp_moves_pixels():
    generator = torch.Generator().manual_seed(3)
    assert torch.allclose(
        random_homographies(2, 96, 64, generator, 0.0, (1.0, 1.0), 1.0, 0.0, 0.0, 0.0),
        torch.eye(3).expand(2, 3, 3),
        atol=1e-6,
    )
    homography = random_homographies(1, 96, 64, generator, max_translation=0.05)
    dot = torch.zeros(1, 1, 96, 64)
    dot[0, 0, 40, 30] = 1.0  # (x, y) = (30, 40)
    moved = warp_images(dot, homography)
    expected = transform_points(homography, torch.tensor([[[30.0, 40.0]]]))[0, 0]
    flat = moved.flatten().argmax()
    assert abs(flat % 64 - expected[0]) <= 1 and abs(flat // 64 - expected[1]) <= 1


def test_translation_patch_pairs_match():
    grey = textured_grey(1, seed=0)
    lafs = square_lafs([(30.0, 40.0), (20.0, 60.0), (52.0, 45.0)], radius=8.0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    shifted = translation(5.0, -3.0)  # integer: bilinear sampling is exact
    pairs = homography_patch_pairs(grey, warp_images(grey, shifted), lafs, mask, shifted)
    # the third frame's square reaches x = 57 + 8 = 65 in B, outside the 64 px wide image: dropped
    assert len(pairs.anchors) == 2 and pairs.image_index.tolist() == [0, 0]
    assert torch.allclose(pairs.anchors, pairs.positives, atol=1e-4)
    half = translation(2.5, 1.5)  # sub-pixel: two bilinear interpolations against one
    pairs = homography_patch_pairs(grey, warp_images(grey, half), lafs, mask, half)
    assert (pairs.anchors - pairs.positives).abs().mean() < 0.05
    other = homography_patch_pairs(grey, warp_images(textured_grey(1, seed=1), half), lafs, mask, half)
    assert (other.anchors - other.positives).abs().mean() > 0.1  # the check above can fail


def test_photometric_jitter_stays_in_range_and_changes_the_image():
    grey = textured_grey(2, seed=0)
    out = photometric_jitter(grey, torch.Generator().manual_seed(0))
    assert out.shape == grey.shape and out.min() >= 0 and out.max() <= 1
    assert (out - grey).abs().mean() > 0.01


def test_patch_matching_metrics_golden():
    a = torch.eye(3, 4)
    perfect = patch_matching_metrics(a, a)
    assert perfect["fpr95"] == 0.0 and perfect["matching_map"] == 1.0 and perfect["top1"] == 1.0
    swapped = patch_matching_metrics(a, a[[1, 0, 2]])  # anchors 0 and 1 find the other's positive first
    assert swapped["top1"] == pytest.approx(1 / 3) and swapped["matching_map"] == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_choose_random_subset():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    chosen = choose_random_subset(mask, 2, torch.Generator().manual_seed(0))
    assert chosen.sum(1).tolist() == [2, 1] and not (chosen & ~mask).any()


# ---- descriptor -------------------------------------------------------------------------------
def test_extract_shapes_and_flat_image():
    l2net = L2Net(**TINY)
    images = textured_grey(2, seed=4).expand(-1, 3, -1, -1)
    features = l2net.extract(images)
    n = features.desc.shape[1]
    assert 0 < n <= TINY["max_keypoints"] and features.desc.shape == (2, n, 128)
    real = features.desc[features.mask]
    assert torch.allclose(real.norm(dim=1), torch.ones(len(real)), atol=1e-4)
    assert (features.desc[~features.mask] == 0).all()
    l2net.fit(textured_grey(8, seed=s).expand(-1, 3, -1, -1) for s in range(2))
    flat = torch.full((1, 3, 96, 64), 0.5)
    assert l2net.extract(flat).mask.sum() == 0
    vector = l2net.embed(flat)
    assert vector.shape == (1, l2net.dim) and torch.isfinite(vector).all()


def test_one_training_step_lowers_the_loss():
    l2net = L2Net(**TINY)
    grey_a = textured_grey(4, seed=5)
    generator = step_generator(0, 0, 0)
    homographies = random_homographies(4, 96, 64, generator, max_rotation_deg=10.0, max_perspective=0.02)
    grey_b = photometric_jitter(warp_images(grey_a, homographies), generator)
    options = L2NetTrainConfig(pairs_per_image=24)
    l2net.net.train()
    optimizer = torch.optim.Adam(l2net.net.parameters(), lr=1e-3)

    def loss_now():
        torch.manual_seed(0)  # the same dropout mask before and after the step
        return l2net_homography_loss(l2net, grey_a, grey_b, homographies, step_generator(0, 0, 1), options)

    before, logs = loss_now()
    assert logs["pairs"] >= 16
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = loss_now()
    assert after.item() < before.item()


def test_train_on_round_trip(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    l2net = L2Net(**TINY)
    untrained = l2net.net.features[0].weight.clone()
    final = l2net.train_on(
        data, tmp_path / "run", epochs=1, batch_size=4, max_images=4, pairs_per_image=8, progress=False
    )
    assert final.exists() and (tmp_path / "run" / "losses.csv").exists()
    assert not torch.equal(l2net.net.features[0].weight, untrained) and not l2net.fitted and not l2net.training
    loaded = create_descriptor(f"l2net@{final}", **TINY)
    assert not loaded.fitted
    for descriptor in (l2net, loaded):
        descriptor.fit(textured_grey(6, seed=s).expand(-1, 3, -1, -1) for s in (7, 8))
    images = textured_grey(2, seed=9).expand(-1, 3, -1, -1)
    assert torch.allclose(l2net.embed(images), loaded.embed(images), atol=1e-5)
    assert loaded.fingerprint() == l2net.fingerprint()
    with pytest.raises(ValueError, match="trained for descriptor 'l2net'"):
        create_descriptor(f"lfnet@{final}", image_size=(96, 64), n_clusters=4, pca_dim=None)
    # a second call finds the finished run and resumes nothing: same weights
    again = L2Net(**TINY).train_on(
        data, tmp_path / "run", epochs=1, batch_size=4, max_images=4, pairs_per_image=8, progress=False
    )
    assert torch.equal(
        create_descriptor(f"l2net@{again}", **TINY).net.features[0].weight, loaded.net.features[0].weight
    )


def test_trained_weights_load_under_any_fit_config(tmp_path):
    """final.pt holds no fit state; an older one that does (another pca_dim's buffers) still loads."""
    older = L2Net(**{**TINY, "pca_dim": 32})
    with torch.no_grad():
        older.net.features[0].weight.add_(1.0)
    path = tmp_path / "older-final.pt"
    torch.save({"state_dict": older.state_dict(), "descriptor": "l2net"}, path)
    for pca_dim in (None, 16):
        loaded = create_descriptor(f"l2net@{path}", **{**TINY, "pca_dim": pca_dim})
        assert torch.equal(loaded.net.features[0].weight, older.net.features[0].weight) and not loaded.fitted
    broken = {k: v for k, v in older.state_dict().items() if k != "net.features.0.weight"}
    torch.save({"state_dict": broken, "descriptor": "l2net"}, path)
    with pytest.raises(ValueError, match="missing"):  # the network itself stays strict
        create_descriptor(f"l2net@{path}", **TINY)


def test_mask_boxes_golden():
    from retrieval.patches import mask_boxes

    masks = torch.zeros(2, 1, 8, 10, dtype=torch.bool)
    masks[0, 0, 2:5, 3:9] = True
    boxes = mask_boxes(masks)
    assert boxes[0].tolist() == [3.0, 2.0, 8.0, 4.0] and torch.isnan(boxes[1]).all()


def test_garment_patch_pairs_match_by_box_position():
    """A ramp laid over each mask's box: a product patch and its worn patch see the same ramp value."""
    from retrieval.patches import garment_patch_pairs

    def ramp_in_box(height, width, x0, y0, x1, y1):
        grey = torch.zeros(1, 1, height, width)
        mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
        mask[..., y0 : y1 + 1, x0 : x1 + 1] = True
        xs = (torch.arange(width, dtype=torch.float32) - x0) / (x1 - x0)
        grey[..., y0 : y1 + 1, x0 : x1 + 1] = 0.2 + 0.6 * xs[x0 : x1 + 1]
        return grey, mask

    product, product_mask = ramp_in_box(96, 80, 10, 10, 69, 85)
    person, garment_mask = ramp_in_box(120, 90, 30, 40, 69, 109)  # another place, size and aspect
    pairs = garment_patch_pairs(product, product_mask, person, garment_mask, 16, torch.Generator().manual_seed(0))
    assert 4 <= len(pairs.anchors) <= 16 and pairs.anchors.shape[1:] == (1, 32, 32)
    centre = (slice(None), 0, 15, 15)
    expected = 0.2 + 0.6 * pairs.centres[:, 0]  # the ramp at the pair's box position u
    assert torch.allclose(pairs.anchors[centre], expected, atol=0.03)
    assert torch.allclose(pairs.positives[centre], expected, atol=0.03)
    same_photo = pairs.image_index[:, None] == pairs.image_index[None, :]
    assert torch.equal(pairs.exclude, same_photo & ~torch.eye(len(same_photo), dtype=torch.bool))  # one photo here


@pytest.mark.parametrize("garment_loss", ["hardnet", "infonce", "image"])
def test_train_on_with_garment_pairs(garment_loss, synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    final = L2Net(**TINY).train_on(
        data,
        tmp_path / "run",
        epochs=1,
        batch_size=4,
        max_images=4,
        pairs_per_image=8,
        garment_pairs_weight=1.0,
        garment_pairs_per_image=8,
        garment_loss=garment_loss,
        progress=False,
    )
    with open(tmp_path / "run" / "losses.csv") as handle:
        header = handle.readline().strip().split(",")
    assert final.exists() and {"desc_loss", "garment_desc_loss", "garment_pairs"} <= set(header)
    with pytest.raises(ValueError, match="garment_loss"):
        L2Net(**TINY).train_on(
            data,
            tmp_path / "bad",
            epochs=1,
            batch_size=4,
            max_images=4,
            garment_pairs_weight=1.0,
            garment_loss="nope",
            progress=False,
        )


def test_vlad_objective_step_lowers_the_loss(synthetic_root):
    """Through the soft VLAD: one Adam step on a batch of pairs lowers that batch's InfoNCE."""
    from retrieval.patches import load_garment_pair_batch
    from retrieval.training.patch_losses import SoftVLADHead

    data = load_viton(synthetic_root, split="val")
    rows = list(data.train.itertuples(index=False))[:4]
    l2net = L2Net(**TINY)
    worn = load_garment_pair_batch(rows, TINY["image_size"])
    options = L2NetTrainConfig(vlad_keypoints=32, vlad_anchors="both")
    head = initial_vlad_head(l2net, rows, TINY["image_size"], dataclasses.replace(options, vlad_init_images=4), seed=0)
    assert isinstance(head, SoftVLADHead) and head.centroids.shape == (4, 128) and float(head.alpha) > 0
    l2net.net.train()
    optimizer = torch.optim.Adam([*l2net.net.parameters(), *head.parameters()], lr=1e-3)

    def loss_now():
        torch.manual_seed(0)  # the same dropout mask before and after the step
        return vlad_loss(l2net, worn, head, step_generator(0, 0, 0), options)

    before, logs = loss_now()
    assert logs["vlad_patches"] > 8 * 8 and 0.0 <= logs["vlad_top1"] <= 1.0
    optimizer.zero_grad()
    before.backward()
    assert head.centroids.grad.abs().sum() > 0
    optimizer.step()
    after, _ = loss_now()
    assert after.item() < before.item()


def test_vlad_anchors_cut_the_garment_out_on_white(synthetic_root):
    from retrieval.patches import load_garment_pair_batch

    data = load_viton(synthetic_root, split="val")
    worn = load_garment_pair_batch(list(data.train.itertuples(index=False))[:4], TINY["image_size"])
    assert torch.equal(vlad_anchor_images(worn, torch.Generator().manual_seed(0), "photo"), worn["person"])
    cutouts = vlad_anchor_images(worn, torch.Generator().manual_seed(0), "cutout")
    assert cutouts.shape == worn["person"].shape and float((cutouts == 1.0).float().mean()) > 0.2  # a white page
    both = vlad_anchor_images(worn, torch.Generator().manual_seed(0), "both")
    from_each = [bool(torch.equal(b, p)) or bool(torch.equal(b, c)) for b, p, c in zip(both, worn["person"], cutouts)]
    assert all(from_each)


def test_train_on_through_the_aggregation(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    settings = dict(
        epochs=1,
        batch_size=4,
        max_images=8,
        homography_weight=0.0,
        vlad_weight=1.0,
        vlad_keypoints=16,
        vlad_init_images=8,
        progress=False,
    )
    final = L2Net(**TINY).train_on(data, tmp_path / "run", **settings)
    with open(tmp_path / "run" / "losses.csv") as handle:
        header = handle.readline().strip().split(",")
    assert final.exists() and {"vlad_loss", "vlad_top1"} <= set(header) and "desc_loss" not in header
    weights = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    # the network only: neither the training-only head nor fit state (fitted after training)
    assert all(k.startswith("net.") for k in weights)
    with pytest.raises(ValueError, match="vlad_anchors"):
        L2Net(**TINY).train_on(data, tmp_path / "bad", **{**settings, "vlad_anchors": "street"})
    with pytest.raises(ValueError, match="nothing to train"):
        L2Net(**TINY).train_on(data, tmp_path / "bad", **{**settings, "vlad_weight": 0.0, "garment_pairs_weight": 0.0})


def test_bfloat16_training_runs_only_the_network_in_bfloat16_and_ends_with_train_on(synthetic_root, tmp_path):
    l2net = L2Net(**TINY).eval()  # no dropout: the two passes differ only by precision
    patches = (
        textured_grey(1, seed=3, size=(32, 32)).expand(16, -1, -1, -1)
        * torch.linspace(0.5, 1.0, 16)[:, None, None, None]
    )
    exact = l2net._net(patches)
    l2net._bfloat16_training = True
    fast = l2net._net(patches)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert torch.allclose(fast, exact, atol=0.05)  # bfloat16 keeps about 3 significant digits
    data = load_viton(synthetic_root, split="val")
    l2net = L2Net(**TINY)
    l2net.train_on(data, tmp_path / "run", epochs=1, batch_size=4, max_images=4, pairs_per_image=8, progress=False)
    assert l2net._bfloat16_training is False


def test_info_nce_loss_golden():
    import math

    from retrieval.patches import info_nce_loss

    desc = torch.eye(4)  # orthonormal rows: partner similarity 1, every other 0
    expected = -math.log(math.exp(10.0) / (math.exp(10.0) + 3))
    assert abs(float(info_nce_loss(desc, desc, temperature=0.1)) - expected) < 1e-5
    everything_else = ~torch.eye(4, dtype=torch.bool)
    assert float(info_nce_loss(desc, desc, 0.1, exclude=everything_else)) == 0.0  # nothing left to confuse
    swapped = desc[[1, 0, 2, 3]]
    assert float(info_nce_loss(desc, swapped, 0.1)) > expected  # wrong partners cost more


def test_garment_pair_batch_without_a_product_mask_uses_non_white_pixels(synthetic_root):
    from retrieval.patches import load_garment_pair_batch

    row = next(load_viton(synthetic_root, split="val").train.itertuples(index=False))
    with_mask = load_garment_pair_batch([row], (64, 48))
    without = load_garment_pair_batch([row._replace(mask=float("nan"))], (64, 48))  # a CSV's empty cell
    assert without["product_mask"].shape == (1, 1, 64, 48) and without["product_mask"].any()
    assert torch.equal(without["product"], with_mask["product"]) and torch.equal(
        without["garment_mask"], with_mask["garment_mask"]
    )
