"""DELF-style attentive local features: geometry, attention, PCA, training and checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from retrieval.datasets import load_dataset
from retrieval.descriptors import NotFittedError, create_descriptor
from retrieval.descriptors.delf import AttentionNetwork, endpoint_geometry, receptive_field_centres
from retrieval.training.delf import attention_classification_loss, attention_pool, paired_attention_loss

# Small but real: pretrained backbone, three pyramid scales, tiny codebook.
SMALL = {
    "image_size": (96, 64),
    "scales": (0.7, 1.0, 1.4),
    "max_keypoints": 40,
    "n_clusters": 4,
    "attention_hidden": 32,
}


def textured(n: int, seed: int, size=(96, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=generator)
    blocks = torch.nn.functional.interpolate(coarse, size=size, mode="nearest")
    return (0.8 * blocks + 0.2 * torch.rand(n, 3, *size, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted_delf():
    delf = create_descriptor("delf", **SMALL).eval()
    delf.fit(textured(6, seed=s) for s in range(2))
    return delf


def test_endpoint_geometry_matches_backbone():
    assert endpoint_geometry("block10") == (112, 16)
    assert endpoint_geometry("block14") == (192, 32)
    assert endpoint_geometry("block4") == (40, 8)
    with pytest.raises(ValueError, match="block endpoint"):
        endpoint_geometry("head")


def test_receptive_field_centres_golden():
    # same size: cell i is centred on pixel 16 i
    centres = receptive_field_centres((2, 3), 16, (32, 48), (32, 48))
    assert centres.tolist() == [[0, 0], [16, 0], [32, 0], [0, 16], [16, 16], [32, 16]]
    # a 2x upscaled pyramid level: pixel 16 of the 64-px level is (16 + 0.5) / 2 - 0.5 = 7.75
    up = receptive_field_centres((4, 4), 16, (64, 64), (32, 32))
    assert up[1].tolist() == [7.75, 0.0] and up.max() <= 31.0


def test_attention_untrained_is_uniform_and_pool_golden():
    net = AttentionNetwork(112, 16)
    scores = net(torch.randn(2, 112, 5, 4))
    assert scores.shape == (2, 1, 5, 4)
    assert torch.allclose(scores, torch.ones_like(scores))
    features = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])  # C=2, two locations: unit (0.6, 0.8) and (1, 0)
    pooled = attention_pool(features, torch.tensor([[[[1.0, 2.0]]]]))
    assert torch.allclose(pooled, torch.tensor([[(0.6 + 2.0) / 2, 0.8 / 2]]))


def test_extract_keypoints_inside_image_and_pca_40(fitted_delf):
    images = textured(3, seed=42)
    features = fitted_delf.extract(images)
    n = features.desc.shape[1]
    assert features.desc.shape == (3, n, 40) and n == 40
    assert torch.allclose(features.desc.norm(dim=-1), torch.ones(3, n), atol=1e-4)
    xy = features.keypoints
    assert (xy[..., 0] >= 0).all() and (xy[..., 0] <= 63).all() and (xy[..., 1] >= 0).all() and (xy[..., 1] <= 95).all()
    assert features.mask.all() and features.image_size == (96, 64)
    cell_sizes = torch.tensor([16 / 0.7, 16.0, 16 / 1.4])
    assert ((features.scales[..., None] - cell_sizes).abs().amin(dim=-1) < 1e-4).all()
    with pytest.raises(NotFittedError):
        create_descriptor("delf", **SMALL).extract(images)


def test_keypoints_are_the_highest_attention_over_all_scales():
    delf = create_descriptor("delf", **{**SMALL, "max_keypoints": 7}).eval()
    torch.nn.init.normal_(delf.attention.conv2.weight, std=0.5)  # a non-uniform attention
    images = textured(2, seed=3)
    dense = []
    for scale in SMALL["scales"]:
        size = (round(96 * scale), round(64 * scale))
        level = (
            images
            if scale == 1.0
            else torch.nn.functional.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
            )
        )
        with torch.no_grad():
            dense.append(delf.attention(delf.block_features(level)).flatten(1))
    expected = torch.cat(dense, dim=1).topk(7, dim=1).values
    features = delf.detect_and_describe(images)
    assert torch.allclose(features.scores, expected, atol=1e-5)


def test_untrained_attention_ties_go_to_the_largest_feature_norms():
    delf = create_descriptor("delf", **{**SMALL, "scales": (1.0,), "max_keypoints": 5}).eval()
    images = textured(2, seed=4)
    norms = delf.block_features(images).norm(dim=1).flatten(1)  # (2, 24) in raster order
    features = delf.detect_and_describe(images)
    centres = receptive_field_centres((6, 4), 16, (96, 64), (96, 64))
    expected = centres[norms.topk(5, dim=1).indices]  # (2, 5, 2)
    assert torch.equal(features.keypoints, expected)


@pytest.mark.parametrize("loss", ["paired", "classifier"])
def test_one_training_step_lowers_the_loss(loss):
    torch.manual_seed(0)
    products, persons = torch.randn(6, 112, 4, 3), torch.randn(6, 112, 4, 3)
    persons[:, :, :2] = products[:, :, :2]  # the "garment" half of each person matches its product
    attention, classifier = AttentionNetwork(112, 32), torch.nn.Linear(112, 6)
    parameters = list(attention.parameters()) + (list(classifier.parameters()) if loss == "classifier" else [])
    optimiser = torch.optim.Adam(parameters, lr=1e-2)

    def value():
        if loss == "paired":
            return paired_attention_loss(attention, products, persons)[0]
        return attention_classification_loss(
            attention, classifier, torch.cat([products, persons]), torch.arange(6).repeat(2)
        )[0]

    before = value()
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    assert value().item() < before.item()
    assert attention.conv2.weight.abs().sum() > 0  # the attention itself learned


def test_paired_loss_golden():
    # uniform attention: pooled = mean of unit features; identical pairs give cosine 1 on the diagonal
    attention = AttentionNetwork(2, 4)
    products = torch.tensor([[[[1.0]], [[0.0]]], [[[0.0]], [[1.0]]]])  # two products, orthogonal
    loss, accuracy = paired_attention_loss(attention, products, products.clone(), scale=16.0)
    expected = torch.nn.functional.cross_entropy(torch.tensor([[16.0, 0.0], [0.0, 16.0]]), torch.arange(2))
    assert torch.isclose(loss, expected) and accuracy == 1.0


def test_train_on_synthetic_and_checkpoint_round_trip(synthetic_root, tmp_path):
    data = load_dataset(f"viton:{synthetic_root}", split="val")
    conf = {**SMALL, "scales": (1.0,)}
    delf = create_descriptor("delf", **conf)
    final = delf.train_on(data, tmp_path / "run", epochs=3, batch_size=8, progress=False)
    assert final.exists() and (tmp_path / "run" / "losses.csv").exists()
    assert len(list((tmp_path / "run" / "block-features").glob("chunk-*.npz"))) >= 1
    assert delf.attention.conv2.weight.abs().sum() > 0

    loaded = create_descriptor(f"delf@{final}", **conf).eval()
    assert torch.equal(loaded.attention.conv2.weight, delf.attention.conv2.weight)
    delf.eval()
    for model in (delf, loaded):
        model.fit([textured(8, seed=1)])
    images = textured(2, seed=9)
    assert torch.allclose(loaded.embed(images), delf.embed(images), atol=1e-5)
    assert loaded.fingerprint() == delf.fingerprint()
    # the recorded endpoint is taken from final.pt; an explicit other backbone is refused, naming it
    with pytest.raises(ValueError, match=r"trained with \{'backbone': 'lite0'\}"):
        create_descriptor(f"delf@{final}", **conf, backbone="lite2", pretrained=False)

    # running the same command again resumes the finished run instead of training anew
    steps = torch.load(final, weights_only=True)["steps"]
    again = create_descriptor("delf", **conf).train_on(data, tmp_path / "run", epochs=3, batch_size=8, progress=False)
    assert torch.load(again, weights_only=True)["steps"] == steps
    # the paper's free classifier trains too, and its classifier does not end up in final.pt
    paper = create_descriptor("delf", **conf).train_on(
        data, tmp_path / "paper", epochs=1, batch_size=8, progress=False, loss="classifier"
    )
    assert set(torch.load(paper, weights_only=True)["state_dict"]) == {
        k for k in delf.state_dict() if k.startswith("attention.")
    }
    with pytest.raises(ValueError, match="valid: paired, classifier"):
        create_descriptor("delf", **conf).train_on(data, tmp_path / "bad", loss="triplet")
