"""Golden values for the generation metrics: RMSE, SSIM, the IS-style score and garment mIoU."""

import math

import numpy as np
import pytest
import torch

from generation.metrics import (
    IS_NAME,
    GarmentIoU,
    garment_miou,
    inception_score_from_probabilities,
    inception_style_score,
    rmse,
    ssim,
)


def test_rmse_golden_and_reference_loop():
    zeros = torch.zeros(1, 1, 2, 2)
    half_ones = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    assert float(rmse(zeros, half_ones)) == pytest.approx(math.sqrt(0.5))
    assert float(rmse(torch.full((2, 3, 4, 4), 0.3), torch.full((2, 3, 4, 4), 0.4))) == pytest.approx(0.1)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 5, 4, generator=generator), torch.rand(3, 3, 5, 4, generator=generator)
    reference = [
        math.sqrt(sum((x - y) ** 2 for x, y in zip(a[i].flatten().tolist(), b[i].flatten().tolist())) / a[i].numel())
        for i in range(3)
    ]
    assert rmse(a, b, reduction="none").tolist() == pytest.approx(reference, rel=1e-5)
    assert float(rmse(a, b)) == pytest.approx(np.mean(reference), rel=1e-5)  # mean of per-image RMSEs


def test_ssim_golden():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=generator)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    # two flat images a, b: only the luminance term is left, (2ab + c1) / (a^2 + b^2 + c1), c1 = 0.01^2
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert float(flat) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert float(ssim(x, 1 - x)) < 0.0  # anti-correlated structure
    assert float(ssim(x, x.flip(-1))) == pytest.approx(float(ssim(x.flip(-1), x)), abs=1e-6)
    assert ssim(x, x, reduction="none").shape == (2,)


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="shape"):
        rmse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        rmse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), reduction="sum")


def test_inception_score_bounds():
    k = 5
    assert inception_score_from_probabilities(torch.eye(k), splits=1) == (pytest.approx(k), 0.0)  # upper bound K
    assert inception_score_from_probabilities(torch.full((6, k), 1 / k), splits=2)[0] == pytest.approx(
        1.0
    )  # lower bound
    same = torch.softmax(torch.randn(1, k, generator=torch.Generator().manual_seed(2)), dim=1).repeat(8, 1)
    assert inception_score_from_probabilities(same, splits=4)[0] == pytest.approx(1.0)
    random_rows = torch.softmax(3 * torch.randn(40, k, generator=torch.Generator().manual_seed(3)), dim=1)
    mean, std = inception_score_from_probabilities(random_rows, splits=4)
    assert 1.0 < mean < k and std > 0
    # two confident classes, half the images each: exp(log 2) = 2
    two = torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3)
    assert inception_score_from_probabilities(two, splits=1)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="splits"):
        inception_score_from_probabilities(torch.eye(3), splits=4)


def test_inception_style_score_with_classifier():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))

    def classifier(batch):  # mean colour -> 4 logits: a fixed, tiny "classifier"
        assert batch.shape[-2:] == (32, 32)
        return batch.mean(dim=(2, 3)) @ weights * 10

    score = inception_style_score(images, classifier=classifier, splits=2, batch_size=4, image_size=(32, 32))
    resized = torch.nn.functional.interpolate(
        images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
    )
    expected = inception_score_from_probabilities(torch.softmax(classifier(resized).double(), dim=1), splits=2)
    assert score == pytest.approx(expected)
    batches = inception_style_score(torch.split(images, 3), classifier=classifier, splits=2, image_size=(32, 32))
    assert batches == pytest.approx(expected)


def test_inception_style_score_of_identical_images_is_one():
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    mean, std = inception_style_score(image.repeat(4, 1, 1, 1), splits=2)  # pretrained Lite0 classifier
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert "EfficientNet-Lite0" in IS_NAME


def test_garment_miou_golden_and_accumulation():
    predicted = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)
    result = garment_miou(predicted, truth)
    assert result["iou_garment"] == pytest.approx(1 / 2)
    assert result["iou_background"] == pytest.approx(2 / 3)
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # accumulated over batches = computed on everything at once (pixel counts, not a mean of image IoUs)
    generator = torch.Generator().manual_seed(7)
    p, t = torch.rand(6, 1, 5, 4, generator=generator) > 0.5, torch.rand(6, 1, 5, 4, generator=generator) > 0.6
    metric = GarmentIoU()
    metric.update(p[:2], t[:2])
    metric.update(p[2:], t[2:])
    once = garment_miou(p, t)
    assert metric.compute() == pytest.approx(once)
    inter, union = (p & t).sum().item(), (p | t).sum().item()
    assert once["iou_garment"] == pytest.approx(inter / union)
    assert once["images"] == 6
    # no garment in either mask: perfect agreement; numpy and {0, 1} masks are accepted
    assert garment_miou(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))["iou_garment"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        garment_miou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
