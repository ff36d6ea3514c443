"""Baseline generators: pix2pix (U-Net + PatchGAN + L1) and the DTGAN-style association GAN."""

import csv

import pandas as pd
import pytest
import torch

from generation.dtgan import Bottleneck, DcganDiscriminator, ResidualGenerator
from generation.gan import init_gan_weights
from generation.pix2pix import PatchDiscriminator, UNetGenerator, patch_receptive_field, unet_channels
from generation.proxies import create_proxy, list_proxies
from generation.training.gan import (
    association_discriminator_loss,
    association_pairs,
    draw_unassociated,
    dtgan_generator_loss,
    dtgan_step,
    pix2pix_discriminator_loss,
    pix2pix_generator_loss,
    pix2pix_step,
    product_codes_of,
    realfake_discriminator_loss,
)
from retrieval.datasets import load_viton

# Small but valid configs for anything that trains or runs on real tensors.
TINY = {"pix2pix": {"width": 8}, "dtgan": {"stem_width": 4}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread buys nothing, and on a shared, oversubscribed CPU
    its OpenMP spin-waits made this file 4x slower (137 s instead of 33 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paired_batch(n: int = 4, size: int = 64, seed: int = 0):
    """Seeded (photo, product) pairs in [-1, 1]: the product is a smooth colour field, the photo a
    shifted, noisier copy of it on a darker surround, so the pairs are associated and learnable."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    product = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    photo = 0.3 * torch.ones_like(product)
    photo[..., 8:-8, 8:-8] = product[..., 4:-12, 6:-10]
    photo = (photo + 0.05 * torch.randn(photo.shape, generator=generator)).clamp(0, 1)
    return photo * 2 - 1, product * 2 - 1


# ---- pix2pix networks -----------------------------------------------------------------------------


def test_unet_encoder_levels_and_skip_shapes():
    unet = UNetGenerator(levels=6, width=8).eval()
    features = unet.encode(torch.zeros(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [
        (8, 32, 32),
        (16, 16, 16),
        (32, 8, 8),
        (64, 4, 4),
        (64, 2, 2),
        (64, 1, 1),
    ]
    # every decoder layer but the first takes its input concatenated with the skip of that resolution
    assert [layer[0].in_channels for layer in unet.decoder] == [64, 128, 128, 64, 32, 16]
    assert [layer[0].out_channels for layer in unet.decoder] == [64, 64, 32, 16, 8, 3]
    out = unet(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    # the skips carry the image: with the bottleneck blanked, two photos still decode differently
    a, b = unet.encode(torch.rand(1, 3, 64, 64)), unet.encode(torch.rand(1, 3, 64, 64))
    blank = torch.zeros_like(a[-1])
    assert not torch.allclose(unet.decode([*a[:-1], blank]), unet.decode([*b[:-1], blank]))
    with pytest.raises(ValueError, match="64, 64"):
        unet(torch.zeros(1, 3, 128, 128))


def convolution_channels(module):
    return [
        (m.in_channels, m.out_channels)
        for m in module.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]


def test_unet_full_size_matches_pix2pix_at_64_and_128():
    assert unet_channels(6) == [64, 128, 256, 512, 512, 512]
    # full widths checked on the meta device (built, never run); the spatial shapes on small widths
    with torch.device("meta"):
        unet = UNetGenerator(levels=7, width=64)
    assert [c for _, c in convolution_channels(unet.encoder)] == [64, 128, 256, 512, 512, 512, 512]
    assert convolution_channels(unet.decoder) == [
        (512, 512),
        (1024, 512),
        (1024, 512),
        (1024, 256),
        (512, 128),
        (256, 64),
        (128, 3),
    ]
    for levels, side in ((6, 64), (7, 128)):
        small = UNetGenerator(levels=levels, width=4).eval()
        features = small.encode(torch.zeros(1, 3, side, side))
        assert [f.shape[-1] for f in features] == [side // 2**k for k in range(1, levels + 1)]
        assert small(torch.zeros(1, 3, side, side)).shape == (1, 3, side, side)
    # BatchNorm everywhere but the first encoder layer and the 1x1 bottleneck; dropout in 3 decoder layers
    unet = UNetGenerator(levels=6, width=8)
    has_norm = [any(isinstance(m, torch.nn.BatchNorm2d) for m in layer) for layer in unet.encoder]
    assert has_norm == [False, True, True, True, True, False]
    assert [any(isinstance(m, torch.nn.Dropout) for m in layer) for layer in unet.decoder] == [True] * 3 + [False] * 3


def test_patchgan_grid_and_70_pixel_receptive_field():
    assert patch_receptive_field(3) == 70
    discriminator = PatchDiscriminator(in_channels=6, width=8).eval()
    assert discriminator(torch.zeros(2, 6, 64, 64)).shape == (2, 1, 6, 6)
    images = torch.rand(1, 6, 160, 160, requires_grad=True)
    logits = discriminator(images)
    assert logits.shape == (1, 1, 18, 18)
    # the pixels that one central logit depends on form a 70x70 square
    logits[0, 0, 9, 9].backward()
    support = images.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = support.any(dim=1).nonzero(), support.any(dim=0).nonzero()
    assert (rows.max() - rows.min() + 1).item() == 70 and (cols.max() - cols.min() + 1).item() == 70


# ---- DTGAN networks -------------------------------------------------------------------------------


def test_residual_generator_shapes():
    generator = ResidualGenerator(stem_width=4, encoder_blocks=(1, 2, 1, 1), decoder_blocks=(2, 1, 1, 1)).eval()
    code = generator.encode(torch.zeros(2, 3, 64, 64))
    assert code.shape == (2, 128, 4, 4)  # 32 * stem_width channels at 64 / 16
    out = generator(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    assert generator(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 128, 128)
    assert Bottleneck(16, 8, stride=2)(torch.zeros(1, 16, 32, 32)).shape == (1, 32, 16, 16)
    with pytest.raises(ValueError):
        generator(torch.zeros(1, 3, 60, 60))
    # 003's full sizes (built on the meta device, never run): ResNet-50's (3, 4, 6, 3) bottlenecks reaching
    # 2048 channels, ResNet-34's (3, 6, 4, 3) basic blocks reversed, 512 -> 64 channels
    with torch.device("meta"):
        full = ResidualGenerator(stem_width=64, encoder_blocks=(3, 4, 6, 3), decoder_blocks=(3, 6, 4, 3))
        realfake = DcganDiscriminator(3, width=128)
    assert full.bottleneck_channels == 2048 and [len(stage) for stage in full.encoder] == [3, 4, 6, 3]
    assert [stage[0].body[0].out_channels for stage in full.decoder[:4]] == [512, 256, 128, 64]
    assert [len(stage) for stage in full.decoder[:4]] == [3, 6, 4, 3]
    # 003's discriminators: 4 stride-2 layers of 128 -> 1024 channels (64 -> 4 pixels), then one logit
    assert convolution_channels(realfake) == [(3, 128), (128, 256), (256, 512), (512, 1024), (1024, 1)]
    assert realfake.logit.kernel_size == (4, 4)
    assert DcganDiscriminator(6, width=8, image_size=128)(torch.zeros(2, 6, 128, 128)).shape == (2,)


def test_unassociated_draws_never_share_the_product():
    codes = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    anchors = torch.arange(8).repeat(50)
    drawn = draw_unassociated(codes, anchors, torch.Generator().manual_seed(0))
    assert (codes[drawn] != codes[anchors]).all()
    # uniform over the other products' rows: anchor 0 (product 0) sees each of rows 2..7, never 0 or 1
    seen = torch.bincount(drawn[anchors == 0], minlength=8)
    assert seen[:2].sum() == 0 and (seen[2:] > 0).all()
    assert torch.equal(drawn, draw_unassociated(codes, anchors, torch.Generator().manual_seed(0)))
    assert not torch.equal(drawn, draw_unassociated(codes, anchors, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="same product"):
        draw_unassociated(torch.zeros(4, dtype=torch.long), torch.arange(4), torch.Generator())
    # product ids, not rows, decide what is associated: two pairs of one product share a code
    table = pd.DataFrame({"pair_id": ["a", "b", "c"], "product_id": ["p1", "p2", "p1"]})
    assert product_codes_of(table).tolist() == [0, 1, 0]


def test_association_pairs_label_only_own_products_positive():
    photo, product = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), 2.0)
    generated, other = torch.full((2, 3, 4, 4), 3.0), torch.full((2, 3, 4, 4), 4.0)
    pairs, targets = association_pairs(photo, product, generated, other)
    assert pairs.shape == (6, 6, 4, 4) and targets.tolist() == [1, 1, 0, 0, 0, 0]
    assert (pairs[:, :3] == 1).all()  # the photo is always the first half
    assert pairs[:, 3, 0, 0].tolist() == [2, 2, 3, 3, 4, 4]


# ---- one optimisation step ------------------------------------------------------------------------


def adam(module, lr=2e-4):
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))


def test_pix2pix_step_lowers_discriminator_and_generator_losses():
    torch.manual_seed(0)
    photo, product = paired_batch()
    generator = init_gan_weights(UNetGenerator(levels=6, width=8, dropout=0.0)).train()
    discriminator = init_gan_weights(PatchDiscriminator(6, width=8)).train()
    generated_before = generator(photo).detach()
    losses = pix2pix_step(generator, discriminator, adam(generator), adam(discriminator), photo, product)
    assert set(losses) == {"d", "g", "g_adv", "g_l1"}
    # D after its step, on the same fakes; G after its step, against the same (updated) D
    assert pix2pix_discriminator_loss(discriminator, photo, product, generated_before).item() < losses["d"]
    g_after, parts = pix2pix_generator_loss(discriminator, photo, product, generator(photo))
    assert g_after.item() < losses["g"] and parts["g_l1"] < losses["g_l1"]


def test_dtgan_step_lowers_both_discriminator_losses_and_the_generator_loss():
    torch.manual_seed(0)
    photo, product = paired_batch()
    unassociated = product.roll(1, dims=0)
    generator = init_gan_weights(ResidualGenerator(stem_width=4)).train()
    realfake = init_gan_weights(DcganDiscriminator(3, width=8)).train()
    association = init_gan_weights(DcganDiscriminator(6, width=8)).train()
    optimizers = {"g": adam(generator), "d_rf": adam(realfake), "d_assoc": adam(association)}
    generated_before = generator(photo).detach()
    losses = dtgan_step(generator, realfake, association, optimizers, photo, product, unassociated)
    assert set(losses) == {"d_rf", "d_assoc", "g", "g_rf", "g_assoc"}
    assert realfake_discriminator_loss(realfake, product, generated_before).item() < losses["d_rf"]
    assert (
        association_discriminator_loss(association, photo, product, generated_before, unassociated).item()
        < losses["d_assoc"]
    )
    g_after, _ = dtgan_generator_loss(realfake, association, photo, generator(photo))
    assert g_after.item() < losses["g"]


# ---- proxies: registry, training, checkpoints ------------------------------------------------------


@pytest.mark.parametrize("name", ["pix2pix", "dtgan"])
def test_proxy_contract(name):
    assert name in list_proxies()
    proxy = create_proxy(name, **TINY[name]).eval()
    assert proxy.trainable
    images = torch.rand(3, 3, 96, 72, generator=torch.Generator().manual_seed(0))
    out = proxy(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(torch.cat([proxy(images[i : i + 1]) for i in range(3)]), out, atol=1e-5)
    # an untrained proxy is built from a fixed seed: two instances agree (same fingerprint, same cache key)
    assert create_proxy(name, **TINY[name]).fingerprint() == proxy.fingerprint()
    with pytest.raises(ValueError, match="image_size"):
        create_proxy(name, image_size=96)


@pytest.mark.parametrize("name", ["pix2pix", "dtgan"])
def test_train_on_checkpoint_round_trip(name, synthetic_root, tmp_path):
    dataset = load_viton(synthetic_root, split="val")
    proxy = create_proxy(name, **TINY[name])
    untrained = proxy.fingerprint()
    options = dict(epochs=1, batch_size=4, max_pairs=8, d_width=8, sample_every=1, seed=0, progress=False)
    final = proxy.train_on(dataset, tmp_path / name, **options)
    assert final == tmp_path / name / "final.pt" and final.exists()
    assert (tmp_path / name / "pairs_64.pt").exists() and (tmp_path / name / "losses.png").exists()
    assert sorted(p.name for p in (tmp_path / name / "samples").glob("*.png")) == ["step_000001.png", "step_000002.png"]
    with open(tmp_path / name / "losses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(rows[0][k]) > 0 for k in rows[0] if k.startswith(("d", "g")))
    assert proxy.fingerprint() != untrained

    loaded = create_proxy(f"{name}@{final}", **TINY[name]).eval()
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(images), proxy.eval()(images))
    assert loaded.fingerprint() == proxy.fingerprint()
    # the same call again resumes from last.pt, finds the epoch done and trains nothing more
    again = create_proxy(name, **TINY[name]).train_on(dataset, tmp_path / name, **options)
    with open(tmp_path / name / "losses.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert create_proxy(f"{name}@{again}", **TINY[name]).fingerprint() == proxy.fingerprint()
    # a checkpoint of another config is refused with a message naming it
    other = {"pix2pix": {"width": 16}, "dtgan": {"stem_width": 8}}[name]
    with pytest.raises(ValueError, match="another config"):
        create_proxy(f"{name}@{final}", **other)


@pytest.mark.parametrize("name", ["pix2pix", "dtgan"])
def test_train_on_a_pair_archive_without_the_photos(name, synthetic_root, tmp_path):
    from generation.training.pairs import prepare_pair_tensors, save_pair_archive

    dataset = load_viton(synthetic_root, split="val")
    archive = save_pair_archive(prepare_pair_tensors(dataset.train, None, (64, 64)), tmp_path / "pairs.npz")
    options = dict(epochs=1, batch_size=4, max_pairs=8, d_width=8, sample_every=100, seed=0, progress=False)
    final = create_proxy(name, **TINY[name]).train_on(None, tmp_path / name, pairs=str(archive), **options)
    payload = torch.load(final, weights_only=True)
    assert payload["steps"] == 2 and not (tmp_path / name / "pairs_64.pt").exists()


def test_identical_image_codes_group_equal_pixels():
    from generation.training.gan import identical_image_codes

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[1] = 7
    images[3] = 7
    codes = identical_image_codes(images)
    assert codes[0] == codes[2] and codes[1] == codes[3] and codes[0] != codes[1]
