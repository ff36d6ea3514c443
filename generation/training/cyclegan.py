"""Training of the cycle-consistent GANs (`generation.cyclegan`): vanilla, Long and Nest CycleGAN.

Domain A is the person photo, domain B the product photo. One iteration (`cyclegan_step`, in the order
of [94]'s code): the generators' step on

    L_GAN(G_AB^M, D_B) + L_GAN(G_BA^N, D_A) + lambda * L_cycle   (+ L_Sim for Nest)

with L_GAN the LSGAN loss (eq. 8.1) on the *last* output of each chain (eq. 8.6, 8.10), L_cycle the L1
outer cycle (eq. 8.2, through every generator for Long) or, for Nest, the sum of the L1 inner cycles
(eq. 8.9, whose last term is the outer cycle), and L_Sim = ||G_AB^1(a) - G_BA^1(b)||_1 (eq. 8.11); then
the discriminators' step, each on real images of its domain against generated ones drawn from a history
pool ([94]). Hyper-parameters and their sections: see `generation.cyclegan`.

Unpaired by default (`unpaired=True`, Sec. 8.1.3: "we randomly shuffled two domain-specific datasets to
make sure they are totally unpaired"): each epoch draws the person photos and the product photos from two
independent permutations (`unpaired_batches`), repaired so that no batch holds a person photo together with
the product it wears; `unpaired=False` trains on the pairs, shuffled as pairs, with the same losses (no
pixel loss: the comparison is what pairing alone brings).

The data, the loop, checkpoints (last.pt resumes, final.pt holds the A -> B chain), the time budget and
the sample grids are those of pix2pix and DTGAN (`generation.training.gan.train_generator_proxy`).

Example:
    >>> from generation.proxies import create_proxy
    >>> from retrieval.datasets import load_dataset
    >>> proxy = create_proxy("cyclegan-nest")
    >>> final = proxy.train_on(load_dataset("viton:../shared/data/viton"), "runs/nest", epochs=1)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from generation.cyclegan import CycleGANProxy, NestCycleGANProxy, cyclegan_discriminator, generator_chain
from generation.gan import discriminator_loss, generator_loss, init_gan_weights, set_requires_grad
from generation.training.gan import (
    GanLoopConfig,
    GanParts,
    PairData,
    PairTable,
    identical_image_codes,
    product_codes_of,
    train_generator_proxy,
)
from generation.training.pairs import SamplerFn
from retrieval.training import TrainingJob, register_trainer

# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CycleGANTrainConfig(GanLoopConfig):
    """Training options of the CycleGAN proxies (Sec. 8.1.3 and [94]); not part of the proxy's conf or fingerprint.

    `GanLoopConfig`'s options (epochs, batch_size, lr, beta1, beta2, gan_mode, d_width, sample_every,
    max_pairs, pairs, checkpoint_every_s) with the chapter's values where it gives them, plus:

    Attributes:
        batch_size: rows per step (the chapter: 1; 4 here, see `generation.cyclegan`); epochs: the chapter's
            200 are 2 here.
        weight_decay: of Adam, for every network (8.1.3: 5e-4; lr 2e-4 as 8.1.3, betas (0.5, 0.999) as [94]).
        cycle_weight: lambda of the cycle loss (8.1.3: 10; eq. 8.3, 8.6, 8.10).
        gan_mode: LSGAN (8.1.1, eq. 8.1).
        pool_size: generated images each discriminator's history pool keeps ([94]: 50; 0 = no pool).
        unpaired: draw the two domains from independent shuffles, never a person photo beside its product
            in a batch (8.1.3); False trains on the pairs.
    """

    batch_size: int = 4
    gan_mode: str = "lsgan"
    weight_decay: float = 5e-4
    cycle_weight: float = 10.0
    pool_size: int = 50
    unpaired: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")


@dataclass(frozen=True)
class NestCycleGANTrainConfig(CycleGANTrainConfig):
    """Nest CycleGAN's options: `CycleGANTrainConfig` plus the weight of L_Sim (eq. 8.11, "added": 1)."""

    similarity_weight: float = 1.0


# --------------------------------------------------------------------------------------------------
# Unpaired batches
# --------------------------------------------------------------------------------------------------


def matched_rows(codes: torch.Tensor, persons: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which product rows of a batch show a product that one of the batch's persons wears.

    Args:
        codes: (N,) int64 product code of every training row: person row i wears product codes[i], product
            row j shows product codes[j] (equal codes = the same product).
        persons, products: (B,) int64 rows of the batch's person photos and product photos.

    Example:
        >>> matched_rows(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1]), torch.tensor([3, 2])).tolist()
        [True, False]
    """
    return (codes[products][:, None] == codes[persons][None, :]).any(dim=1)


def unpaired_batches(
    codes: torch.Tensor, batch_size: int, generator: torch.Generator, attempts: int = 20
) -> List[Dict[str, torch.Tensor]]:
    """One epoch of unpaired batches: {"person": rows, "product": rows}, no matched pair inside a batch.

    The person rows and the product rows are two independent permutations of the N rows, cut into
    batches of `batch_size` (a last, partial batch is dropped, as for pairs). A product row that a person
    of its batch wears is then swapped with a uniformly drawn product row from another batch or from the
    dropped tail, among those that leave both batches without a matched pair; where no single swap does,
    both permutations are drawn again (up to `attempts` times). Each domain keeps every row at most once
    per epoch.

    Args:
        codes: (N,) int64 product codes (see `matched_rows`).
        batch_size: rows per batch (clamped to [1, N]).
        generator: a CPU torch.Generator (the epoch is reproducible: a resumed run sees the same batches).
        attempts: fresh draws before giving up.

    Returns:
        N // batch_size batches (1 when N < batch_size), each {"person": (B,), "product": (B,)} int64.

    Raises:
        ValueError: no draw could be freed of matched pairs (too few distinct products for this batch size).
    """
    codes = codes.cpu()
    n = len(codes)
    if n == 0:
        raise ValueError("unpaired_batches got no training rows")
    size = max(1, min(int(batch_size), n))
    for _ in range(max(1, int(attempts))):
        persons, products = torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)
        if _repair_matches(codes, persons, products, size, generator):
            stop = (n // size) * size
            return [{"person": persons[i : i + size], "product": products[i : i + size]} for i in range(0, stop, size)]
    raise ValueError(
        f"cannot draw unpaired batches of {size} rows: {attempts} draws kept a person photo beside the product it "
        f"wears ({n} rows, {len(codes.unique())} distinct products); lower batch_size"
    )


def _repair_matches(
    codes: torch.Tensor, persons: torch.Tensor, products: torch.Tensor, size: int, generator: torch.Generator
) -> bool:
    """Swap, in place, every product row matched in its batch with one that fits; False where one does not."""
    n_batches = len(codes) // size
    stop = n_batches * size
    person_codes = codes[persons[:stop]].view(n_batches, size)
    # batch of each product position; the dropped tail is batch n_batches, which has no persons to match
    batch_of = torch.arange(len(codes)).div(size, rounding_mode="floor").clamp_max(n_batches)
    slots = codes[products[:stop]].view(n_batches, size)
    conflicts = (slots[:, :, None] == person_codes[:, None, :]).any(dim=2).flatten()
    for slot in conflicts.nonzero().flatten().tolist():
        batch, code = slot // size, codes[products[slot]]
        if not (person_codes[batch] == code).any():  # an earlier swap already moved it out
            continue
        fits_here = ~(codes[products][:, None] == person_codes[batch][None, :]).any(dim=1)  # (N,)
        takes_it = torch.ones(n_batches + 1, dtype=torch.bool)  # batches (and the tail) this product may join
        takes_it[:n_batches] = ~(person_codes == code).any(dim=1)
        candidates = (fits_here & takes_it[batch_of] & (batch_of != batch)).nonzero().flatten()
        if len(candidates) == 0:
            return False
        other = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
        products[[slot, other]] = products[[other, slot]]
    return True


def unpaired_sampler(codes: torch.Tensor, batch_size: int, seed: int) -> SamplerFn:
    """`GanTrainer.train`'s sampler: epoch -> `unpaired_batches`, seeded by (seed, epoch)."""

    def sampler(epoch: int) -> List[Dict[str, torch.Tensor]]:
        return unpaired_batches(codes, batch_size, torch.Generator().manual_seed(seed * 1_000_003 + 7 * epoch + 1))

    return sampler


def row_codes(data: PairData, pairs: PairTable) -> torch.Tensor:
    """(N,) product codes of the training rows: the pairs' product ids, or identical product photos for an archive."""
    return product_codes_of(pairs) if pairs is not None else identical_image_codes(data["product"])


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


class ImagePool(nn.Module):
    """[94]'s history of generated images: a discriminator sees older fakes too, which steadies training.

    Until full, every image is stored and returned; then each image is, with probability 1/2, swapped
    with a uniformly drawn stored one (the stored one is returned), else returned as it is. The pool is a
    module with buffers so that last.pt keeps it and a resumed run continues exactly.

    Shape:
        - images: (B, C, H, W), with (C, H, W) = `shape`.
        - Output: (B, C, H, W), detached.
    """

    def __init__(self, size: int, shape: Tuple[int, int, int]):
        super().__init__()
        self.size = int(size)
        self.register_buffer("images", torch.zeros(self.size, *shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def query(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            stored = int(self.count)
            if stored < self.size:
                self.images[stored] = image
                self.count += 1
                out.append(image)
            elif float(torch.rand((), generator=generator, device=generator.device)) < 0.5:
                slot = int(torch.randint(self.size, (), generator=generator, device=generator.device))
                out.append(self.images[slot].clone())
                self.images[slot] = image
            else:
                out.append(image)
        return torch.stack(out)


def chain_outputs(chain: Sequence[nn.Module], images: torch.Tensor) -> List[torch.Tensor]:
    """[G^1(x), G^2(G^1(x)), ..., G^M(...)]: every generator's output along a chain (eq. 8.4, 8.5)."""
    outputs = []
    for generator in chain:
        images = generator(images)
        outputs.append(images)
    return outputs


def reconstructions(back: Sequence[nn.Module], forward: Sequence[torch.Tensor], nested: bool) -> List[torch.Tensor]:
    """The cycles' reconstructions of the images a forward chain started from.

    Outer cycle (vanilla, Long): the whole back chain on the forward chain's last output (eq. 8.2). Nested
    (eq. 8.7-8.8): for m = 1..M, the m-th forward output through G^(N-m+1), ..., G^N of the back chain;
    m = M is the outer cycle when M = N.

    Args:
        back: the N generators of the other direction, G^1 first.
        forward: the M outputs of `chain_outputs` of the forward chain.
        nested: all M inner cycles, or the outer one only.
    """
    n_back = len(back)
    if not nested:
        return [chain_outputs(back, forward[-1])[-1]]
    if len(forward) > n_back:
        raise ValueError(f"nested cycles need M <= N generators, got M = {len(forward)}, N = {n_back}")
    return [chain_outputs(back[n_back - m :], forward[m - 1])[-1] for m in range(1, len(forward) + 1)]


def cycle_loss(reconstructed: Sequence[torch.Tensor], original: torch.Tensor) -> torch.Tensor:
    """Sum over the cycles of the mean absolute error ||x_hat - x||_1 (eq. 8.2, 8.9); 0 for perfect reconstructions.

    Example:
        >>> cycle_loss([torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)], torch.zeros(1, 3, 2, 2)).item()
        1.0
    """
    return torch.stack([(x_hat - original).abs().mean() for x_hat in reconstructed]).sum()


def similarity_loss(first_ab: torch.Tensor, first_ba: torch.Tensor) -> torch.Tensor:
    """||G_AB^1(a) - G_BA^1(b)||_1 (eq. 8.11) as a mean absolute error: 0 when the two agree.

    Example:
        >>> similarity_loss(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)).item()
        0.5
    """
    return (first_ab - first_ba).abs().mean()


@dataclass
class CycleNetworks:
    """The networks of one CycleGAN training: the two chains (G^1 first), the discriminators and their pools."""

    ab: nn.Sequential
    ba: nn.Sequential
    d_a: nn.Module
    d_b: nn.Module
    pool_a: ImagePool
    pool_b: ImagePool

    def modules(self) -> Dict[str, nn.Module]:
        """What last.pt keeps; "generator" is the proxy's own A -> B chain (final.pt)."""
        return {
            "generator": self.ab,
            "generator_ba": self.ba,
            "d_a": self.d_a,
            "d_b": self.d_b,
            "pool_a": self.pool_a,
            "pool_b": self.pool_b,
        }


@dataclass(frozen=True)
class CycleLossWeights:
    """lambda of the cycles, the adversarial loss, Nest's switch and L_Sim's weight (0 for vanilla and Long)."""

    cycle: float = 10.0
    mode: str = "lsgan"
    nested: bool = False
    similarity: float = 0.0


def cyclegan_generator_loss(
    nets: CycleNetworks,
    a: torch.Tensor,
    b: torch.Tensor,
    ab: Sequence[torch.Tensor],
    ba: Sequence[torch.Tensor],
    weights: CycleLossWeights,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The generators' objective: eq. 8.3 (vanilla), 8.6 (Long) or 8.10 + 8.11 (Nest).

    Shape:
        - a, b: (B, 3, H, W) in [-1, 1]; ab, ba: the chains' outputs on them (`chain_outputs`).

    Returns:
        (total, {"g_adv_a", "g_adv_b", "g_cycle_a", "g_cycle_b"[, "g_sim"]}): the cycle parts summed over
        the cycles of each domain (1 for vanilla and Long, M for Nest).
    """
    adv_b = generator_loss(nets.d_b(ab[-1]), weights.mode)  # only the last outputs meet a discriminator
    adv_a = generator_loss(nets.d_a(ba[-1]), weights.mode)
    cycle_a = cycle_loss(reconstructions(nets.ba, ab, weights.nested), a)
    cycle_b = cycle_loss(reconstructions(nets.ab, ba, weights.nested), b)
    total = adv_a + adv_b + weights.cycle * (cycle_a + cycle_b)
    parts = {"g_adv_a": adv_a.item(), "g_adv_b": adv_b.item(), "g_cycle_a": cycle_a.item(), "g_cycle_b": cycle_b.item()}
    if weights.nested:
        sim = similarity_loss(ab[0], ba[0])
        total = total + weights.similarity * sim
        parts["g_sim"] = sim.item()
    return total, parts


def cyclegan_step(
    nets: CycleNetworks,
    optimizers: Mapping[str, torch.optim.Optimizer],
    a: torch.Tensor,
    b: torch.Tensor,
    weights: CycleLossWeights,
    generator: torch.Generator,
) -> Dict[str, float]:
    """One iteration: the generators' step (discriminators frozen), then both discriminators on pooled fakes.

    Args:
        optimizers: {"g": both chains, "d": both discriminators}.
        a, b: (B, 3, H, W) person and product photos in [-1, 1] (unpaired or paired rows).
        generator: the step's random generator (the pools' draws).

    Returns:
        the losses before the updates: "g" and its parts, "d_a", "d_b".
    """
    ab, ba = chain_outputs(nets.ab, a), chain_outputs(nets.ba, b)
    set_requires_grad([nets.d_a, nets.d_b], False)  # the generators' step must not accumulate D's gradients
    loss_g, parts = cyclegan_generator_loss(nets, a, b, ab, ba, weights)
    optimizers["g"].zero_grad(set_to_none=True)
    loss_g.backward()
    optimizers["g"].step()

    set_requires_grad([nets.d_a, nets.d_b], True)
    fake_b, fake_a = nets.pool_b.query(ab[-1], generator), nets.pool_a.query(ba[-1], generator)
    loss_d_b = discriminator_loss(nets.d_b(b), nets.d_b(fake_b), weights.mode)
    loss_d_a = discriminator_loss(nets.d_a(a), nets.d_a(fake_a), weights.mode)
    optimizers["d"].zero_grad(set_to_none=True)
    (loss_d_a + loss_d_b).backward()
    optimizers["d"].step()
    return {"g": loss_g.item(), **parts, "d_a": loss_d_a.item(), "d_b": loss_d_b.item()}


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


def cyclegan_setup(model: CycleGANProxy, config: CycleGANTrainConfig, data: PairData, pairs: PairTable) -> GanParts:
    """The GAN of `model`: its A -> B chain, a B -> A chain as long, D_A, D_B and their pools, Adam, `cyclegan_step`.

    Unpaired training checks every batch again (a matched pair raises): the guarantee the sampler gives,
    kept true however the batches come.
    """
    device = next(model.generator.parameters()).device
    side = model.check_image_size()
    nets = CycleNetworks(
        ab=model.generator,
        ba=generator_chain(model.chain_length, int(model.conf["width"]), int(model.conf["n_blocks"])).to(device),
        d_a=init_gan_weights(cyclegan_discriminator(int(config.d_width))).to(device),
        d_b=init_gan_weights(cyclegan_discriminator(int(config.d_width))).to(device),
        pool_a=ImagePool(int(config.pool_size), (3, side, side)).to(device),
        pool_b=ImagePool(int(config.pool_size), (3, side, side)).to(device),
    )
    adam = {"lr": float(config.lr), "betas": (float(config.beta1), float(config.beta2))}
    adam["weight_decay"] = float(config.weight_decay)
    optimizers = {
        "g": torch.optim.Adam([*nets.ab.parameters(), *nets.ba.parameters()], **adam),
        "d": torch.optim.Adam([*nets.d_a.parameters(), *nets.d_b.parameters()], **adam),
    }
    nested = isinstance(model, NestCycleGANProxy)
    weights = CycleLossWeights(
        cycle=float(config.cycle_weight),
        mode=str(config.gan_mode),
        nested=nested,
        similarity=float(getattr(config, "similarity_weight", 0.0)) if nested else 0.0,
    )
    codes = row_codes(data, pairs) if config.unpaired else None

    def step(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, float]:
        if codes is not None and matched_rows(codes, batch["index_person"].cpu(), batch["index_product"].cpu()).any():
            raise RuntimeError("an unpaired batch holds a person photo and the product it wears")
        return cyclegan_step(nets, optimizers, batch["person"], batch["product"], weights, generator)

    return nets.modules(), optimizers, step


def cyclegan_sampler(config: CycleGANTrainConfig):
    """`train_generator_proxy`'s sampler setup: `unpaired_sampler` when `config.unpaired`, else shuffled pairs."""

    def setup(data: PairData, pairs: PairTable, seed: int) -> Optional[SamplerFn]:
        if not config.unpaired:
            return None
        return unpaired_sampler(row_codes(data, pairs), int(config.batch_size), seed)

    return setup


@register_trainer("cyclegan", "cyclegan-long", config=CycleGANTrainConfig)
def train_cyclegan(model: CycleGANProxy, job: TrainingJob, config: CycleGANTrainConfig) -> Path:
    """Train a vanilla or Long CycleGAN proxy (outer cycle only); final.pt holds the A -> B chain."""
    return train_generator_proxy(model, job, config, cyclegan_setup, cyclegan_sampler(config))


@register_trainer("cyclegan-nest", config=NestCycleGANTrainConfig)
def train_nest_cyclegan(model: NestCycleGANProxy, job: TrainingJob, config: NestCycleGANTrainConfig) -> Path:
    """Train a Nest CycleGAN proxy (inner cycles + L_Sim); final.pt holds the A -> B chain."""
    return train_generator_proxy(model, job, config, cyclegan_setup, cyclegan_sampler(config))
