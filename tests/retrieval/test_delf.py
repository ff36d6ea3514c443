"""DELF-style attentive local features: geometry, attention, PCA, training and checkpoint round trip."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from retrieval.batching import load_batch
from retrieval.datasets import load_dataset
from retrieval.datasets.viton_street import street_training_pairs
from retrieval.descriptors import NotFittedError, create_descriptor
from retrieval.descriptors.delf import AttentionNetwork, endpoint_geometry, receptive_field_centres
from retrieval.files import read_checked_bytes
from retrieval.proxy_stage import to_descriptor_input
from retrieval.training import delf as delf_training
from retrieval.training.delf import attention_classification_loss, attention_pool, paired_attention_loss
from street2shop.cli import cli

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


def unit_photos(rows) -> torch.Tensor:
    """(B, C) rows -> (B, C, 1, 1) block features: one location each, so an untrained (uniform) attention pools
    each photo to its normalised row."""
    return torch.tensor(rows)[:, :, None, None]


def test_paired_loss_leaves_other_pairs_of_the_product_out_golden():
    # three pairs, the first two of one product (a studio pair and its street copy: the same product photo)
    attention = AttentionNetwork(2, 4)
    products = unit_photos([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    persons = unit_photos([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    s = 2.0
    # cosines persons x products: [[1, 1, 0], [0.6, 0.6, 0.8], [0, 0, 1]]; (0, 1) and (1, 0) are left out
    rows = [math.log1p(math.exp(-s)), math.log1p(math.exp(0.2 * s)), math.log1p(2 * math.exp(-s))]
    columns = [math.log1p(math.exp(-s)), math.log1p(math.exp(-0.6 * s)), math.log1p(math.exp(-0.2 * s) + math.exp(-s))]
    loss, accuracy = paired_attention_loss(attention, products, persons, scale=s, labels=torch.tensor([5, 5, 7]))
    assert loss.item() == pytest.approx(0.5 * (sum(rows) / 3 + sum(columns) / 3), rel=1e-6)
    assert accuracy.item() == pytest.approx(2 / 3)  # person 1 is closer to product 2
    unmasked, _ = paired_attention_loss(attention, products, persons, scale=s)
    assert unmasked.item() > loss.item()  # the duplicate counted as a negative before
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in attention.parameters())  # -inf logits pass no NaN back


def test_paired_loss_without_duplicates_is_unchanged_by_labels():
    torch.manual_seed(1)
    attention = AttentionNetwork(8, 4)
    torch.nn.init.normal_(attention.conv2.weight, std=0.5)
    products, persons = torch.randn(5, 8, 3, 2), torch.randn(5, 8, 3, 2)
    plain = paired_attention_loss(attention, products, persons)
    labelled = paired_attention_loss(attention, products, persons, labels=torch.tensor([4, 0, 3, 1, 2]))
    assert torch.equal(plain[0], labelled[0]) and torch.equal(plain[1], labelled[1])


def test_train_on_synthetic_and_checkpoint_round_trip(synthetic_root, tmp_path):
    data = load_dataset(f"viton:{synthetic_root}", split="val")
    conf = {**SMALL, "scales": (1.0,)}
    delf = create_descriptor("delf", **conf)
    final = delf.train_on(data, tmp_path / "run", epochs=3, batch_size=8, progress=False)
    assert final.exists() and (tmp_path / "run" / "losses.csv").exists()
    assert len(list((tmp_path / "run" / "block-features").glob("chunk-*.npz"))) >= 1
    assert delf.attention.conv2.weight.abs().sum() > 0
    # without street copies or a proxy the run config is what it was before those options (resume matches)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "street_copies" not in config and "proxy" not in config
    assert "proxy" not in torch.load(final, weights_only=True)

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


class InvertedLarge:
    """A test proxy: 1 - image, reading photos at twice the descriptor's size (its output is resized back)."""

    name = "inverted"
    input_scale = 2.0

    def fingerprint(self) -> str:
        return "inverted-1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return 1.0 - images


def test_street_copies_and_a_proxy_train_are_recorded_and_resume(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))  # where the street copies are generated
    data = load_dataset(f"viton:{synthetic_root}", split="val")
    conf = {**SMALL, "scales": (1.0,)}
    options = dict(epochs=2, batch_size=8, progress=False, street_copies=1, proxy=InvertedLarge())
    batch_labels = []

    def recording_loss(*args, labels=None, **kwargs):
        batch_labels.append(labels)
        return paired_attention_loss(*args, labels=labels, **kwargs)

    monkeypatch.setattr(delf_training, "paired_attention_loss", recording_loss)
    delf = create_descriptor("delf", **conf)
    final = delf.train_on(data, tmp_path / "run", **options)
    # the loss got each batch's product ids, and some batch held a pair and its street copy
    assert batch_labels and all(labels is not None and len(labels) <= 8 for labels in batch_labels)
    assert any(len(labels.unique()) < len(labels) for labels in batch_labels)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["street_copies"] == 1 and config["pairs"] == 2 * len(data.train)
    assert config["products"] == data.train["product_id"].nunique()  # a street copy keeps its pair's product
    assert config["proxy"] == {"name": "inverted", "fingerprint": "inverted-1"}
    payload = torch.load(final, weights_only=True)
    assert payload["proxy"]["name"] == "inverted" and payload["steps"] > 0
    losses = (tmp_path / "run" / "losses.csv").read_text().splitlines()
    assert len(losses) > 1 and "nan" not in "".join(losses[1:]).lower()

    # the first chunk: the product photos as they are, then the person photos behind the proxy
    pairs = street_training_pairs(dataclasses.replace(data, train=data.train.sort_values("pair_id")), 1, seed=0)
    rows = pairs.iloc[np.random.default_rng(0).permutation(len(pairs))[:3]]
    with np.load(io.BytesIO(read_checked_bytes(tmp_path / "run" / "block-features" / "chunk-00000.npz"))) as chunk:
        features, labels = chunk["features"], chunk["labels"]
    n = len(features) // 2
    assert n == min(64, len(pairs)) and (labels[:n] == labels[n:]).all()
    size = conf["image_size"]
    with torch.no_grad():
        products = delf.block_features(load_batch(list(rows["product_image"]), size))
        persons = delf.block_features(
            to_descriptor_input(1.0 - load_batch(list(rows["person_image"]), (2 * size[0], 2 * size[1])), size)
        )
    assert torch.allclose(torch.from_numpy(features[:3]).float(), products, atol=2e-2)
    assert torch.allclose(torch.from_numpy(features[n : n + 3]).float(), persons, atol=2e-2)

    # the same command resumes the finished run; other street copies or no proxy are another run
    again = create_descriptor("delf", **conf).train_on(data, tmp_path / "run", **options)
    assert torch.load(again, weights_only=True)["steps"] == payload["steps"]
    for other in ({"street_copies": 2}, {"proxy": "none"}):
        with pytest.raises(ValueError, match="another config"):
            create_descriptor("delf", **conf).train_on(data, tmp_path / "run", **{**options, **other})


def test_cli_trains_delf_on_street_copies_behind_a_named_proxy(synthetic_root, tmp_path, monkeypatch):
    """`--set street_copies=N --set proxy=SPEC`: the CLI types both and builds the proxy (retrieval/ cannot)."""
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    settings = ["image_size=96,64", "attention_hidden=32", "street_copies=1", "proxy=hp"]
    result = CliRunner().invoke(
        cli,
        ["train", "descriptor", "delf", "--dataset", f"viton:{synthetic_root}", "--out", str(run)]
        + ["--epochs", "1", "--batch-size", "8", "--device", "cpu"]
        + [arg for setting in settings for arg in ("--set", setting)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["street_copies"] == 1 and config["proxy"]["name"] == "hp" and config["proxy"]["fingerprint"]
    assert "training pairs (+ 1 street copy of each)" in result.output  # the count says what was seen
