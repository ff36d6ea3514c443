"""CycleGAN proxies (vanilla, Long, Nest; 001_*.txt chapter 8): networks, losses, unpaired batches, training."""

import csv

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from generation.cyclegan import ResidualBlock, ResnetGenerator, cyclegan_discriminator
from generation.pix2pix import patch_receptive_field
from generation.proxies import create_proxy, list_proxies
from generation.training.cyclegan import (
    CycleLossWeights,
    CycleNetworks,
    ImagePool,
    chain_outputs,
    cycle_loss,
    cyclegan_generator_loss,
    cyclegan_step,
    reconstructions,
    similarity_loss,
    unpaired_batches,
    unpaired_sampler,
)
from generation.training.pairs import GanTrainer
from retrieval.datasets import load_viton
from retrieval.training import TrainingRun

NAMES = ["cyclegan", "cyclegan-long", "cyclegan-nest"]
TINY = {"image_size": 32, "width": 4, "n_blocks": 1}
TINY_TRAINING = dict(
    epochs=2,
    batch_size=4,
    max_pairs=8,
    d_width=4,
    pool_size=4,
    sample_every=2,
    seed=0,
    progress=False,
    checkpoint_every_s=0.0,  # last.pt after every step: the interrupted run below resumes where it stopped
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only spins on this shared CPU (see test_baselines.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def convolutions(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


class Add(nn.Module):
    """A stand-in generator that adds a constant: which generators a cycle ran through shows in its output."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


class Constant(nn.Module):
    """A stand-in discriminator with a fixed logit everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0], 1, 2, 2), self.value)


def nets_of(ab, ba, d_value=0.0):
    pools = ImagePool(0, (3, 4, 4)), ImagePool(0, (3, 4, 4))
    return CycleNetworks(nn.Sequential(*ab), nn.Sequential(*ba), Constant(d_value), Constant(d_value), *pools)


# ---- networks -------------------------------------------------------------------------------------


def test_resnet_generator_follows_chapter_8():
    generator = ResnetGenerator(width=8, n_blocks=3).eval()
    convs = convolutions(generator.encoder)
    # encoder: 7x7 stride 1, then two 3x3 stride 2; decoder: two stride-1/2 (transposed) convs, a 7x7 output conv
    assert [(c.kernel_size, c.stride) for c in convs] == [((7, 7), (1, 1)), ((3, 3), (2, 2)), ((3, 3), (2, 2))]
    decoder = convolutions(generator.decoder)
    assert [type(c) for c in decoder] == [nn.ConvTranspose2d, nn.ConvTranspose2d, nn.Conv2d]
    assert decoder[-1].kernel_size == (7, 7) and decoder[-1].out_channels == 3
    assert isinstance(generator.decoder[-1][-1], nn.Tanh)
    assert len(generator.blocks) == 3 and all(isinstance(b, ResidualBlock) for b in generator.blocks)
    # instance normalisation after every convolution but the output one, never BatchNorm
    norms = [m for m in generator.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == len(convolutions(generator)) - 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in generator.modules())
    for side in (32, 64):
        out = generator(torch.rand(2, 3, side, side) * 2 - 1)
        assert out.shape == (2, 3, side, side) and out.abs().max() <= 1
    assert generator.blocks(torch.zeros(1, 32, 8, 8)).shape == (1, 32, 8, 8)  # 4w channels at a quarter size
    with pytest.raises(ValueError, match="divisible by 4"):
        generator(torch.zeros(1, 3, 30, 30))
    # a residual block adds to its input: zero weights make it the identity
    block = ResidualBlock(4)
    nn.init.zeros_(block.body[1][0].weight)
    x = torch.rand(1, 4, 8, 8)
    assert torch.allclose(block(x), x)


def test_discriminator_has_four_convolutions_and_a_one_channel_patch_map():
    discriminator = cyclegan_discriminator(width=8).eval()
    convs = convolutions(discriminator)
    assert len(convs) == 4 and convs[-1].out_channels == 1
    assert [c.out_channels for c in convs] == [8, 16, 32, 1]
    assert discriminator(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 14, 14)
    assert discriminator(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert any(isinstance(m, nn.InstanceNorm2d) for m in discriminator.modules())
    # two stride-2 and two stride-1 4x4 convolutions: each logit's patch is 34x34 (through its convolutions;
    # instance normalisation then mixes in the image's statistics)
    assert patch_receptive_field(2) == 34


# ---- losses ---------------------------------------------------------------------------------------


def test_cycle_loss_of_identity_generators_is_zero():
    a = torch.rand(2, 3, 4, 4)
    for length, nested in ((1, False), (2, False), (2, True)):
        ab = chain_outputs(nn.Sequential(*[nn.Identity()] * length), a)
        back = reconstructions(nn.Sequential(*[nn.Identity()] * length), ab, nested)
        assert len(back) == (length if nested else 1)
        assert cycle_loss(back, a).item() == 0.0
    # and the L1 mean otherwise: a reconstruction off by 0.25 everywhere, twice (two cycles)
    assert cycle_loss([a + 0.25, a - 0.25], a).item() == pytest.approx(0.5)


def test_nest_cycles_run_through_the_generators_of_eq_8_7_to_8_9():
    ab, ba = nn.Sequential(Add(1), Add(10)), nn.Sequential(Add(100), Add(1000))
    a = torch.zeros(1, 3, 2, 2)
    forward = chain_outputs(ab, a)
    assert [x.flatten()[0].item() for x in forward] == [1, 11]
    # inner cycle m=1: G_AB^1 then G_BA^2; m=2 (the outer cycle): G_AB^1, G_AB^2, G_BA^1, G_BA^2
    assert [x.flatten()[0].item() for x in reconstructions(ba, forward, nested=True)] == [1001, 1111]
    assert [x.flatten()[0].item() for x in reconstructions(ba, forward, nested=False)] == [1111]
    # domain B: n=1: G_BA^1 then G_AB^2; n=2: G_BA^1, G_BA^2, G_AB^1, G_AB^2
    assert [x.flatten()[0].item() for x in reconstructions(ab, chain_outputs(ba, a), nested=True)] == [110, 1111]
    with pytest.raises(ValueError, match="M <= N"):
        reconstructions(nn.Sequential(Add(1)), forward, nested=True)


def test_similarity_loss_is_zero_for_equal_images_and_the_l1_mean_otherwise():
    x = torch.rand(2, 3, 4, 4)
    assert similarity_loss(x, x.clone()).item() == 0.0
    assert similarity_loss(x, x + 0.3).item() == pytest.approx(0.3)
    assert similarity_loss(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)).item() == 1.0


def test_generator_objective_by_hand():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    # identity chains: no cycle loss; D says 0 everywhere: LSGAN's (0 - 1)^2 = 1 per domain
    nets = nets_of([nn.Identity()] * 2, [nn.Identity()] * 2, d_value=0.0)
    ab, ba = chain_outputs(nets.ab, a), chain_outputs(nets.ba, b)
    total, parts = cyclegan_generator_loss(nets, a, b, ab, ba, CycleLossWeights(cycle=10.0))
    assert total.item() == 2.0 and parts["g_cycle_a"] == 0.0 and "g_sim" not in parts
    # Nest adds L_Sim = |G_AB^1(a) - G_BA^1(b)| = |0 - 0.5| with weight 2
    total, parts = cyclegan_generator_loss(nets, a, b, ab, ba, CycleLossWeights(nested=True, similarity=2.0))
    assert parts["g_sim"] == 0.5 and total.item() == pytest.approx(3.0)
    # a chain that is off by 0.1 on the way there and back: lambda * (cycle_a + cycle_b), 2 cycles each for Nest
    nets = nets_of([Add(0.05), nn.Identity()], [nn.Identity(), Add(0.05)], d_value=1.0)  # D fooled: adv 0
    ab, ba = chain_outputs(nets.ab, a), chain_outputs(nets.ba, b)
    outer, _ = cyclegan_generator_loss(nets, a, b, ab, ba, CycleLossWeights(cycle=10.0))
    assert outer.item() == pytest.approx(10 * (0.1 + 0.1))
    weights = CycleLossWeights(cycle=10.0, nested=True, similarity=1.0)
    nested, parts = cyclegan_generator_loss(nets, a, b, ab, ba, weights)
    # a: m=1 G_BA^2(G_AB^1(a)) = a + 0.1, m=2 a + 0.1; b: n=1 G_AB^2(G_BA^1(b)) = b, n=2 b + 0.1
    assert parts["g_cycle_a"] == pytest.approx(0.2) and parts["g_cycle_b"] == pytest.approx(0.1)
    # L_Sim = |G_AB^1(a) - G_BA^1(b)| = |0.05 - 0.5|
    assert parts["g_sim"] == pytest.approx(0.45) and nested.item() == pytest.approx(10 * 0.3 + 0.45)


def test_image_pool_fills_then_swaps_half_the_time():
    pool = ImagePool(3, (1, 1, 1))
    first = pool.query(torch.arange(3.0).view(3, 1, 1, 1), torch.Generator().manual_seed(0))
    assert first.flatten().tolist() == [0, 1, 2] and int(pool.count) == 3
    returned = pool.query(torch.full((400, 1, 1, 1), 9.0), torch.Generator().manual_seed(0)).flatten()
    old = (returned != 9).sum().item()
    assert 0 < old < 400 and set(returned.tolist()) <= {0.0, 1.0, 2.0, 9.0}
    assert (pool.images == 9).all()  # every stored image got swapped out at some point
    assert "images" in pool.state_dict() and "count" in pool.state_dict()  # kept in last.pt
    passthrough = torch.rand(2, 3, 4, 4)
    assert torch.equal(ImagePool(0, (3, 4, 4)).query(passthrough, torch.Generator()), passthrough)


def test_cyclegan_step_lowers_the_cycle_and_discriminator_losses():
    torch.manual_seed(0)
    side, width = 32, 4
    nets = CycleNetworks(
        nn.Sequential(ResnetGenerator(width, 1)),
        nn.Sequential(ResnetGenerator(width, 1)),
        cyclegan_discriminator(width),
        cyclegan_discriminator(width),
        ImagePool(0, (3, side, side)),
        ImagePool(0, (3, side, side)),
    )
    adam = dict(lr=1e-3, betas=(0.5, 0.999))
    optimizers = {
        "g": torch.optim.Adam([*nets.ab.parameters(), *nets.ba.parameters()], **adam),
        "d": torch.optim.Adam([*nets.d_a.parameters(), *nets.d_b.parameters()], **adam),
    }
    a, b = torch.rand(4, 3, side, side) * 2 - 1, torch.rand(4, 3, side, side) * 2 - 1
    weights = CycleLossWeights(nested=True, similarity=1.0)
    losses = cyclegan_step(nets, optimizers, a, b, weights, torch.Generator())
    assert set(losses) == {"g", "g_adv_a", "g_adv_b", "g_cycle_a", "g_cycle_b", "g_sim", "d_a", "d_b"}
    with torch.no_grad():
        _, after = cyclegan_generator_loss(nets, a, b, chain_outputs(nets.ab, a), chain_outputs(nets.ba, b), weights)
        fake_b = chain_outputs(nets.ab, a)[-1]
        from generation.gan import discriminator_loss

        d_b_after = discriminator_loss(nets.d_b(b), nets.d_b(fake_b), "lsgan").item()
    assert after["g_cycle_a"] + after["g_cycle_b"] < losses["g_cycle_a"] + losses["g_cycle_b"]
    assert d_b_after < losses["d_b"]


# ---- unpaired batches -----------------------------------------------------------------------------


def matched_pairs_in(batches, codes):
    """How many (person, product) pairs of the same product share a batch: the check the sampler must pass."""
    count = 0
    for batch in batches:
        persons, products = (batch, batch) if isinstance(batch, torch.Tensor) else (batch["person"], batch["product"])
        worn = set(codes[persons].tolist())
        count += sum(int(code) in worn for code in codes[products].tolist())
    return count


def test_unpaired_batches_never_hold_a_matched_pair():
    # 60 rows of 20 products (each worn by 3 persons), in a shuffled order; batches of 8 (7 full + a tail of 4)
    codes = torch.arange(60).remainder(20)[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    seen_pairs = set()
    for seed in range(3):
        sampler = unpaired_sampler(codes, 8, seed)
        for epoch in range(20):
            batches = sampler(epoch)
            assert len(batches) == 7 and all(len(b["person"]) == len(b["product"]) == 8 for b in batches)
            assert matched_pairs_in(batches, codes) == 0
            for domain in ("person", "product"):  # every row at most once per epoch in each domain
                rows = torch.cat([b[domain] for b in batches])
                assert len(rows.unique()) == len(rows)
            seen_pairs.update((int(p), int(q)) for b in batches for p, q in zip(b["person"], b["product"]))
            assert batches[0]["person"].tolist() == sampler(epoch)[0]["person"].tolist()  # resumable
    # the two streams are independent: a person meets many different products over the epochs
    assert len(seen_pairs) > 1000
    # the check is real: the paired order of pix2pix and unpaired=False fails it at once
    trainer = GanTrainer.__new__(GanTrainer)
    trainer.seed = 0
    assert matched_pairs_in(trainer.shuffled_batches(60, 8, 0), codes) >= 56
    # and so do independent shuffles without the repair (batches of 8 among 20 products collide)
    generator = torch.Generator().manual_seed(0)
    naive = [
        {"person": torch.randperm(60, generator=generator)[:8], "product": torch.randperm(60, generator=generator)[:8]}
        for _ in range(50)
    ]
    assert matched_pairs_in(naive, codes) > 0
    with pytest.raises(ValueError, match="lower batch_size"):
        unpaired_batches(torch.zeros(8, dtype=torch.long), 4, torch.Generator())


def test_unpaired_training_loop_never_sees_a_matched_pair(tmp_path):
    """Through GanTrainer as the trainer drives it: the batches the step receives, over epochs."""
    codes = torch.arange(24).remainder(6)
    data = {
        "person": torch.zeros(24, 3, 2, 2, dtype=torch.uint8),
        "product": torch.zeros(24, 3, 2, 2, dtype=torch.uint8),
    }
    seen = []

    def step(batch, generator):
        seen.append({"person": batch["index_person"], "product": batch["index_product"]})
        return {"loss": 0.0}

    probe = nn.Linear(1, 1)  # the trainer checkpoints modules and optimisers
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.1)
    trainer = GanTrainer(tmp_path / "run", {"probe": probe}, {"probe": optimizer}, {}, progress=None, sample_every=0)
    trainer.train(data, epochs=5, batch_size=4, step=step, sampler=unpaired_sampler(codes, 4, 0))
    assert len(seen) == 30 and matched_pairs_in(seen, codes) == 0


# ---- proxies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_proxy_contract(name):
    assert name in list_proxies()
    proxy = create_proxy(name, **TINY).eval()
    assert proxy.trainable and len(proxy.generator) == (1 if name == "cyclegan" else 2)
    images = torch.rand(3, 3, 96, 72, generator=torch.Generator().manual_seed(0))
    out = proxy(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(torch.cat([proxy(images[i : i + 1]) for i in range(3)]), out, atol=1e-5)
    assert create_proxy(name, **TINY).fingerprint() == proxy.fingerprint()
    # the proxy is the whole A -> B cascade
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        expected = x
        for generator in proxy.generator:
            expected = generator(expected)
        assert torch.equal(proxy.generator(x), expected)
    with pytest.raises(ValueError, match="image_size"):
        create_proxy(name, image_size=48)
    if name != "cyclegan":
        with pytest.raises(ValueError, match="generators"):
            create_proxy(name, generators=0, **TINY)


@pytest.mark.parametrize("name", NAMES)
def test_train_resume_and_load(name, synthetic_root, tmp_path, monkeypatch):
    dataset = load_viton(synthetic_root, split="val")
    proxy = create_proxy(name, **TINY)
    final = proxy.train_on(dataset, tmp_path / "run", **TINY_TRAINING)
    assert final == tmp_path / "run" / "final.pt" and (tmp_path / "run" / "last.pt").exists()
    with open(tmp_path / "run" / "losses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[-1]["g"]) < float(rows[0]["g"])
    assert ("g_sim" in rows[0]) == (name == "cyclegan-nest")
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))[-1] == "step_000004.png"
    # NAME@final.pt builds the architecture it was trained with (what a bench grid hands on); a contradicting
    # option is refused
    loaded = create_proxy(f"{name}@{final}").eval()
    assert loaded.conf == proxy.conf
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(images), proxy.eval()(images))
    with pytest.raises(ValueError, match="another config"):
        create_proxy(f"{name}@{final}", width=8)
    # the same call again finds the run finished in last.pt and trains nothing more
    create_proxy(name, **TINY).train_on(dataset, tmp_path / "run", **TINY_TRAINING)
    with open(tmp_path / "run" / "losses.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    if name != "cyclegan-nest":
        return  # the exact resume below holds for all three; Nest's run has every piece (pools, chains, L_Sim)
    # interrupted in the middle of the second epoch, then resumed from last.pt (networks, optimisers, image
    # pools, the unpaired batches still to come): the same weights as the straight run
    original_log = TrainingRun.log

    def log_then_interrupt(self, losses):
        original_log(self, losses)
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "log", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        create_proxy(name, **TINY).train_on(dataset, tmp_path / "cut", **TINY_TRAINING)
    monkeypatch.setattr(TrainingRun, "log", original_log)
    assert not (tmp_path / "cut" / "final.pt").exists()
    resumed = create_proxy(name, **TINY).train_on(dataset, tmp_path / "cut", **TINY_TRAINING)
    with open(tmp_path / "cut" / "losses.csv") as handle:
        assert [row["g"] for row in csv.DictReader(handle)] == [row["g"] for row in rows]
    assert create_proxy(f"{name}@{resumed}", **TINY).fingerprint() == proxy.fingerprint()


def test_paired_training_and_the_cli(synthetic_root, tmp_path):
    from street2shop.cli import cli

    dataset = load_viton(synthetic_root, split="val")
    final = create_proxy("cyclegan", **TINY).train_on(dataset, tmp_path / "paired", unpaired=False, **TINY_TRAINING)
    assert final.exists()
    settings = [f"{k}={v}" for k, v in {**TINY, "max_pairs": 8, "d_width": 4, "pool_size": 2}.items()]
    result = CliRunner().invoke(
        cli,
        ["train", "cyclegan-nest", "--dataset", f"viton:{synthetic_root}", "--out", str(tmp_path / "cli")]
        + ["--epochs", "1", "--batch-size", "4", "--device", "cpu"]
        + [arg for setting in settings for arg in ("--set", setting)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "use it as: --proxies cyclegan-nest@" in result.output
    assert create_proxy(f"cyclegan-nest@{tmp_path / 'cli' / 'final.pt'}", **TINY)


@pytest.mark.slow
def test_bench_trains_the_cyclegans_and_scores_their_generation(synthetic_root, tmp_path):
    """`bench --train` trains all three unpaired from scratch behind a descriptor; `bench-generation` scores them."""
    from street2shop.cli import cli

    tiny = "image_size=32;width=4;n_blocks=1;d_width=4;pool_size=2;max_pairs=8;epochs=1;batch_size=4;sample_every=0"
    specs = ",".join(f"{name}[{tiny}]" for name in NAMES)
    common = ["--dataset", f"viton:{synthetic_root}", "--cache-dir", str(tmp_path / "cache")]
    bench = CliRunner().invoke(
        cli,
        ["bench", *common, "--descriptors", "colorhist", "--proxies", f"none,{specs}", "--k", "1,5"]
        + ["--bootstrap", "0", "--protocol-draws", "0", "--generation-samples", "0", "--rank-pictures", "0"]
        + ["--train", "--train-budget", "0.5", "--out", str(tmp_path / "bench")],
    )
    assert bench.exit_code == 0, bench.output
    checkpoints = sorted((tmp_path / "cache" / "checkpoints").glob("cyclegan*/final.pt"))
    assert [p.parent.name.rsplit("-", 1)[0] for p in checkpoints] == NAMES
    trained = [f"{name}@{path}" for name, path in zip(NAMES, checkpoints)]
    generation = CliRunner().invoke(
        cli,
        ["bench-generation", *common, "--proxies", ",".join(trained), "--samples", "4", "--no-inception"]
        + ["--out", str(tmp_path / "generation")],
    )
    assert generation.exit_code == 0, generation.output
    table = (tmp_path / "generation" / "generation.csv").read_text()
    assert all(f"{name}@" in table for name in NAMES), table
