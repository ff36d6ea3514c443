"""DTGAN-style association GAN as a proxy baseline: person photo -> product photo with two discriminators.

The PaintNet paper's DTGAN baseline (000_*.txt, Sec. 4.2) is the pixel-level domain transfer GAN of Yoo
et al. (2016), "Pixel-level domain transfer": one generator, a real/fake discriminator and an
association (domain) discriminator that judges (source photo, target product) pairs; the shape is not
constrained. 003_*.txt ("Image-product transformation based on cross-domain GANs") gives the variant
built here:

- generator (Sec. 3.1.1): a 64x64 photo in, a 64x64 product out. The encoder is ResNet-50 without its
  max- and average-pooling (a stride-2 stem, then stages of bottleneck residual blocks, three of them with
  stride 2: 64 -> 4 pixels); the decoder is ResNet-34 reversed (stages of basic residual blocks, each
  stage opening with a 2x upsampling block: 4 -> 64 pixels), then a 7x7 convolution to 3 channels and tanh;
- real/fake discriminator (Sec. 3.1.2): 4 stride-2 convolutions (64 -> 4 pixels, 128 -> 1024 channels)
  and a binary output (here a 4x4 valid convolution to one logit);
- association discriminator (Sec. 3.1.3): the same network on 6-channel (photo, product) pairs;
- losses (Sec. 3.2): the GAN log-loss for each discriminator; the generator minimises
  1/2 L(D_rf) + 1/2 L(D_A), the two discriminators with equal weight; no pixel loss;
- Algorithm 1: per mini-batch, update D_rf, then D_A, then G.

From Yoo et al. (which 003 cites for the association discriminator), the association discriminator
also sees real but unassociated pairs as negatives: positives are (photo, its own product), negatives
are (photo, generated product) and (photo, the product of another pair), and the three kinds weigh
equally in its loss (an equal-probability draw of the three, as PaintNet's relevance discriminator).
Unassociated products are drawn uniformly from every training pair with another product id
(`generation.training.gan.draw_unassociated`, with the losses, the step and `DTGANTrainConfig`).

Deviations, for the 2-core CPU this project trains on (all configurable back to 003's sizes):
channel widths and block counts are scaled down (default generator: stem 32 channels, one bottleneck
per stage up to 1024 channels at 4x4 instead of ResNet-50's (3, 4, 6, 3) up to 2048; one basic block
per decoder stage, 256 -> 32 channels, instead of ResNet-34's (3, 6, 4, 3), 512 -> 64; discriminators
32 -> 256 channels instead of 128 -> 1024), and all three networks use Adam (lr 2e-4, betas (0.5,
0.999)): 003 reports Adam beating SGD for its plain generator and used SGD for the residual one only
to save computation.

Example:
    >>> import torch
    >>> from generation.proxies import create_proxy
    >>> proxy = create_proxy("dtgan").eval()                       # untrained: grey output
    >>> proxy(torch.rand(2, 3, 256, 192)).shape
    torch.Size([2, 3, 256, 192])
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import conv_block, init_gan_weights
from generation.generator_proxy import GeneratorProxy, build_seeded
from generation.proxies import PROXIES

# --------------------------------------------------------------------------------------------------
# Residual generator
# --------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block: 1x1 reduce, 3x3 (with the stride), 1x1 expand (x4), plus a shortcut.

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, 4 * width, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UpBasicBlock(nn.Module):
    """ResNet-34's basic block run backwards: two 3x3 convolutions after an optional 2x upsampling.

    With `upsample`, the first convolution is a 4x4 stride-2 transposed convolution and the shortcut a
    nearest-neighbour upsampling followed by a 1x1 convolution (the mirror of ResNet's strided shortcut).

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, out_channels, 2H, 2W) with `upsample`, else (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False):
        super().__init__()
        first = (
            nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False)
            if upsample
            else nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        )
        self.body = nn.Sequential(
            first,
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        shortcut = []
        if upsample:
            shortcut.append(nn.Upsample(scale_factor=2, mode="nearest"))
        if upsample or in_channels != out_channels:
            shortcut += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.shortcut = nn.Sequential(*shortcut) if shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResidualGenerator(nn.Module):
    """003's generator: a ResNet-50-style encoder (no pooling) and a reversed ResNet-34-style decoder.

    Encoder: 7x7 stride-2 stem (`stem_width` = w channels), then one bottleneck stage per entry of
    `encoder_blocks`, the first at stride 1 and the others at stride 2, bottleneck widths w * (1, 2, 4, 8)
    (outputs 4x those, 32w at the end): 64 -> 32 -> 32 -> 16 -> 8 -> 4 pixels.
    Decoder, ResNet-34's stages in reverse: basic-block stages of 8w, 4w, 2w, w channels at 4, 8, 16, 32
    pixels (each stage after the first opens with a 2x upsampling block), then the reversed stem (a 2x
    upsampling block of w channels, 64 pixels), a 7x7 convolution to `out_channels` and tanh.
    003 used w = 64, encoder (3, 4, 6, 3) (ResNet-50: 2048 channels at 4x4) and decoder (3, 6, 4, 3)
    (ResNet-34 reversed: 512 -> 64 channels).

    Shape:
        - Input: (B, in_channels, S, S) in [-1, 1], S divisible by 16 (64 in 003).
        - Output: (B, out_channels, S, S) in [-1, 1]; `encode` gives (B, 32 * stem_width, S / 16, S / 16).

    Example:
        >>> ResidualGenerator(stem_width=8)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self,
        stem_width: int = 32,
        encoder_blocks: Sequence[int] = (1, 1, 1, 1),
        decoder_blocks: Sequence[int] = (1, 1, 1, 1),
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        if len(encoder_blocks) != 4 or len(decoder_blocks) != 4 or min(*encoder_blocks, *decoder_blocks) < 1:
            raise ValueError(
                f"encoder_blocks and decoder_blocks need 4 stages of >= 1 block, got {encoder_blocks}, {decoder_blocks}"
            )
        w = int(stem_width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        stages = []
        channels = w
        for stage, n_blocks in enumerate(encoder_blocks):
            width = w * 2**stage
            blocks = []
            for block in range(n_blocks):
                blocks.append(Bottleneck(channels, width, stride=2 if stage > 0 and block == 0 else 1))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.encoder = nn.Sequential(*stages)
        self.bottleneck_channels = channels
        stages = []
        for stage, n_blocks in enumerate(decoder_blocks):
            out_ch = 8 * w // 2**stage
            first = UpBasicBlock(channels, out_ch, upsample=stage > 0)
            stages.append(nn.Sequential(first, *[UpBasicBlock(out_ch, out_ch) for _ in range(n_blocks - 1)]))
            channels = out_ch
        stages.append(UpBasicBlock(channels, w, upsample=True))  # the stem, reversed
        self.decoder = nn.Sequential(*stages)
        self.to_image = nn.Sequential(nn.Conv2d(w, out_channels, 7, 1, 3), nn.Tanh())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] % 16 or images.shape[-2] % 16:
            raise ValueError(
                f"the residual generator takes (B, C, H, W) with H and W divisible by 16, got {tuple(images.shape)}"
            )
        return self.encoder(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decoder(self.encode(images)))


class DcganDiscriminator(nn.Module):
    """003's discriminator: 4 stride-2 4x4 convolutions (width, 2, 4, 8 x width) then one logit.

    The real/fake discriminator takes 3-channel products, the association discriminator 6-channel
    (photo, product) pairs; both have this architecture (003, Sec. 3.1.3). No BatchNorm on the first
    layer (DCGAN); the last layer is a valid convolution over the remaining S/16 x S/16 map.

    Shape:
        - Input: (B, in_channels, S, S), S divisible by 16.
        - Output: (B,) logits.

    Example:
        >>> DcganDiscriminator(6, width=8)(torch.zeros(2, 6, 64, 64)).shape
        torch.Size([2])
    """

    def __init__(self, in_channels: int = 3, width: int = 64, image_size: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, width, norm=False),
            conv_block(width, 2 * width),
            conv_block(2 * width, 4 * width),
            conv_block(4 * width, 8 * width),
        )
        side = image_size // 16
        self.logit = nn.Conv2d(8 * width, 1, side, 1, 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(images)).flatten()


# --------------------------------------------------------------------------------------------------
# Proxy
# --------------------------------------------------------------------------------------------------


@PROXIES.register("dtgan")
class DTGANProxy(GeneratorProxy):
    """DTGAN-style baseline: residual generator from the person photo, real/fake + association discriminators.

    Config:
        image_size: 64 (003) or 128.
        stem_width: channels of the generator's stem (003: 64, ResNet-50; default 32 for this CPU).
        encoder_blocks, decoder_blocks: residual blocks per stage (003: (3, 4, 6, 3) and (3, 6, 4, 3)).
    """

    default_conf: Dict[str, Any] = {
        "image_size": 64,
        "stem_width": 32,
        "encoder_blocks": (1, 1, 1, 1),
        "decoder_blocks": (1, 1, 1, 1),
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.check_image_size()
        self.generator = build_seeded(
            lambda: init_gan_weights(
                ResidualGenerator(
                    stem_width=int(self.conf["stem_width"]),
                    encoder_blocks=tuple(int(b) for b in self.conf["encoder_blocks"]),
                    decoder_blocks=tuple(int(b) for b in self.conf["decoder_blocks"]),
                )
            )
        )
