"""pix2pix (Isola et al., 2017) as a proxy baseline: person photo -> product photo, directly.

The PaintNet paper's Pix2PixGAN baseline (000_*.txt, Sec. 4.2) maps the model image to the product
image with no parsing and no shape constraint; so does this proxy. The pieces follow the pix2pix
paper (summarised in 004_*.txt, Sec. 3.2.1):

- generator: a U-Net, an encoder of 4x4 stride-2 convolutions C64-C128-C256-C512-C512-... down to a
  1x1 bottleneck (6 levels at 64x64, 7 at 128x128), BatchNorm everywhere but the first encoder layer
  and the bottleneck, Leaky-ReLU 0.2 in the encoder, ReLU in the decoder, dropout 0.5 in the three
  coarsest decoder layers, a skip connection from every encoder level to the decoder level of the same
  resolution, tanh output;
- discriminator: the 70x70 PatchGAN on (input, output) concatenated: C64-C128-C256-C512 then a 1-channel
  convolution, 4x4 kernels, the last two with stride 1; it scores a grid of overlapping 70x70 patches
  (6x6 logits on a 64x64 image, where each patch covers nearly the whole image);
- loss: cGAN log-loss (or LSGAN) + lambda_L1 * L1 with lambda_L1 = 100, the discriminator's loss halved;
  Adam lr 2e-4, betas (0.5, 0.999).

Deviations, all for the 2-core CPU this project trains on: 64x64 images instead of 256x256, mini-batches
of 16 instead of 1 (BatchNorm then uses batch statistics in training and running statistics at
inference), and inference without dropout so that the proxy is deterministic (pix2pix keeps dropout on
at test time as its noise source).

`GeneratorProxy`, the base of this proxy and of `generation.dtgan`, holds what every "one generator from
the person photo" baseline shares: resizing in and out, inference, the training-data preparation and
the `GanTrainer` set-up.

Example:
    >>> import torch
    >>> from generation.proxies import create_proxy
    >>> proxy = create_proxy("pix2pix").eval()                     # untrained: near-grey output
    >>> proxy(torch.rand(2, 3, 256, 192)).shape
    torch.Size([2, 3, 256, 192])
    >>> from retrieval.datasets import load_dataset
    >>> final = proxy.train_on(load_dataset("viton:../shared/data/viton"), "runs/pix2pix")  # doctest: +SKIP
    >>> trained = create_proxy(f"pix2pix@{final}").eval()          # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import (
    GAN_MODES,
    GanTrainer,
    conv_block,
    discriminator_loss,
    from_gan_range,
    generator_loss,
    init_gan_weights,
    load_pair_archive,
    prepare_pair_tensors,
    set_requires_grad,
    to_gan_range,
    up_block,
)
from generation.proxies import PROXIES, Proxy
from retrieval.training import train_options

SUPPORTED_SIZES = (64, 128)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def unet_channels(levels: int, width: int = 64) -> List[int]:
    """Channels of the U-Net encoder levels: width * (1, 2, 4, 8, 8, 8, ...), as pix2pix's C64-C128-C256-C512-C512...

    Example:
        >>> unet_channels(6)
        [64, 128, 256, 512, 512, 512]
    """
    return [width * min(2**level, 8) for level in range(levels)]


class UNetGenerator(nn.Module):
    """pix2pix's U-Net: stride-2 encoder down to 1x1, mirrored decoder, skips between equal resolutions.

    Args:
        levels: encoder levels; the input side must be 2**levels (6 for 64x64, 7 for 128x128).
        width: channels of the first level (pix2pix: 64).
        in_channels, out_channels: image channels.
        dropout: dropout of the three coarsest decoder layers (pix2pix: 0.5); active in training only.

    Shape:
        - Input: (B, in_channels, 2**levels, 2**levels) in [-1, 1].
        - Output: (B, out_channels, 2**levels, 2**levels) in [-1, 1] (tanh).

    Example:
        >>> UNetGenerator(levels=6, width=8)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self, levels: int = 6, width: int = 64, in_channels: int = 3, out_channels: int = 3, dropout: float = 0.5
    ):
        super().__init__()
        if levels < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got {levels}")
        self.levels = levels
        channels = unet_channels(levels, width)
        self.encoder = nn.ModuleList()
        for level, out_ch in enumerate(channels):
            in_ch = in_channels if level == 0 else channels[level - 1]
            # pix2pix: no BatchNorm on the first layer (raw pixels) nor on the 1x1 bottleneck (a single
            # value per channel and image); the bottleneck feeds the decoder through a ReLU.
            outermost, innermost = level == 0, level == levels - 1
            self.encoder.append(
                conv_block(
                    in_ch, out_ch, norm=not (outermost or innermost), activation="relu" if innermost else "lrelu"
                )
            )
        self.decoder = nn.ModuleList()
        for position, level in enumerate(reversed(range(levels))):
            # Decoder layer `position` brings resolution 2**-(level + 1) to 2**-level; every layer but
            # the first also receives the skip of the encoder level of its input resolution.
            in_ch = channels[level] if position == 0 else 2 * channels[level]
            if level == 0:
                self.decoder.append(up_block(in_ch, out_channels, norm=False, activation="tanh"))
            else:
                self.decoder.append(up_block(in_ch, channels[level - 1], dropout=dropout if position < 3 else 0.0))

    def encode(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Every encoder level's output, finest first: the skips, the last one the 1x1 bottleneck."""
        side = 2**self.levels
        if images.ndim != 4 or tuple(images.shape[-2:]) != (side, side):
            raise ValueError(
                f"a {self.levels}-level U-Net takes (B, C, {side}, {side}) images, got {tuple(images.shape)}"
            )
        features = []
        x = images
        for layer in self.encoder:
            x = layer(x)
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoder over `encode`'s output: each layer upsamples, then meets the skip of its new resolution."""
        skips = list(features[:-1])
        x = self.decoder[0](features[-1])
        for layer in self.decoder[1:]:
            x = layer(torch.cat([x, skips.pop()], dim=1))
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))


def patch_receptive_field(n_layers: int = 3) -> int:
    """Side in pixels of the input patch one PatchGAN logit sees: 70 for pix2pix's default 3 layers.

    Example:
        >>> patch_receptive_field(3), patch_receptive_field(1)
        (70, 16)
    """
    # n_layers stride-2 4x4 convolutions, then two stride-1 4x4 ones; walk back from one output pixel.
    strides = [2] * n_layers + [1, 1]
    field = 1
    for stride in reversed(strides):
        field = (field - 1) * stride + 4
    return field


class PatchDiscriminator(nn.Module):
    """pix2pix's Markovian (PatchGAN) discriminator: one real/fake logit per overlapping image patch.

    C64 (no BatchNorm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel conv (stride 1), 4x4 kernels,
    Leaky-ReLU 0.2; with `n_layers = 3` every logit sees a 70x70 patch (`patch_receptive_field`).

    Args:
        in_channels: 6 for pix2pix's (input photo, candidate product) pairs.
        width: channels of the first layer (pix2pix: 64).
        n_layers: stride-2 layers (pix2pix: 3, the 70x70 PatchGAN).

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2) logits (6x6 at 64x64, 14x14 at 128x128).

    Example:
        >>> PatchDiscriminator(width=8)(torch.zeros(2, 6, 64, 64)).shape
        torch.Size([2, 1, 6, 6])
    """

    def __init__(self, in_channels: int = 6, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [conv_block(in_channels, width, norm=False)]
        channels = width
        for layer in range(1, n_layers + 1):
            out_ch = width * min(2**layer, 8)
            layers.append(conv_block(channels, out_ch, stride=2 if layer < n_layers else 1))
            channels = out_ch
        layers.append(conv_block(channels, 1, stride=1, norm=False, activation=None))
        self.net = nn.Sequential(*layers)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs)


# --------------------------------------------------------------------------------------------------
# Losses and the optimisation step
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
# Proxy base shared by the baselines
# --------------------------------------------------------------------------------------------------


def resize_images(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize a batch: area averaging when shrinking (as the training data, cv2.INTER_AREA), else bilinear.

    Shape:
        - images: (B, C, H, W) float.
        - Output: (B, C, size[0], size[1]).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if images.shape[-2] >= size[0] and images.shape[-1] >= size[1]:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


class GeneratorProxy(Proxy):
    """A proxy made of one image-to-image generator trained on (person photo, product photo) pairs.

    Subclasses build `self.generator` ([-1, 1] -> [-1, 1] at `image_size` x `image_size`) in `__init__`
    and implement `_training_setup`, which returns the modules, optimisers and step function of their GAN.
    Only the generator belongs to the proxy (its state dict, its fingerprint, final.pt); the
    discriminators live for the training run only (they are in last.pt, for resuming).

    `forward`: (B, 3, H, W) in [0, 1] -> image_size x image_size -> generator -> [0, 1] -> (B, 3, H, W).
    """

    trainable = True
    # Options of `train_on` (not part of the proxy's conf or fingerprint); the CLI's flags override them.
    train_defaults: Dict[str, Any] = {}

    generator: nn.Module

    def _check_size(self) -> int:
        size = int(self.conf["image_size"])
        if size not in SUPPORTED_SIZES:
            raise ValueError(f"{self.name}: image_size must be one of {SUPPORTED_SIZES}, got {size}")
        return size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Generate the product image of each person photo, at the photo's own size.

        An inference stage (no autograd graph); call `.eval()` first, as the engine does, so BatchNorm
        uses its running statistics and a batch gives the same images as its photos one by one.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name} expects float images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        side = int(self.conf["image_size"])
        small = resize_images(images, (side, side))
        generated = from_gan_range(self.generator(to_gan_range(small)))
        return resize_images(generated, images.shape[-2:]).clamp(0.0, 1.0)

    # ---- training ---------------------------------------------------------------------------
    def _training_setup(
        self, settings: Mapping[str, Any], data: Mapping[str, torch.Tensor], dataset
    ) -> Tuple[Dict[str, nn.Module], Dict[str, torch.optim.Optimizer], Any]:
        """(modules, optimisers, step(batch, generator) -> losses) of this model's GAN."""
        raise NotImplementedError

    def _sample_columns(self, batch: Mapping[str, torch.Tensor]) -> List[Tuple[str, torch.Tensor]]:
        """Sample-grid columns: photo | generated | ground truth (generator in eval mode for the grid)."""
        was_training = self.generator.training
        self.generator.eval()
        generated = self.generator(batch["person"])
        self.generator.train(was_training)
        return [
            ("photo", from_gan_range(batch["person"])),
            ("generated", from_gan_range(generated)),
            ("ground truth", from_gan_range(batch["product"])),
        ]

    def train_on(self, dataset, out_dir, **options: Any) -> Path:
        """Train on `dataset.train`'s (person photo, product photo) pairs; return the path of final.pt.

        The pairs are resized once to image_size x image_size uint8 tensors and cached in
        ``out_dir/pairs_<size>.pt`` (`generation.gan.prepare_pair_tensors`); `GanTrainer` then runs the
        epochs: last.pt (resume: run the same call again), final.pt (the generator's weights),
        losses.csv/png, and sample grids (photo | generated | ground truth) in ``out_dir/samples/``.

        Args:
            dataset: a RetrievalSet with training pairs (VITON's need their parse maps: the shared
                preparation also cuts the segmented textures PaintNet trains on).
            out_dir: run directory.
            **options: seed, progress, time_budget_s, checkpoint_every_s, and overrides of
                `train_defaults` (None values are ignored, so the CLI can pass its unset flags);
                pairs=ARCHIVE trains on a `street2shop export-pairs` archive, `dataset` may then be None.
        """
        seed, progress, time_budget_s, checkpoint_every_s, settings = train_options(
            self.name, options, self.train_defaults
        )
        if settings.get("gan_mode") not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {settings.get('gan_mode')!r}")
        side = self._check_size()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        limit = None if settings.get("max_pairs") is None else int(settings["max_pairs"])
        if settings.get("pairs") is not None:  # a pair archive (`street2shop export-pairs`) instead of the photos
            pairs = None
            tensors = load_pair_archive(Path(settings["pairs"]))
            found = tuple(tensors["product"].shape[-2:])
            if found != (side, side):
                raise ValueError(
                    f"{settings['pairs']} holds {found[0]}x{found[1]} pairs but this {self.name} works at "
                    f"{side}x{side}: export it with --size {side}"
                )
            tensors = {k: v[:limit] for k, v in tensors.items()}
        else:
            if dataset is None or dataset.train is None or dataset.train.empty:
                name = "no data set" if dataset is None else dataset.name
                raise ValueError(f"{name} has no training pairs to train {self.name} on (or give pairs=ARCHIVE)")
            pairs = dataset.train if limit is None else dataset.train.iloc[:limit]
            tensors = prepare_pair_tensors(
                pairs, out_dir / f"pairs_{side}.pt", size=(side, side), progress=bool(progress)
            )
        data = {"person": tensors["person"], "product": tensors["product"]}
        device = next(self.generator.parameters()).device

        # Seed before building the discriminators so a run (and its resume) starts from the same weights.
        torch.manual_seed(seed)
        modules, optimizers, step = self._training_setup(settings, data, pairs)
        modules = {name: module.to(device).train() for name, module in modules.items()}
        trainer = GanTrainer(
            out_dir,
            modules,
            optimizers,
            config={
                "proxy": self.name,
                "conf": self.conf,
                "n_pairs": int(data["product"].shape[0]),
                "seed": seed,
                **settings,
            },
            seed=seed,
            time_budget_s=time_budget_s,
            checkpoint_every_s=checkpoint_every_s,
            progress=f"train {self.name}" if progress else None,
            sample_every=int(settings["sample_every"]),
        )
        trainer.train(
            data,
            epochs=int(settings["epochs"]),
            batch_size=int(settings["batch_size"]),
            step=step,
            sample=self._sample_columns,
        )
        self.eval()
        return trainer.finish(weights=self.state_dict(), extra={"proxy": self.name, "proxy_conf": self.conf})

    def load_trained(self, checkpoint) -> "GeneratorProxy":
        """`Proxy.load_trained`, with weights of another width (a shape mismatch) reported as a ValueError."""
        try:
            return super().load_trained(checkpoint)
        except RuntimeError as exc:  # load_state_dict raises RuntimeError on tensors of another shape
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise ValueError(
                f"{checkpoint} does not fit proxy {self.name!r} with config {self.conf}: was it trained "
                f"with another config? ({first})"
            ) from None


def _build_seeded(build, seed: int = 0):
    """Build a module under a fixed seed (without touching the global RNG), so an untrained proxy is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@PROXIES.register("pix2pix")
class Pix2PixProxy(GeneratorProxy):
    """pix2pix baseline: U-Net generator from the person photo, trained with a 70x70 PatchGAN + 100 * L1.

    Config:
        image_size: 64 (U-Net of 6 levels) or 128 (7 levels).
        width: channels of the generator's first level (pix2pix: 64).
        dropout: decoder dropout in training (pix2pix: 0.5).
    """

    default_conf: Dict[str, Any] = {"image_size": 64, "width": 64, "dropout": 0.5}
    train_defaults: Dict[str, Any] = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-4,
        "beta1": 0.5,
        "beta2": 0.999,
        "l1_weight": 100.0,
        "gan_mode": "bce",
        "d_width": 64,  # PatchGAN's first layer (pix2pix: 64)
        "sample_every": 100,
        "max_pairs": None,
        "pairs": None,  # a pair archive to train on instead of the data set's photos
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        levels = int(math.log2(self._check_size()))
        self.generator = _build_seeded(
            lambda: init_gan_weights(
                UNetGenerator(levels=levels, width=int(self.conf["width"]), dropout=float(self.conf["dropout"]))
            )
        )

    def _training_setup(self, settings, data, pairs):
        discriminator = init_gan_weights(PatchDiscriminator(in_channels=6, width=int(settings["d_width"])))
        discriminator.to(next(self.generator.parameters()).device)
        betas = (float(settings["beta1"]), float(settings["beta2"]))
        optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=float(settings["lr"]), betas=betas)
        optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=float(settings["lr"]), betas=betas)
        l1_weight, mode = float(settings["l1_weight"]), str(settings["gan_mode"])

        def step(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, float]:
            return pix2pix_step(
                self.generator,
                discriminator,
                optimizer_g,
                optimizer_d,
                batch["person"],
                batch["product"],
                l1_weight,
                mode,
            )

        return {"generator": self.generator, "discriminator": discriminator}, {"g": optimizer_g, "d": optimizer_d}, step
