"""Cycle-consistent GANs as proxies: vanilla, Long and Nest CycleGAN, person photo (A) -> product photo (B).

Chapter 8 of 001_*.txt (Sec. 8.1, "Image-to-Image Translation") studies CycleGAN (Zhu et al., 2017) and
two extensions, all trained on *unpaired* images of two domains, which is what a shop has: product
photos and, separately, street photos. Here domain A is the person photo, domain B the product photo;
the proxy is the A -> B mapping, and the B -> A generators and both discriminators live for the
training only (`generation.training.cyclegan`).

- `cyclegan` (Sec. 8.1.1, "Vanilla Cycle-consistent GAN"): G_AB, G_BA, D_A, D_B; LSGAN adversarial
  losses (eq. 8.1) plus lambda times the L1 cycle loss (eq. 8.2, 8.3);
- `cyclegan-long` (eq. 8.4-8.6, Sec. 8.1.2 "Long CycleGAN"): M generators cascaded A -> B and N back,
  M = N = 2 in the chapter; the adversarial losses judge the last generator of each chain, the cycle
  loss runs through all of them; the proxy applies G_AB^M o ... o G_AB^1;
- `cyclegan-nest` (eq. 8.7-8.11, "Nest CycleGAN"): Long plus inner cycles, the m-th an auto-encoder
  a -> G_AB^1..G_AB^m -> G_BA^(N-m+1)..G_BA^N (m = M is the outer cycle), and a similarity loss
  ||G_AB^1(a) - G_BA^1(b)||_1 that pulls the first generators' outputs towards a common domain.

Networks (Sec. 8.1.2: "the generator and discriminator in [94]", i.e. CycleGAN's):

- generator (`ResnetGenerator`): an encoder of three convolutions (7x7 stride 1, then two 3x3 stride 2),
  residual blocks of two 3x3 convolutions with a skip connection, a decoder of two stride-1/2
  (transposed) convolutions and a stride-1 7x7 output convolution with tanh; instance normalisation
  after every convolution but the output one, ReLU too but where a residual block adds its skip;
  reflection padding as in [94];
- discriminator (`cyclegan_discriminator`): the Markovian PatchGAN with four convolutions, the last
  giving a one-channel map: C64 (no norm) - C128 (stride 2) - C256 (stride 1) - 1 channel, 4x4
  kernels, instance normalisation and Leaky-ReLU 0.2 as in [94]; each logit sees a 34x34 patch.

Hyper-parameters (defaults of `generation.training.cyclegan.CycleGANTrainConfig`, Sec. 8.1.3 unless
noted): Adam with learning rate 2e-4 and weight decay 5e-4, lambda = 10 for the cycle (and inner-cycle)
losses, LSGAN, 200 epochs of unpaired, randomly shuffled domains; from [94], which Sec. 8.1.3 follows
"for fairness": Adam betas (0.5, 0.999), N(0, 0.02) initialisation, a history pool of 50 generated
images per discriminator, 9 residual blocks at 256x256 and 6 below, 64 channels in the first layer.
The chapter gives no weight for the similarity loss (8.11 is "added"): 1.

Deviations, for the 2-core CPU this project trains on (all configurable): 64x64 images instead of
256x256 (so 6 residual blocks, [94]'s choice below 256), mini-batches of 4 instead of 1 (instance
normalisation makes each image's output independent of the batch), 2 epochs by default instead of 200
(--epochs for more, on a GPU), and 4x4 stride-2 transposed convolutions in the decoder (an exact 2x
upsampling; [94] uses 3x3 with an output padding of one pixel). Cost at the defaults on one CPU core: a
step of 4 images takes ~3 s (vanilla), ~6.5 s (Long), ~8.5 s (Nest), so an epoch of VITON's 3,639
training pairs ~45 min, ~1.7 h and ~2.1 h.

Example:
    >>> import torch
    >>> from generation.proxies import create_proxy
    >>> proxy = create_proxy("cyclegan-long", width=8, n_blocks=2).eval()   # untrained, two generators A -> B
    >>> proxy(torch.rand(2, 3, 256, 192)).shape
    torch.Size([2, 3, 256, 192])
    >>> len(proxy.generator)
    2
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from generation.gan import conv_block, init_gan_weights, up_block
from generation.generator_proxy import GeneratorProxy, build_seeded
from generation.pix2pix import PatchDiscriminator
from generation.proxies import PROXIES

#: Image sides a CycleGAN proxy works at: the paper's 256, and smaller ones for the CPU (32 for tests).
CYCLEGAN_SIZES = (32, 64, 128, 256)

# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """x + (3x3 conv -> IN -> ReLU -> 3x3 conv -> IN)(x), reflection-padded: [94]'s residual block.

    Shape:
        - Input: (B, channels, H, W).
        - Output: (B, channels, H, W).
    """

    def __init__(self, channels: int):
        super().__init__()
        options = {"kernel_size": 3, "stride": 1, "padding": 1, "norm": "instance", "padding_mode": "reflect"}
        self.body = nn.Sequential(
            conv_block(channels, channels, activation="relu", **options),
            conv_block(channels, channels, activation=None, **options),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator: 3-convolution encoder, residual blocks, 2 transposed convolutions, 7x7 output.

    c7s1-w, d2w, d4w (3x3 stride 2), `n_blocks` x R4w, u2w, uw (4x4 stride 1/2), c7s1-3 + tanh; instance
    norm and ReLU after every convolution but the last. [94] uses w = 64 and 9 blocks at 256x256, 6 below.

    Args:
        width: channels of the first convolution (w).
        n_blocks: residual blocks at a quarter of the resolution.
        in_channels, out_channels: image channels.

    Shape:
        - Input: (B, in_channels, H, W) in [-1, 1], H and W divisible by 4.
        - Output: (B, out_channels, H, W) in [-1, 1] (tanh).

    Example:
        >>> ResnetGenerator(width=8, n_blocks=2)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, width: int = 64, n_blocks: int = 6, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        if n_blocks < 0 or width < 1:
            raise ValueError(f"a ResNet generator needs width >= 1 and n_blocks >= 0, got {width}, {n_blocks}")
        w = int(width)
        reflect = {"padding_mode": "reflect", "norm": "instance", "activation": "relu"}
        self.encoder = nn.Sequential(
            conv_block(in_channels, w, kernel_size=7, stride=1, padding=3, **reflect),
            conv_block(w, 2 * w, kernel_size=3, stride=2, padding=1, norm="instance", activation="relu"),
            conv_block(2 * w, 4 * w, kernel_size=3, stride=2, padding=1, norm="instance", activation="relu"),
        )
        self.blocks = nn.Sequential(*[ResidualBlock(4 * w) for _ in range(int(n_blocks))])
        self.decoder = nn.Sequential(
            up_block(4 * w, 2 * w, norm="instance"),
            up_block(2 * w, w, norm="instance"),
            conv_block(
                w,
                out_channels,
                kernel_size=7,
                stride=1,
                padding=3,
                norm=False,
                activation="tanh",
                padding_mode="reflect",
            ),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(
                f"the ResNet generator takes (B, C, H, W) with H and W divisible by 4, got {tuple(images.shape)}"
            )
        return self.decoder(self.blocks(self.encoder(images)))


def cyclegan_discriminator(width: int = 64, in_channels: int = 3) -> PatchDiscriminator:
    """The chapter's 4-convolution PatchGAN on single images: C(w) - C(2w) - C(4w, stride 1) - 1 channel.

    `generation.pix2pix.PatchDiscriminator` with one stride-2 layer fewer (two instead of three: four
    convolutions in all, 34x34 patches) and instance normalisation.

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, 1, H / 4 - 2, W / 4 - 2) logits (14x14 at 64x64, 6x6 at 32x32).

    Example:
        >>> cyclegan_discriminator(width=8)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1, 14, 14])
    """
    return PatchDiscriminator(in_channels=in_channels, width=width, n_layers=2, norm="instance")


def generator_chain(length: int, width: int, n_blocks: int) -> nn.Sequential:
    """`length` ResNet generators applied one after the other (Long CycleGAN's G^1 .. G^M), N(0, 0.02)-initialised.

    Example:
        >>> len(generator_chain(2, width=4, n_blocks=1))
        2
    """
    if length < 1:
        raise ValueError(f"a generator chain needs at least one generator, got {length}")
    return nn.Sequential(*[init_gan_weights(ResnetGenerator(width, n_blocks)) for _ in range(int(length))])


# --------------------------------------------------------------------------------------------------
# Proxies
# --------------------------------------------------------------------------------------------------


@PROXIES.register("cyclegan")
class CycleGANProxy(GeneratorProxy):
    """Vanilla CycleGAN's G_AB as a proxy: person photo -> product photo, trained unpaired (Sec. 8.1.1).

    `self.generator` is an `nn.Sequential` of the A -> B chain (one generator here, `generators` of them
    for Long and Nest), so `GeneratorProxy.forward` applies G_AB^M o ... o G_AB^1.

    Config:
        image_size: one of CYCLEGAN_SIZES (the chapter: 256; default 64 for the CPU).
        width: channels of each generator's first convolution ([94]: 64).
        n_blocks: residual blocks per generator ([94]: 9 at 256x256, 6 below).
    """

    default_conf: Dict[str, Any] = {"image_size": 64, "width": 64, "n_blocks": 6}

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.check_image_size()
        if self.chain_length < 1:
            raise ValueError(f"{self.name}: generators must be >= 1, got {self.chain_length}")
        self.generator = build_seeded(
            lambda: generator_chain(self.chain_length, int(self.conf["width"]), int(self.conf["n_blocks"]))
        )

    @property
    def chain_length(self) -> int:
        """M, the generators of each direction (1 for the vanilla CycleGAN)."""
        return int(self.conf.get("generators", 1))

    def check_image_size(self) -> int:
        """conf["image_size"], refused unless one of CYCLEGAN_SIZES."""
        size = int(self.conf["image_size"])
        if size not in CYCLEGAN_SIZES:
            raise ValueError(f"{self.name}: image_size must be one of {CYCLEGAN_SIZES}, got {size}")
        return size


@PROXIES.register("cyclegan-long")
class LongCycleGANProxy(CycleGANProxy):
    """Long CycleGAN's A -> B chain (eq. 8.4-8.6): `generators` ResNet generators cascaded, M = N = 2 in the chapter.

    Config: CycleGANProxy's, plus generators: M (and N, the B -> A chain of the training).
    """

    default_conf: Dict[str, Any] = {**CycleGANProxy.default_conf, "generators": 2}


@PROXIES.register("cyclegan-nest")
class NestCycleGANProxy(LongCycleGANProxy):
    """Nest CycleGAN's A -> B chain: Long CycleGAN's networks, trained with inner cycles and the similarity
    loss as well (eq. 8.7-8.11); at inference the same cascade as `cyclegan-long`."""
