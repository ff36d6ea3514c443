"""generation/training/paintnet.py: PaintNet's losses, the renderer step, training runs and their checkpoints."""

import csv

import pytest
import torch

from generation.paintnet import PaintNet
from generation.paintnet_networks import (
    RealFakeDiscriminator,
    RelevanceDiscriminator,
    ShapePredictor,
    TextureRenderer,
    attention_pool,
)
from generation.proxies import create_proxy
from generation.training.paintnet import PaintNetTrainConfig
from generation.training.paintnet_losses import (
    PerceptualLoss,
    RendererStep,
    gram_matrix,
    perceptual_losses,
    relevance_batch,
)
from generation.training.paintnet_shape_predictor import rank_triplet_candidates, shape_iou_matrix, triplet_loss
from retrieval.backbones import EfficientNetLite0
from retrieval.datasets import load_viton
from retrieval.training import trainer_for

# Small but valid settings for anything that runs.
TINY = {"width": 0.125, "sp_image_size": (64, 48), "sp_hidden": 16, "sp_dim": 16, "sp_k": 3}


# ---- losses, golden values -----------------------------------------------------------------------


def test_loss_pieces_golden_values():
    features = torch.arange(8.0).view(1, 2, 2, 2)  # rows [0, 1, 2, 3] and [4, 5, 6, 7]
    assert torch.allclose(gram_matrix(features), torch.tensor([[[14.0, 38.0], [38.0, 126.0]]]) / 8)
    fea, sty = perceptual_losses({"a": features}, {"a": features + 1}, ("a",), ("a",))
    assert fea.item() == 1.0
    expected_style = ((gram_matrix(features) - gram_matrix(features + 1)) ** 2).sum()
    assert sty.item() == pytest.approx(expected_style.item())
    # ||a-p||^2 = 1, ||a-n||^2 = 4: loss = max(0, 1 - 4 + 5) = 2
    assert triplet_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 5.0).item() == 2.0
    assert attention_pool(torch.tensor([[[[2.0, 4.0]]]]), torch.tensor([[[[0.0, 100.0]]]])).item() == pytest.approx(4.0)


def test_relevance_batch_picks_real_generated_or_irrelevant():
    real, fake, other = torch.zeros(3, 3, 2, 2), torch.ones(3, 3, 2, 2), torch.full((3, 3, 2, 2), 2.0)
    images, targets = relevance_batch(real, fake, other, torch.tensor([0, 1, 2]))
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0] and targets.tolist() == [1.0, 0.0, 0.0]


def test_triplet_candidates_and_shape_iou():
    shapes = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    shapes[0, :, :16] = 255
    shapes[1, :, :12] = 255  # overlaps 0 most
    shapes[2, :, 16:] = 255  # disjoint from 0
    shapes[3, :, 8:24] = 255
    iou = shape_iou_matrix(shapes)
    assert iou[0, 1].item() == pytest.approx(12 / 16) and iou[0, 2].item() == 0.0 and iou[1, 1].item() == 1.0
    positives, negatives = rank_triplet_candidates(iou, k=1)
    assert positives[0].item() == 1 and negatives[0].item() == 2
    assert (positives != torch.arange(4)[:, None]).all() and (negatives != torch.arange(4)[:, None]).all()


# ---- shape predictor training --------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLite0(pretrained=True)


def test_one_triplet_step_lowers_the_loss(backbone):
    torch.manual_seed(0)
    predictor = ShapePredictor((64, 48), hidden=16, dim=8, backbone=backbone)
    maps = torch.rand(6, 1280, 2, 2)
    optimizer = torch.optim.SGD(
        list(predictor.attention.parameters()) + list(predictor.embedding.parameters()), lr=1e-3, momentum=0.9
    )

    def loss():
        a, p, n = predictor.embed_maps(maps).chunk(3)
        return triplet_loss(a, p, n, margin=5.0)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert before.item() > 0 and loss().item() < before.item()


# ---- renderer optimisation -----------------------------------------------------------------------


def tiny_renderer_parts(backbone, rf=True, rv=True, perceptual=True, lambda_l1=0.0):
    torch.manual_seed(0)
    conf = {**PaintNet.default_conf, "lambda_l1": lambda_l1}
    renderer = TextureRenderer(width=0.125)
    d_rf = RealFakeDiscriminator(width=0.125) if rf else None
    d_rv = RelevanceDiscriminator(width=0.125) if rv else None
    loss = PerceptualLoss(backbone) if perceptual else None
    optimizers = {"g": torch.optim.Adam(renderer.parameters(), lr=1e-4, betas=(0.5, 0.999))}
    for name, d in (("rf", d_rf), ("rv", d_rv)):
        if d is not None:
            optimizers[name] = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.5, 0.999))
    return RendererStep(renderer, d_rf, d_rv, loss, optimizers, conf)


def tiny_batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "texture": torch.rand(b, 3, 64, 64, generator=g) * 2 - 1,
        "shape": (torch.rand(b, 1, 64, 64, generator=g) > 0.5).float() * 2 - 1,
        "product": torch.rand(b, 3, 64, 64, generator=g) * 2 - 1,
        "index": torch.arange(b),
    }


def test_one_step_lowers_every_renderer_loss(backbone):
    step = tiny_renderer_parts(backbone, lambda_l1=1.0)
    batch = tiny_batch(b=2)
    pool = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    choice, irrelevant = step.draw(batch, torch.Generator().manual_seed(2), pool)
    fake = step.generate(batch).detach()
    before = step.discriminator_losses(batch, fake, choice, irrelevant)
    for name, loss in before.items():  # one Adam step per discriminator on its own loss
        step.optimizers[name[2:]].zero_grad()
        loss.backward()
        step.optimizers[name[2:]].step()
    after = step.discriminator_losses(batch, fake, choice, irrelevant)
    assert set(before) == {"d_rf", "d_rv"}
    for name in before:
        assert after[name].item() < before[name].item(), name

    g_before = step.generator_losses(batch, step.generate(batch))
    step.optimizers["g"].zero_grad()
    g_before["g_total"].backward()
    step.optimizers["g"].step()
    g_after = step.generator_losses(batch, step.generate(batch))
    assert set(g_before) == {"g_rf", "g_rv", "g_fea", "g_sty", "g_l1", "g_total"}
    assert g_after["g_total"].item() < g_before["g_total"].item()


@pytest.mark.parametrize(
    "switch, removed",
    [("rf", {"d_rf", "g_rf"}), ("rv", {"d_rv", "g_rv"}), ("perceptual", {"g_fea", "g_sty"})],
)
def test_ablation_switches_remove_their_loss_terms(backbone, switch, removed):
    step = tiny_renderer_parts(backbone, **{switch: False})
    pool = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    logged = step.step(tiny_batch(b=2), torch.Generator().manual_seed(0), pool)
    full = {"d_rf", "d_rv", "g_rf", "g_rv", "g_fea", "g_sty", "g_total"}
    assert set(logged) == full - removed


# ---- training, checkpoints -----------------------------------------------------------------------


def test_train_checkpoint_round_trip(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    proxy = create_proxy("paintnet", **TINY)
    final = proxy.train_on(
        data,
        tmp_path / "run",
        epochs=1,
        batch_size=4,
        seed=0,
        progress=False,
        sp_epochs=1,
        sample_every=2,
        max_pairs=8,
        use_rf_discriminator=False,
    )
    payload = torch.load(final, weights_only=True)
    assert payload["proxy"] == "paintnet" and payload["proxy_conf"]["use_rf_discriminator"] is False
    assert not any(".backbone." in f".{k}" for k in payload["state_dict"])
    assert payload["state_dict"]["shape_predictor.memory_shapes"].shape == (8, 1, 64, 64)  # max_pairs
    with open(tmp_path / "run" / "losses.csv") as handle:
        columns = next(csv.reader(handle))
    assert "d_rf" not in columns and "g_rf" not in columns and {"d_rv", "g_rv", "g_fea", "g_sty"} <= set(columns)
    assert list((tmp_path / "run" / "samples").glob("step_*.png"))

    images = torch.rand(2, 3, 80, 60, generator=torch.Generator().manual_seed(3))
    expected = proxy(images)
    loaded = create_proxy(f"paintnet@{final}", **TINY)
    assert loaded.conf["use_rf_discriminator"] is False  # training-only options come with the checkpoint
    out = loaded(images)
    assert out.shape == (2, 3, 80, 60) and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(out, expected, atol=1e-5)
    assert loaded.fingerprint() == proxy.fingerprint() != create_proxy("paintnet", **TINY).fingerprint()
    with pytest.raises(ValueError, match="trained with"):
        create_proxy(f"paintnet@{final}", **{**TINY, "width": 0.25})
    bare = create_proxy(f"paintnet@{final}")  # no options: the architecture comes with the checkpoint
    assert bare.conf["width"] == TINY["width"] and torch.allclose(bare(images), expected, atol=1e-5)


def test_renderer_trained_from_an_archive_joins_a_shape_predictor(synthetic_root, tmp_path):
    """The GPU-machine path: train the renderer on an archive alone, then join it with a trained shape predictor."""
    from generation.training.pairs import prepare_pair_tensors, save_pair_archive

    data = load_viton(synthetic_root, split="val")
    options = dict(batch_size=4, seed=0, progress=False, sample_every=100, max_pairs=8)
    with_sp = create_proxy("paintnet", **TINY).train_on(data, tmp_path / "sp", epochs=1, sp_epochs=1, **options)
    archive = save_pair_archive(prepare_pair_tensors(data.train, None, (64, 64)), tmp_path / "pairs.npz")

    renderer_run = create_proxy("paintnet", **TINY).train_on(
        None, tmp_path / "gpu", epochs=1, pairs=str(archive), **options
    )
    payload = torch.load(renderer_run, weights_only=True)
    assert payload["shape_predictor"] == {"trained": False}
    assert payload["state_dict"]["shape_predictor.memory_shapes"].numel() == 0  # nothing trained it

    joined = create_proxy("paintnet", **TINY).train_on(
        None,
        tmp_path / "joined",
        epochs=0,
        pairs=str(archive),
        renderer_from=str(renderer_run),
        shape_predictor_from=str(with_sp),
        **options,
    )
    state = torch.load(joined, weights_only=True)
    for key, value in payload["state_dict"].items():
        if key.startswith("renderer."):
            assert torch.equal(state["state_dict"][key], value)
    sp_state = torch.load(with_sp, weights_only=True)["state_dict"]
    assert torch.equal(
        state["state_dict"]["shape_predictor.memory_embeddings"], sp_state["shape_predictor.memory_embeddings"]
    )
    assert state["renderer_from"]["steps"] == payload["steps"] == 2
    assert state["shape_predictor"]["taken_from"] == str(with_sp)
    # train_shapes="predicted" takes the leave-one-out shapes from the reused memory, when it holds these pairs
    with pytest.raises(ValueError, match="not built from these training pairs"):
        create_proxy("paintnet", **{**TINY, "train_shapes": "predicted"}).train_on(
            None, tmp_path / "loo-other", epochs=0, pairs=str(archive), shape_predictor_from=str(with_sp)
        )
    same_pairs = data.train.sample(8, random_state=0).reset_index(drop=True)  # the sample with_sp trained on
    same_archive = save_pair_archive(prepare_pair_tensors(same_pairs, None, (64, 64)), tmp_path / "same.npz")
    loo = create_proxy("paintnet", **{**TINY, "train_shapes": "predicted"}).train_on(
        None,
        tmp_path / "loo",
        epochs=1,
        batch_size=4,
        progress=False,
        pairs=str(same_archive),
        shape_predictor_from=str(with_sp),
    )
    assert torch.load(loo, weights_only=True)["steps"] == 2
    with pytest.raises(ValueError, match="renders 128x128"):
        create_proxy("paintnet", **{**TINY, "image_size": 128}).train_on(
            None, tmp_path / "x", epochs=0, pairs=str(archive)
        )
    with pytest.raises(ValueError, match="does not fit"):
        create_proxy("paintnet", **{**TINY, "width": 0.25}).train_on(
            None, tmp_path / "y", epochs=0, pairs=str(archive), renderer_from=str(renderer_run)
        )


def test_train_on_types_text_overrides(tmp_path):
    """A text 'false' (an old spec, a JSON file) must not train the full model under an ablation's name."""
    proxy = create_proxy("paintnet", **TINY)
    with pytest.raises(ValueError, match="no training pairs"):  # no data: it stops after adopting the options
        proxy.train_on(None, tmp_path / "run", epochs=0, use_perceptual="false")
    assert proxy.conf["use_perceptual"] is False and proxy.paper_name() is None
    with pytest.raises(ValueError, match="paintnet option width=0,5: expected a number"):
        create_proxy("paintnet", **TINY).train_on(None, tmp_path / "run2", epochs=0, width="0,5")


def test_one_trainer_config_for_both_names_and_every_proxy_option():
    """train_on(OPTION=...) takes PaintNet's own options too (None: the proxy's): the config must name each."""
    import dataclasses

    assert trainer_for("paintnet").config is trainer_for("paintnet-wo-sp").config is PaintNetTrainConfig
    fields = {field.name for field in dataclasses.fields(PaintNetTrainConfig)}
    assert set(PaintNet.default_conf) <= fields
    defaults = trainer_for("paintnet").defaults()
    assert all(defaults[key] is None for key in PaintNet.default_conf)
    assert defaults["batch_size"] == 16 and defaults["lr"] == 1e-4 and defaults["checkpoint_every_s"] == 300.0
    with pytest.raises(ValueError, match="unknown options \\['lamda_rf'\\]"):
        create_proxy("paintnet", **TINY).train_on(None, "unused", lamda_rf=0.1)
