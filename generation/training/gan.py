"""Training of the two "one generator from the person photo" baselines, pix2pix and DTGAN.

Both train the same way (`train_generator_proxy`): the training pairs resized once to image_size x
image_size uint8 tensors and cached in ``out_dir/pairs_<size>.pt`` (`generation.training.pairs`), or read
from a pair archive, then `GanTrainer`'s epochs: last.pt (resume: run the same call again), final.pt (the
generator's weights), losses.csv/png, and sample grids (photo | generated | ground truth) in
``out_dir/samples/``. Only their GANs differ (`pix2pix_setup`, `dtgan_setup`: discriminators, optimisers,
the step), as the papers describe them (see `generation.pix2pix` and `generation.dtgan`).

Example:
    >>> from generation.proxies import create_proxy
    >>> from retrieval.datasets import load_dataset
    >>> proxy = create_proxy("pix2pix")
    >>> final = proxy.train_on(load_dataset("viton:../shared/data/viton"), "runs/pix2pix", epochs=1)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from generation.dtgan import DcganDiscriminator
from generation.gan import (
    GAN_MODES,
    adversarial_loss,
    discriminator_loss,
    from_gan_range,
    generator_loss,
    init_gan_weights,
    set_requires_grad,
    uint8_to_gan,
)
from generation.generator_proxy import GeneratorProxy
from generation.pix2pix import PatchDiscriminator
from generation.training.pairs import (
    GanTrainer,
    SamplerFn,
    StepFn,
    load_pair_archive,
    prepare_pair_tensors,
    require_parse_maps,
)
from retrieval.training import TrainingJob, register_trainer

# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GanLoopConfig:
    """The options of `train_generator_proxy`'s loop that every generator proxy's GAN shares (pix2pix's values).

    Attributes:
        epochs, batch_size: passes over the pairs, and pairs per step.
        lr, beta1, beta2: Adam, for every network (pix2pix and 003: 2e-4, (0.5, 0.999)).
        gan_mode: the adversarial loss, one of `generation.gan.GAN_MODES`.
        d_width: channels of the discriminators' first layer (pix2pix's PatchGAN: 64).
        sample_every: write a sample grid every this many steps (and at the end); 0 = never.
        max_pairs: train on the first this many pairs only; None = all.
        pairs: a pair archive (`street2shop export-pairs`) to train on instead of the data set's photos.
        checkpoint_every_s: seconds between two writes of last.pt.
    """

    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    gan_mode: str = "bce"
    d_width: int = 64
    sample_every: int = 100
    max_pairs: Optional[int] = None
    pairs: Optional[str] = None
    checkpoint_every_s: float = 120.0

    def __post_init__(self) -> None:
        if self.gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {self.gan_mode!r}")


@dataclass(frozen=True)
class GeneratorTrainConfig(GanLoopConfig):
    """Training options of a `GeneratorProxy` trained on pairs: `GanLoopConfig` plus a pixel loss; not part
    of the proxy's conf or fingerprint.

    Attributes:
        l1_weight: weight of the L1 pixel loss (pix2pix: 100).
    """

    l1_weight: float = 100.0


@dataclass(frozen=True)
class Pix2PixTrainConfig(GeneratorTrainConfig):
    """pix2pix's training options: `GeneratorTrainConfig` as it stands (70x70 PatchGAN, 100 * L1)."""


@dataclass(frozen=True)
class DTGANTrainConfig(GeneratorTrainConfig):
    """DTGAN's training options: `GeneratorTrainConfig` with 003's choices where they differ."""

    epochs: int = 3
    d_width: int = 32  # discriminators' first layer (003: 128)
    l1_weight: float = 0.0  # 003 and Yoo et al. train without a pixel loss


# --------------------------------------------------------------------------------------------------
# pix2pix: losses and the optimisation step
# --------------------------------------------------------------------------------------------------


def pix2pix_discriminator_loss(
    discriminator: nn.Module, photo: torch.Tensor, product: torch.Tensor, generated: torch.Tensor, mode: str = "bce"
) -> torch.Tensor:
    """The conditional discriminator's loss: (photo, product) real, (photo, generated) fake, halved.

    Shape:
        - photo, product, generated: (B, 3, H, W) in [-1, 1]; `generated` is detached here.
        - Output: scalar.
    """
    real = discriminator(torch.cat([photo, product], dim=1))
    fake = discriminator(torch.cat([photo, generated.detach()], dim=1))
    return discriminator_loss(real, fake, mode)


def pix2pix_generator_loss(
    discriminator: nn.Module,
    photo: torch.Tensor,
    product: torch.Tensor,
    generated: torch.Tensor,
    l1_weight: float = 100.0,
    mode: str = "bce",
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """L_cGAN(G) + l1_weight * ||product - generated||_1 (mean absolute error in the [-1, 1] range).

    Returns:
        (total loss, {"g_adv": ..., "g_l1": ...}).
    """
    adversarial = generator_loss(discriminator(torch.cat([photo, generated], dim=1)), mode)
    l1 = (generated - product).abs().mean()
    return adversarial + l1_weight * l1, {"g_adv": adversarial.item(), "g_l1": l1.item()}


def pix2pix_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    photo: torch.Tensor,
    product: torch.Tensor,
    l1_weight: float = 100.0,
    mode: str = "bce",
) -> Dict[str, float]:
    """One pix2pix iteration: a discriminator step on the current fakes, then a generator step.

    Returns:
        the losses before the updates: "d" (discriminator), "g" (generator total), "g_adv", "g_l1".
    """
    generated = generator(photo)
    set_requires_grad(discriminator, True)
    loss_d = pix2pix_discriminator_loss(discriminator, photo, product, generated, mode)
    optimizer_d.zero_grad(set_to_none=True)
    loss_d.backward()
    optimizer_d.step()

    set_requires_grad(discriminator, False)  # the generator step must not accumulate D's gradients
    loss_g, parts = pix2pix_generator_loss(discriminator, photo, product, generated, l1_weight, mode)
    optimizer_g.zero_grad(set_to_none=True)
    loss_g.backward()
    optimizer_g.step()
    set_requires_grad(discriminator, True)
    return {"d": loss_d.item(), "g": loss_g.item(), **parts}


# --------------------------------------------------------------------------------------------------
# DTGAN: association pairs, losses and the optimisation step
# --------------------------------------------------------------------------------------------------


def draw_unassociated(product_codes: torch.Tensor, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each anchor row, a uniformly drawn row whose product differs: the source of unassociated pairs.

    Args:
        product_codes: (N,) int64 product id of every training row (equal codes = the same product).
        anchors: (B,) int64 rows of the batch.
        generator: a CPU torch.Generator (the draw is reproducible, resumes exactly).

    Returns:
        (B,) int64 rows j with product_codes[j] != product_codes[anchors[i]].

    Raises:
        ValueError: an anchor's product is the only product of the data.

    Example:
        >>> draw_unassociated(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), torch.Generator().manual_seed(0))
        tensor([2, 1])
    """
    product_codes, anchors = product_codes.cpu(), anchors.cpu()
    others = product_codes[None, :] != product_codes[anchors][:, None]  # (B, N)
    counts = others.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("every training pair shows the same product: there is no unassociated product to draw")
    # The r-th (0-based) row of each anchor's candidates, r uniform in [0, count): the first column where
    # the running count of candidates exceeds r.
    rank = (torch.rand(len(anchors), generator=generator) * counts).long().clamp_max(counts - 1)
    return (others.cumsum(dim=1) > rank[:, None]).long().argmax(dim=1)


def association_pairs(
    photo: torch.Tensor, product: torch.Tensor, generated: torch.Tensor, unassociated: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The association discriminator's batch: (photo, own product) positive; (photo, generated) and
    (photo, another pair's product) negative.

    Shape:
        - photo, product, generated, unassociated: (B, 3, H, W).
        - Output: pairs (3B, 6, H, W) and targets (3B,) float: B ones, then 2B zeros.
    """
    pairs = torch.cat(
        [
            torch.cat([photo, product], dim=1),
            torch.cat([photo, generated], dim=1),
            torch.cat([photo, unassociated], dim=1),
        ]
    )
    targets = torch.cat([torch.ones(len(photo)), torch.zeros(2 * len(photo))]).to(photo.device)
    return pairs, targets


def association_discriminator_loss(
    discriminator: nn.Module,
    photo: torch.Tensor,
    product: torch.Tensor,
    generated: torch.Tensor,
    unassociated: torch.Tensor,
    mode: str = "bce",
) -> torch.Tensor:
    """Mean of the three kinds' losses (associated real, generated, unassociated real), weighted equally."""
    pairs, _ = association_pairs(photo, product, generated.detach(), unassociated)
    logits = discriminator(pairs).chunk(3)
    return (
        adversarial_loss(logits[0], True, mode)
        + adversarial_loss(logits[1], False, mode)
        + adversarial_loss(logits[2], False, mode)
    ) / 3.0


def realfake_discriminator_loss(
    discriminator: nn.Module, product: torch.Tensor, generated: torch.Tensor, mode: str = "bce"
) -> torch.Tensor:
    """Real products true, generated ones false, averaged: 003's L(D_D)."""
    real = discriminator(product)
    fake = discriminator(generated.detach())
    return 0.5 * (adversarial_loss(real, True, mode) + adversarial_loss(fake, False, mode))


def dtgan_generator_loss(
    realfake: nn.Module,
    association: nn.Module,
    photo: torch.Tensor,
    generated: torch.Tensor,
    mode: str = "bce",
    realfake_weight: float = 0.5,
    association_weight: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """003's compound generator loss: 1/2 (fool D_rf) + 1/2 (fool D_A on (photo, generated)), non-saturating.

    Returns:
        (total, {"g_rf": ..., "g_assoc": ...}).
    """
    rf = generator_loss(realfake(generated), mode)
    assoc = generator_loss(association(torch.cat([photo, generated], dim=1)), mode)
    return realfake_weight * rf + association_weight * assoc, {"g_rf": rf.item(), "g_assoc": assoc.item()}


def dtgan_step(
    generator: nn.Module,
    realfake: nn.Module,
    association: nn.Module,
    optimizers: Dict[str, torch.optim.Optimizer],
    photo: torch.Tensor,
    product: torch.Tensor,
    unassociated: torch.Tensor,
    mode: str = "bce",
    l1_weight: float = 0.0,
) -> Dict[str, float]:
    """003's Algorithm 1 on one mini-batch: update D_rf, then D_A, then G.

    Args:
        optimizers: {"g", "d_rf", "d_assoc"}.
        photo, product, unassociated: (B, 3, H, W) in [-1, 1]; `unassociated[i]` shows another product than photo i.
        l1_weight: an optional pixel loss (0 in 003 and Yoo et al.; an option, not the baseline).

    Returns:
        the losses before the updates: "d_rf", "d_assoc", "g" and its parts.
    """
    generated = generator(photo)
    set_requires_grad([realfake, association], True)
    loss_rf = realfake_discriminator_loss(realfake, product, generated, mode)
    optimizers["d_rf"].zero_grad(set_to_none=True)
    loss_rf.backward()
    optimizers["d_rf"].step()
    loss_assoc = association_discriminator_loss(association, photo, product, generated, unassociated, mode)
    optimizers["d_assoc"].zero_grad(set_to_none=True)
    loss_assoc.backward()
    optimizers["d_assoc"].step()

    set_requires_grad([realfake, association], False)
    loss_g, parts = dtgan_generator_loss(realfake, association, photo, generated, mode)
    if l1_weight > 0:
        l1 = (generated - product).abs().mean()
        loss_g = loss_g + l1_weight * l1
        parts["g_l1"] = l1.item()
    optimizers["g"].zero_grad(set_to_none=True)
    loss_g.backward()
    optimizers["g"].step()
    set_requires_grad([realfake, association], True)
    return {"d_rf": loss_rf.item(), "d_assoc": loss_assoc.item(), "g": loss_g.item(), **parts}


def product_codes_of(pairs: pd.DataFrame) -> torch.Tensor:
    """(N,) int64 codes of the pairs' product ids (pair ids when the table has no product_id column)."""
    column = pairs["product_id"] if "product_id" in pairs else pairs["pair_id"]
    codes, _ = pd.factorize(column.astype(str))
    return torch.from_numpy(np.asarray(codes, dtype=np.int64))


def identical_image_codes(images: torch.Tensor) -> torch.Tensor:
    """(N,) int64 codes of (N, C, H, W) images, equal exactly for identical images.

    A pair archive carries no product ids: two pairs show the same product when their product photos
    are the same pixels (one shop photo per product), so those are the codes it falls back on.
    """
    _, codes = torch.unique(images.reshape(images.shape[0], -1), dim=0, return_inverse=True)
    return codes.to(torch.int64)


# --------------------------------------------------------------------------------------------------
# The GANs
# --------------------------------------------------------------------------------------------------

# {"person", "product"}: uint8 (N, 3, S, S) tensors; and the training-pairs table they came from (None: an archive).
PairData = Mapping[str, torch.Tensor]
PairTable = Optional[pd.DataFrame]
# (modules, optimisers, step): a GAN ready to train, the discriminators beside the proxy's generator.
GanParts = Tuple[Dict[str, nn.Module], Dict[str, torch.optim.Optimizer], StepFn]
# (model, config, data, pairs) -> GanParts: the GAN of one kind of generator proxy.
Setup = Callable[[GeneratorProxy, GeneratorTrainConfig, PairData, PairTable], GanParts]
# (data, pairs, seed) -> each epoch's batches (`GanTrainer.train`'s sampler), or None for shuffled pairs.
SamplerSetup = Callable[[PairData, PairTable, int], Optional[SamplerFn]]


def pix2pix_setup(model: GeneratorProxy, config: GeneratorTrainConfig, data: PairData, pairs: PairTable) -> GanParts:
    """pix2pix's GAN: a PatchGAN on (photo, product) pairs, Adam for both networks, `pix2pix_step`."""
    discriminator = init_gan_weights(PatchDiscriminator(in_channels=6, width=int(config.d_width)))
    discriminator.to(next(model.generator.parameters()).device)
    betas = (float(config.beta1), float(config.beta2))
    optimizer_g = torch.optim.Adam(model.generator.parameters(), lr=float(config.lr), betas=betas)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=float(config.lr), betas=betas)
    l1_weight, mode = float(config.l1_weight), str(config.gan_mode)

    def step(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, float]:
        return pix2pix_step(
            model.generator,
            discriminator,
            optimizer_g,
            optimizer_d,
            batch["person"],
            batch["product"],
            l1_weight,
            mode,
        )

    return {"generator": model.generator, "discriminator": discriminator}, {"g": optimizer_g, "d": optimizer_d}, step


def dtgan_setup(model: GeneratorProxy, config: GeneratorTrainConfig, data: PairData, pairs: PairTable) -> GanParts:
    """DTGAN's GAN: real/fake and association discriminators, Adam for all three networks, `dtgan_step`.

    Unassociated products are drawn among the pairs of another product: product ids of the pairs table,
    or identical product photos for a pair archive (which carries no ids).
    """
    side, width = int(model.conf["image_size"]), int(config.d_width)
    device = next(model.generator.parameters()).device
    realfake = init_gan_weights(DcganDiscriminator(3, width, side)).to(device)
    association = init_gan_weights(DcganDiscriminator(6, width, side)).to(device)
    betas = (float(config.beta1), float(config.beta2))
    lr = float(config.lr)
    optimizers = {
        "g": torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas),
        "d_rf": torch.optim.Adam(realfake.parameters(), lr=lr, betas=betas),
        "d_assoc": torch.optim.Adam(association.parameters(), lr=lr, betas=betas),
    }
    products = data["product"]
    codes = product_codes_of(pairs) if pairs is not None else identical_image_codes(products)
    mode, l1_weight = str(config.gan_mode), float(config.l1_weight)

    def step(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, float]:
        # The trainer's per-step generator lives on the training device; the draw is made on the CPU.
        if generator.device.type != "cpu":
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator().manual_seed(seed)
        others = draw_unassociated(codes, batch["index"].cpu(), generator)
        unassociated = uint8_to_gan(products[others]).to(batch["person"].device)
        return dtgan_step(
            model.generator,
            realfake,
            association,
            optimizers,
            batch["person"],
            batch["product"],
            unassociated,
            mode,
            l1_weight,
        )

    modules = {"generator": model.generator, "realfake": realfake, "association": association}
    return modules, optimizers, step


# --------------------------------------------------------------------------------------------------
# The shared loop
# --------------------------------------------------------------------------------------------------


def sample_columns(generator: nn.Module, batch: Mapping[str, torch.Tensor]) -> List[Tuple[str, torch.Tensor]]:
    """Sample-grid columns: photo | generated | ground truth (generator in eval mode for the grid)."""
    was_training = generator.training
    generator.eval()
    generated = generator(batch["person"])
    generator.train(was_training)
    return [
        ("photo", from_gan_range(batch["person"])),
        ("generated", from_gan_range(generated)),
        ("ground truth", from_gan_range(batch["product"])),
    ]


def pair_tensors(
    model: GeneratorProxy, dataset, out_dir: Path, config: GanLoopConfig, progress: bool
) -> Tuple[PairData, PairTable]:
    """({"person", "product"} uint8 tensors at image_size, the pairs table or None for an archive).

    The data set's training pairs (VITON's need their parse maps: the shared preparation also cuts the
    segmented textures PaintNet trains on), cached in ``out_dir/pairs_<size>.pt``; or `config.pairs`, a
    `street2shop export-pairs` archive, when given (`dataset` may then be None).
    """
    side = model.check_image_size()
    limit = None if config.max_pairs is None else int(config.max_pairs)
    if config.pairs is not None:  # a pair archive (`street2shop export-pairs`) instead of the photos
        pairs = None
        tensors = load_pair_archive(Path(config.pairs))
        found = tuple(tensors["product"].shape[-2:])
        if found != (side, side):
            raise ValueError(
                f"{config.pairs} holds {found[0]}x{found[1]} pairs but this {model.name} works at "
                f"{side}x{side}: export it with --size {side}"
            )
        tensors = {k: v[:limit] for k, v in tensors.items()}
    else:
        if dataset is None or dataset.train is None or dataset.train.empty:
            name = "no data set" if dataset is None else dataset.name
            raise ValueError(f"{name} has no training pairs to train {model.name} on (or give pairs=ARCHIVE)")
        require_parse_maps(dataset, model.name)
        pairs = dataset.train if limit is None else dataset.train.iloc[:limit]
        tensors = prepare_pair_tensors(pairs, out_dir / f"pairs_{side}.pt", size=(side, side), progress=bool(progress))
    return {"person": tensors["person"], "product": tensors["product"]}, pairs


def train_generator_proxy(
    model: GeneratorProxy,
    job: TrainingJob,
    config: GanLoopConfig,
    setup: Setup,
    sampler: Optional[SamplerSetup] = None,
) -> Path:
    """Train `model.generator` on `job.dataset.train`'s (person photo, product photo) pairs with the GAN of
    `setup`; return final.pt. Afterwards `model` holds the trained generator (in eval mode).

    `sampler`, when given, decides each epoch's batches (CycleGAN's unpaired domains); else shuffled pairs.
    """
    out_dir, seed = Path(job.out_dir), job.seed
    out_dir.mkdir(parents=True, exist_ok=True)
    data, pairs = pair_tensors(model, job.dataset, out_dir, config, job.progress)
    device = next(model.generator.parameters()).device
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every_s"}

    # Seed before building the discriminators so a run (and its resume) starts from the same weights.
    torch.manual_seed(seed)
    modules, optimizers, step = setup(model, config, data, pairs)
    modules = {name: module.to(device).train() for name, module in modules.items()}
    trainer = GanTrainer(
        out_dir,
        modules,
        optimizers,
        config={
            "proxy": model.name,
            "conf": model.conf,
            "n_pairs": int(data["product"].shape[0]),
            "seed": seed,
            **settings,
        },
        checkpoint_every_s=float(config.checkpoint_every_s),
        sample_every=int(config.sample_every),
        **job.run_options(f"train {model.name}"),
    )
    trainer.train(
        data,
        epochs=int(config.epochs),
        batch_size=int(config.batch_size),
        step=step,
        sample=lambda batch: sample_columns(model.generator, batch),
        sampler=None if sampler is None else sampler(data, pairs, seed),
    )
    model.eval()
    return trainer.finish(weights=model.state_dict(), extra={"proxy": model.name, "proxy_conf": model.conf})


@register_trainer("pix2pix", config=Pix2PixTrainConfig)
def train_pix2pix(model: GeneratorProxy, job: TrainingJob, config: Pix2PixTrainConfig) -> Path:
    """Train a `Pix2PixProxy` (U-Net + PatchGAN + L1) with `train_generator_proxy`; final.pt."""
    return train_generator_proxy(model, job, config, pix2pix_setup)


@register_trainer("dtgan", config=DTGANTrainConfig)
def train_dtgan(model: GeneratorProxy, job: TrainingJob, config: DTGANTrainConfig) -> Path:
    """Train a `DTGANProxy` (residual generator, real/fake + association discriminators); final.pt."""
    return train_generator_proxy(model, job, config, dtgan_setup)
