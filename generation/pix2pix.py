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

The proxy is a `generation.generator_proxy.GeneratorProxy` (resizing in and out, inference), as DTGAN's;
its training (the losses, the step, `Pix2PixTrainConfig`) is in `generation.training.gan`.

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
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from generation.gan import conv_block, init_gan_weights, up_block
from generation.generator_proxy import GeneratorProxy, build_seeded
from generation.proxies import PROXIES

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
        n_layers: stride-2 layers (pix2pix: 3, the 70x70 PatchGAN); n_layers + 2 convolutions in all.
        norm: the normalisation after every convolution but the first and the last ("batch" for pix2pix,
            "instance" for CycleGAN; see `generation.gan.conv_block`).

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2) logits (6x6 at 64x64, 14x14 at 128x128).

    Example:
        >>> PatchDiscriminator(width=8)(torch.zeros(2, 6, 64, 64)).shape
        torch.Size([2, 1, 6, 6])
    """

    def __init__(self, in_channels: int = 6, width: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        layers = [conv_block(in_channels, width, norm=False)]
        channels = width
        for layer in range(1, n_layers + 1):
            out_ch = width * min(2**layer, 8)
            layers.append(conv_block(channels, out_ch, stride=2 if layer < n_layers else 1, norm=norm))
            channels = out_ch
        layers.append(conv_block(channels, 1, stride=1, norm=False, activation=None))
        self.net = nn.Sequential(*layers)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs)


@PROXIES.register("pix2pix")
class Pix2PixProxy(GeneratorProxy):
    """pix2pix baseline: U-Net generator from the person photo, trained with a 70x70 PatchGAN + 100 * L1.

    Config:
        image_size: 64 (U-Net of 6 levels) or 128 (7 levels).
        width: channels of the generator's first level (pix2pix: 64).
        dropout: decoder dropout in training (pix2pix: 0.5).
    """

    default_conf: Dict[str, Any] = {"image_size": 64, "width": 64, "dropout": 0.5}

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        levels = int(math.log2(self.check_image_size()))
        self.generator = build_seeded(
            lambda: init_gan_weights(
                UNetGenerator(levels=levels, width=int(self.conf["width"]), dropout=float(self.conf["dropout"]))
            )
        )
