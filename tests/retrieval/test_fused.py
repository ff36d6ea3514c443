"""The fused descriptor (score-level fusion as one vector) and its weight fitting, on tiny seeded inputs."""

import numpy as np
import pytest
import torch

from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.fused import fuse_vectors, normalised_weights
from retrieval.training.fused import fused_map_at_20, simplex_grid

BRANCHES = "colorhist[image_size=(48, 32)]|colorhist[image_size=(48, 32);bins=(8, 2, 2)]"


def test_the_fused_inner_product_is_the_weighted_sum_of_branch_similarities():
    rng = torch.Generator().manual_seed(0)
    q = [torch.nn.functional.normalize(torch.randn(4, d, generator=rng), dim=1) for d in (5, 3)]
    g = [torch.nn.functional.normalize(torch.randn(6, d, generator=rng), dim=1) for d in (5, 3)]
    w = normalised_weights([3, 1], 2)
    assert torch.allclose(w, torch.tensor([0.75, 0.25]))
    fused = fuse_vectors(q, w) @ fuse_vectors(g, w).T
    expected = 0.75 * (q[0] @ g[0].T) + 0.25 * (q[1] @ g[1].T)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(fuse_vectors(q, w).norm(dim=1), torch.ones(4), atol=1e-6)
    for bad in ([1], [1, -1], [0, 0]):
        with pytest.raises(ValueError, match="non-negative"):
            normalised_weights(bad, 2)


def test_simplex_grid_and_fused_map_against_a_plain_loop():
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and np.allclose(grid.sum(1), 1) and (grid >= 0).all()
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(2, 0.3)
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(2, 7, 9))
    targets = rng.integers(0, 9, size=7)
    got = fused_map_at_20(sims, targets, grid[:, :2] / grid[:, :2].sum(1, keepdims=True).clip(1e-9))
    for w, value in zip(grid[:, :2] / grid[:, :2].sum(1, keepdims=True).clip(1e-9), got):
        aps = []
        for q in range(7):
            scores = w[0] * sims[0, q] + w[1] * sims[1, q]
            rank = 1 + sum(scores[j] >= scores[targets[q]] for j in range(9) if j != targets[q])
            aps.append(1.0 / rank if rank <= 20 else 0.0)
        assert value == pytest.approx(np.mean(aps))


def test_training_picks_weights_at_least_as_good_as_each_branch_and_they_travel(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    fused = create_descriptor(f"fused[branches={BRANCHES}]")
    final = fused.train_on(data, tmp_path / "run", seed=0, progress=False, grid_step=0.25)
    payload = torch.load(final, weights_only=True)
    calibration = payload["calibration"]
    chosen = calibration["mAP@20"][calibration["grid"].index(calibration["chosen"])]
    assert chosen == max(calibration["mAP@20"])
    singles = [calibration["mAP@20"][calibration["grid"].index(c)] for c in ([1.0, 0.0], [0.0, 1.0])]
    assert chosen >= max(singles)
    assert fused.fusion_weights.tolist() == pytest.approx(calibration["chosen"])
    loaded = create_descriptor(f"fused[branches={BRANCHES}]@{final}")
    assert loaded.fusion_weights.tolist() == pytest.approx(calibration["chosen"])
    assert loaded.fingerprint() == fused.fingerprint()
    alone = create_descriptor(f"fused@{final}")  # the branches' architectures from the checkpoint's record
    assert alone.fingerprint() == fused.fingerprint() and alone.dim == fused.dim
    with pytest.raises(ValueError, match="needs its branches"):
        create_descriptor("fused").dim
    # the recorded config rebuilds the fusion from its architectures alone (an index keeps only this)
    rebuilt = create_descriptor("fused", **loaded.config())
    rebuilt.load_state_dict(loaded.state_dict())
    assert rebuilt.fingerprint() == loaded.fingerprint()
    images = torch.rand(2, 3, 48, 32)
    assert torch.allclose(rebuilt.embed(images), loaded.embed(images))


def test_calibration_can_add_street_copies_drawn_apart_from_training_ones(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    data = load_viton(synthetic_root, split="val")
    studio_pairs = data.train["person_image"].nunique()
    fused = create_descriptor(f"fused[branches={BRANCHES}]")
    final = fused.train_on(
        data, tmp_path / "run", seed=0, progress=False, grid_step=0.5, calibration_pairs=0, street_copies=1
    )
    payload = torch.load(final, weights_only=True)
    assert payload["calibration"]["pairs"] == 2 * studio_pairs  # every studio pair and one street copy of each
    assert payload["config"]["train"]["street_copies"] == 1
