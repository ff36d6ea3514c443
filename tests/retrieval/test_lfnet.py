"""LF-Net-style descriptor: KeyNet + HardNet trained jointly on homographies, on tiny seeded images."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.lfnet import LFNet, keynet_logits
from retrieval.patches import photometric_jitter, random_homographies, warp_images
from retrieval.training.patch import MODEL_TRAINING, LFNetTrainConfig, step_generator
from retrieval.training.patch_losses import (
    balanced_mse,
    lfnet_homography_loss,
    peak_target,
    soft_refine,
    top_peaks,
)
from tests.retrieval.test_l2net import textured_grey

TINY = dict(image_size=(96, 64), n_clusters=4, pca_dim=None, max_keypoints=48, s_mult=8.0)


def test_nothing_is_downloaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight download was attempted")

    import kornia.feature.hardnet as hardnet_module
    import kornia.feature.keynet as keynet_module
    import kornia.feature.orientation as orientation_module

    for module in (hardnet_module, keynet_module, orientation_module):
        monkeypatch.setattr(module, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    LFNet(**TINY)
    LFNet(**TINY, upright=True)


def test_keynet_logits_are_the_response_before_relu():
    lfnet = LFNet(**TINY)
    grey = textured_grey(2, seed=0)
    keynet = lfnet.keynet
    with torch.no_grad():
        assert torch.allclose(torch.relu(keynet_logits(keynet, grey)), keynet(grey), atol=1e-6)


def test_untrained_detector_finds_keypoints_but_not_on_flat_images():
    lfnet = LFNet(**TINY)
    features = lfnet.extract(textured_grey(2, seed=1).expand(-1, 3, -1, -1))
    assert (features.mask.sum(1) > 4).all()
    real = features.desc[features.mask]
    assert torch.allclose(real.norm(dim=1), torch.ones(len(real)), atol=1e-4)
    assert ((features.orientations >= 0) & (features.orientations < 360)).all()
    assert lfnet.extract(torch.full((1, 3, 96, 64), 0.5)).mask.sum() == 0


def test_peak_target_golden():
    scores = torch.zeros(1, 1, 20, 20)
    scores[0, 0, 5, 5], scores[0, 0, 5, 7], scores[0, 0, 14, 12] = 0.9, 0.5, 0.8
    valid = torch.ones_like(scores, dtype=torch.bool)
    target = peak_target(scores, valid, k=5, nms_size=5, sigma=1.0, generator=torch.Generator().manual_seed(0))
    # (5, 7) is within the 5x5 window of the stronger (5, 5): suppressed; two peaks of height 1
    assert target[0, 0, 5, 5] == pytest.approx(1.0) and target[0, 0, 14, 12] == pytest.approx(1.0)
    assert target[0, 0, 5, 6] == pytest.approx(math.exp(-0.5), abs=1e-4)  # one pixel off: exp(-1 / (2 sigma^2))
    assert target[0, 0, 5, 7] == pytest.approx(math.exp(-2.0), abs=1e-4)
    assert target[0, 0, 0, 19] == 0.0
    outside = valid.clone()
    outside[..., 10:, :] = False  # a peak outside the valid region is not a target
    assert peak_target(scores, outside, 5, 5, 1.0, torch.Generator().manual_seed(0))[0, 0, 14, 12] == 0.0


def test_top_peaks_respects_k():
    scores = torch.zeros(1, 1, 20, 20)
    scores[0, 0, 3, 3], scores[0, 0, 10, 10], scores[0, 0, 16, 4] = 0.3, 0.9, 0.6
    indices, found = top_peaks(
        scores, torch.ones_like(scores, dtype=torch.bool), 2, 3, torch.Generator().manual_seed(0)
    )
    assert indices.tolist() == [[10 * 20 + 10, 16 * 20 + 4]] and found.all()


def test_soft_refine_golden():
    logits = torch.full((1, 1, 12, 16), -30.0)
    logits[0, 0, 7, 10] = 5.0
    index = torch.tensor([[7 * 16 + 10]])
    assert torch.allclose(soft_refine(logits, index), torch.tensor([[[10.0, 7.0]]]), atol=1e-6)
    logits[0, 0, 7, 11] = 5.0  # two equal maxima side by side: the soft-argmax lies between them
    assert torch.allclose(soft_refine(logits, index), torch.tensor([[[10.5, 7.0]]]), atol=1e-6)
    logits.requires_grad_(True)
    soft_refine(logits, index)[0, 0, 0].backward()
    assert logits.grad[0, 0, 7, 11] > 0 > logits.grad[0, 0, 7, 10]


def test_balanced_mse_golden():
    prediction, target = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.5])
    # the invalid third pixel is ignored: peak mean (1 - 1)^2 = 0, background mean (2 - 0)^2 = 4
    assert balanced_mse(prediction, target, torch.tensor([True, True, False])).item() == pytest.approx(4.0)
    # peak: 0.5 * 0.25 / 0.5; background: (0.5 * 0.25 + 1 * 1 + 1 * 0) / 2.5
    prediction, target = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.5, 0.0, 0.0])
    assert balanced_mse(prediction, target, torch.ones(3, dtype=torch.bool)).item() == pytest.approx(0.25 + 0.45)
    # an all-zero prediction is no longer nearly free when peaks are rare
    sparse = torch.zeros(1000)
    sparse[0] = 1.0
    assert balanced_mse(torch.zeros(1000), sparse, torch.ones(1000, dtype=torch.bool)).item() == pytest.approx(1.0)


def _synthetic_batch(n=4, seed=5):
    grey_a = textured_grey(n, seed=seed)
    generator = step_generator(0, 0, 0)
    homographies = random_homographies(n, 96, 64, generator, max_rotation_deg=10.0, max_perspective=0.02)
    return grey_a, photometric_jitter(warp_images(grey_a, homographies), generator), homographies


def test_one_training_step_lowers_the_loss_and_the_descriptor_loss_reaches_the_detector():
    lfnet = LFNet(**TINY)
    grey_a, grey_b, homographies = _synthetic_batch()
    options = LFNetTrainConfig(pairs_per_image=16, peaks_per_image=16)
    modules = {name: getattr(lfnet, name) for name in MODEL_TRAINING["lfnet"][0]}
    for module in modules.values():
        module.train()
    optimizer = torch.optim.Adam([p for m in modules.values() for p in m.parameters()], lr=1e-3)

    def loss_now():
        torch.manual_seed(0)  # the same dropout mask before and after the step
        return lfnet_homography_loss(lfnet, grey_a, grey_b, homographies, step_generator(0, 0, 1), options)

    before, logs = loss_now()
    assert logs["pairs"] >= 8 and logs["image_loss"] > 0
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = loss_now()
    assert after.item() < before.item()

    # LF-Net's link: the descriptor loss alone moves the detector through the soft-argmax positions
    lfnet.zero_grad()
    options = dataclasses.replace(options, image_loss_weight=0.0)
    loss, _ = lfnet_homography_loss(lfnet, grey_a, grey_b, homographies, step_generator(0, 0, 1), options)
    loss.backward()
    detector_grad = sum(p.grad.abs().sum() for p in lfnet.keynet.parameters() if p.grad is not None)
    assert detector_grad > 0


def test_train_on_round_trip(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    lfnet = LFNet(**TINY)
    untrained = lfnet.keynet.last_conv[0].weight.clone()
    final = lfnet.train_on(
        data,
        tmp_path / "run",
        epochs=1,
        batch_size=4,
        max_images=8,
        pairs_per_image=16,
        peaks_per_image=16,
        progress=False,
    )
    assert final.exists() and "image_loss" in (tmp_path / "run" / "losses.csv").read_text().splitlines()[0]
    assert not torch.equal(lfnet.keynet.last_conv[0].weight, untrained)
    loaded = create_descriptor(f"lfnet@{final}", **TINY)
    for descriptor in (lfnet, loaded):
        descriptor.fit(textured_grey(6, seed=s).expand(-1, 3, -1, -1) for s in (7, 8))
    images = textured_grey(2, seed=9).expand(-1, 3, -1, -1)
    assert torch.allclose(lfnet.embed(images), loaded.embed(images), atol=1e-5)
    assert loaded.fingerprint() == lfnet.fingerprint()
    flat = lfnet.embed(torch.full((1, 3, 96, 64), 0.5))
    assert torch.isfinite(flat).all()
