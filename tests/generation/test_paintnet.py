"""PaintNet: Table 1 layer shapes, the GAN helpers, the shape predictor's lookup and the proxy's Table 4 name.

Its training (losses, the renderer step, runs and their checkpoints) is tested in test_training_paintnet.py.
"""

import pytest
import torch

from generation.gan import (
    adversarial_loss,
    conv_block,
    discriminator_loss,
    from_gan_range,
    generator_loss,
    to_gan_range,
    up_block,
)
from generation.paintnet_networks import RealFakeDiscriminator, RelevanceDiscriminator, ShapePredictor, TextureRenderer
from generation.proxies import create_proxy, list_proxies
from generation.training.pairs import save_sample_grid
from retrieval.backbones import EfficientNetLite0

# Small but valid settings for anything that runs (Table 1 widths are checked on the meta device).
TINY = {"width": 0.125, "sp_image_size": (64, 48), "sp_hidden": 16, "sp_dim": 16, "sp_k": 3}


def layer_outputs(module: torch.nn.Sequential, x: torch.Tensor):
    shapes = []
    for layer in module:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    return shapes, x


def convolutions(module):
    return [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]


# ---- Table 1 -------------------------------------------------------------------------------------


def test_renderer_layers_match_table1():
    with torch.device("meta"):
        renderer = TextureRenderer()
        encoded, code = layer_outputs(renderer.encoder, torch.empty(2, 6, 64, 64))
        decoded, out = layer_outputs(renderer.decoder, code)
    assert encoded == [(96, 32, 32), (192, 16, 16), (384, 8, 8), (768, 4, 4), (1536, 1, 1)]
    # the first transposed convolution is the mirror of Conv(5) (1x1x1536 -> 4x4x768), then Table 1's four
    assert decoded == [(768, 4, 4), (384, 8, 8), (192, 16, 16), (96, 32, 32), (3, 64, 64)]
    for conv in convolutions(renderer):
        assert conv.kernel_size == (4, 4)
    assert [c.stride for c in convolutions(renderer.encoder)] == [(2, 2)] * 4 + [(1, 1)]
    assert convolutions(renderer)[0].in_channels == 6
    assert isinstance(renderer.encoder[0][-1], torch.nn.LeakyReLU) and isinstance(
        renderer.decoder[-1][-1], torch.nn.Tanh
    )
    assert isinstance(renderer.decoder[0][-1], torch.nn.ReLU)
    assert out.shape == (2, 3, 64, 64)


def test_discriminators_match_table1():
    with torch.device("meta"):
        rf, rv = RealFakeDiscriminator(), RelevanceDiscriminator()
        rf_shapes, rf_out = layer_outputs(rf.net, torch.empty(2, 3, 64, 64))
        rv_shapes, _ = layer_outputs(rv.net, torch.empty(2, 6, 64, 64))
    expected = [(96, 32, 32), (192, 16, 16), (384, 8, 8), (768, 4, 4), (1, 4, 4)]
    assert rf_shapes == expected and rv_shapes == expected and rf_out.shape == (2, 1, 4, 4)
    assert [c.kernel_size for c in convolutions(rv)] == [(4, 4)] * 4 + [(1, 1)]
    assert convolutions(rf)[0].in_channels == 3 and convolutions(rv)[0].in_channels == 6


def test_128_variant_has_one_more_layer_each_way():
    with torch.device("meta"):
        renderer = TextureRenderer(image_size=128)
        encoded, code = layer_outputs(renderer.encoder, torch.empty(2, 6, 128, 128))
        out = renderer.decoder(code)
        d_out = RelevanceDiscriminator(image_size=128)(torch.empty(2, 6, 128, 128))
    assert encoded[-2:] == [(768, 4, 4), (1536, 1, 1)] and len(encoded) == 6
    assert out.shape == (2, 3, 128, 128) and d_out.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="64x64"):
        TextureRenderer(image_size=96)


def test_without_shape_predictor_the_renderer_takes_the_texture_only():
    proxy = create_proxy("paintnet-wo-sp", width=0.125)
    assert proxy.conf["use_shape_predictor"] is False and proxy.shape_predictor is None
    assert proxy.renderer.in_channels == 3 and convolutions(proxy.renderer)[0].in_channels == 3
    assert {"paintnet", "paintnet-wo-sp"} <= set(list_proxies())


# ---- GAN helpers, golden values ------------------------------------------------------------------


def test_gan_helpers_golden_values():
    assert conv_block(6, 8)(torch.zeros(1, 6, 16, 16)).shape == (1, 8, 8, 8)
    assert up_block(8, 3, norm=False, activation="tanh")(torch.zeros(1, 8, 8, 8)).shape == (1, 3, 16, 16)
    assert adversarial_loss(torch.zeros(3), True).item() == pytest.approx(0.693147, abs=1e-5)
    assert discriminator_loss(torch.full((2,), 20.0), torch.full((2,), -20.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert generator_loss(torch.tensor([1.0, 3.0]), "hinge").item() == -2.0
    assert adversarial_loss(torch.tensor([0.5]), False, "lsgan").item() == 0.25
    x = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(from_gan_range(to_gan_range(x)), x)


def test_sample_grid_png(tmp_path):
    path = save_sample_grid(
        [("photo", torch.rand(3, 3, 8, 8)), ("shape", torch.rand(3, 1, 8, 8))], tmp_path / "g.png", cell=16
    )
    import cv2

    image = cv2.imread(str(path))
    assert image.shape == (16 + 3 * 16, 2 * 16, 3)


def test_pair_archive_round_trip_is_exact(tmp_path):
    from generation.training.pairs import load_pair_archive, save_pair_archive

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "texture": torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=generator),
        "shape": (torch.rand(5, 1, 16, 16, generator=generator) > 0.5).to(torch.uint8) * 255,
    }
    path = save_pair_archive(tensors, tmp_path / "pairs.npz")
    back = load_pair_archive(path)
    assert set(back) == {"texture", "shape"} and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="different lengths"):
        save_pair_archive({"texture": tensors["texture"], "shape": tensors["shape"][:2]}, tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="export-pairs"):
        load_pair_archive(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="export-pairs"):
        load_pair_archive(tmp_path / "missing.npz")


# ---- shape predictor -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLite0(pretrained=True)


def test_shape_predictor_returns_the_nearest_stored_shape(backbone):
    torch.manual_seed(0)
    predictor = ShapePredictor((64, 48), hidden=16, dim=8, shape_size=64, backbone=backbone).eval()
    photos = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        own = predictor(photos)
    assert own.shape == (2, 8)
    # memory: far away entries, and near copies of the two photos' own embeddings at rows 3 and 1
    memory = torch.cat([own[0:1] + 50, own[1:2] + 0.01, own[0:1] - 50, own[0:1] - 0.01])
    shapes = torch.zeros(4, 1, 64, 64, dtype=torch.uint8)
    for row in range(4):
        shapes[row, 0, row * 16 : (row + 1) * 16] = 255  # a distinct band per row
    predictor.set_memory(memory, shapes)
    assert predictor.nearest(own).tolist() == [3, 1]
    predicted = predictor.predict_shape(photos)
    assert torch.equal(predicted, shapes[[3, 1]].float() / 255)
    # leave-one-out lookup over the memory itself never returns the row itself
    assert (predictor.nearest(memory, exclude_self=True) != torch.arange(4)).all()


# ---- the proxy -----------------------------------------------------------------------------------


def test_only_the_papers_paintnet_takes_its_table4_row():
    assert create_proxy("paintnet", **TINY).paper_name() == "paintnet"
    for variant in ({"use_rf_discriminator": False}, {"use_perceptual": False}, {"train_shapes": "predicted"}):
        assert create_proxy("paintnet", **TINY, **variant).paper_name() is None
    assert create_proxy("paintnet-wo-sp", **TINY).paper_name() is None
    assert create_proxy("none").paper_name() == "none"
