"""Shared pieces of the project's GANs (PaintNet, pix2pix, DTGAN, CycleGAN): what their networks and losses need.

Small on purpose; every generator in `generation/` builds on these and nothing else:

- layers: `conv_block` (conv -> [BN or IN] -> L-ReLU/ReLU/Tanh; transposed with `up_block`),
  `init_gan_weights` (DCGAN's N(0, 0.02) initialisation), `set_requires_grad`;
- value ranges: generators work in [-1, 1] (tanh); `to_gan_range` / `from_gan_range` convert from/to the
  project's [0, 1] images, `uint8_to_gan` from stored uint8 pixels;
- losses: `adversarial_loss(logits, real, mode)` for one side of the game (generator or discriminator),
  `discriminator_loss(real_logits, fake_logits, mode)` for a discriminator step; modes "bce" (the
  log-loss of the papers, computed on logits), "lsgan" and "hinge".

The paired training data (`prepare_pair_tensors`, pair archives) and the loop over it (`GanTrainer`,
`save_sample_grid`) are training only: they live in `generation.training.pairs`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

GAN_MODES = ("bce", "lsgan", "hinge")
# conv_block's `norm`: True / "batch" -> BatchNorm; "instance" -> InstanceNorm without affine parameters (CycleGAN).
NORMS = {True: nn.BatchNorm2d, "batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d, False: None}

# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _activation(name: Optional[str]) -> Optional[nn.Module]:
    if name is None:
        return None
    table = {
        "lrelu": lambda: nn.LeakyReLU(0.2, inplace=True),
        "relu": lambda: nn.ReLU(inplace=True),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(table)} or None")
    return table[name]()


def conv_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 4,
    stride: int = 2,
    padding: int = 1,
    norm: Union[bool, str] = True,
    activation: Optional[str] = "lrelu",
    dropout: float = 0.0,
    transposed: bool = False,
    padding_mode: str = "zeros",
) -> nn.Sequential:
    """Convolution -> optional normalisation -> optional dropout -> activation (Leaky-ReLU 0.2 by default).

    The default (4x4, stride 2, padding 1) halves the resolution: the encoder/discriminator layer of
    DCGAN, pix2pix, DTGAN and PaintNet's Table 1; `transposed` makes it a transposed convolution that
    doubles it instead (`up_block`). `norm` is True or "batch" (BatchNorm), "instance" (InstanceNorm
    without affine parameters, CycleGAN's) or False; the convolution has no bias when a norm follows it.
    `padding_mode` "reflect" pads by mirroring (CycleGAN's generator; plain convolutions only).

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, out_channels, floor((H + 2 * padding - kernel_size) / stride) + 1, ...), or with
          `transposed` (B, out_channels, (H - 1) * stride - 2 * padding + kernel_size, ...).

    Example:
        >>> conv_block(6, 96)(torch.zeros(2, 6, 64, 64)).shape
        torch.Size([2, 96, 32, 32])
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: True, False, 'batch', 'instance'")
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(f"a transposed convolution pads with zeros only, got padding_mode={padding_mode!r}")
        layers = [nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=not norm)]
    else:
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, bias=not norm, padding_mode=padding_mode
        )
        layers = [conv]
    if norm:
        layers.append(NORMS[norm](out_channels))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    act = _activation(activation)
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def up_block(in_channels: int, out_channels: int, activation: Optional[str] = "relu", **options: Any) -> nn.Sequential:
    """Transposed convolution -> optional BatchNorm -> optional dropout -> activation (ReLU by default).

    `conv_block` with ``transposed=True``; `options` are its kernel_size, stride, padding, norm and dropout.
    The default (4x4, stride 2, padding 1) doubles the resolution ("stride 1/2" in the papers' tables).

    Example:
        >>> up_block(96, 3, norm=False, activation="tanh")(torch.zeros(2, 96, 32, 32)).shape
        torch.Size([2, 3, 64, 64])
    """
    return conv_block(in_channels, out_channels, activation=activation, transposed=True, **options)


@torch.no_grad()
def init_gan_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """DCGAN initialisation: conv weights ~ N(0, std), BN weights ~ N(1, std), biases 0. Returns `module`."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.InstanceNorm2d)) and layer.weight is not None:
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)
    return module


def set_requires_grad(modules: nn.Module | Iterable[nn.Module], flag: bool) -> None:
    """Switch gradients of every parameter of `modules` on or off (freeze D during the G step)."""
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


def to_gan_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the tanh range of the generators)."""
    return images * 2.0 - 1.0


def from_gan_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def uint8_to_gan(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def adversarial_loss(logits: torch.Tensor, real: bool, mode: str = "bce") -> torch.Tensor:
    """One side of the GAN game on raw discriminator outputs (logits, any shape), averaged.

    - "bce": -log sigmoid(x) for real, -log(1 - sigmoid(x)) for fake: eq. 7 of PaintNet, the original GAN
      log-loss. A generator calls it with ``real=True`` on its fakes (the non-saturating form).
    - "lsgan": (x - 1)^2 for real, x^2 for fake.
    - "hinge": relu(1 - x) for real, relu(1 + x) for fake (the discriminator's side; a generator uses
      `generator_loss`, which is -x for hinge).

    Example:
        >>> round(adversarial_loss(torch.zeros(4), real=True).item(), 4)  # log 2
        0.6931
    """
    if mode == "bce":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return ((logits - 1.0) ** 2).mean() if real else (logits**2).mean()
    if mode == "hinge":
        return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()
    raise ValueError(f"unknown GAN loss mode {mode!r}; valid: {', '.join(GAN_MODES)}")


def generator_loss(fake_logits: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's logits for its fakes (non-saturating).

    Example:
        >>> generator_loss(torch.tensor([2.0]), mode="hinge").item()
        -2.0
    """
    if mode == "hinge":
        return -fake_logits.mean()
    return adversarial_loss(fake_logits, real=True, mode=mode)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """0.5 * (loss on real + loss on fake): the mean per-sample loss over a half-real, half-fake batch.

    Example:
        >>> round(discriminator_loss(torch.zeros(2), torch.zeros(2)).item(), 4)
        0.6931
    """
    return 0.5 * (adversarial_loss(real_logits, True, mode) + adversarial_loss(fake_logits, False, mode))
