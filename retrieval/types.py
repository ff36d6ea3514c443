"""Core feature types. Images everywhere are (B, 3, H, W) float32 in [0, 1], RGB."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


@dataclass
class InputSpec:
    """What a descriptor wants its images to look like before `extract`.

    size: (H, W) the loader resizes to, so a batch can be stacked.
    grey: the descriptor works on luminance only (it still receives RGB and converts itself).
    mean/std: normalisation the descriptor applies itself (informative for users).
    """

    size: Tuple[int, int] = (256, 192)
    grey: bool = False
    mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: Tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class GlobalFeatures:
    """One vector per image.

    Shape:
        desc: (B, D) float32, L2-normalised rows.
    """

    desc: torch.Tensor

    def __post_init__(self) -> None:
        if self.desc.ndim != 2:
            raise ValueError(f"GlobalFeatures.desc must be (B, D), got {tuple(self.desc.shape)}")


@dataclass
class LocalFeatures:
    """A padded set of local features per image.

    Shape:
        keypoints: (B, N, 2) xy in pixels of the descriptor's input image.
        desc: (B, N, D) float32.
        scores: (B, N) detector or attention score.
        mask: (B, N) bool, True for real features, False for padding.
        scales, orientations: optional (B, N).
    """

    keypoints: torch.Tensor
    desc: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    scales: Optional[torch.Tensor] = None
    orientations: Optional[torch.Tensor] = None
    image_size: Tuple[int, int] = field(default=(0, 0))

    def __post_init__(self) -> None:
        b, n = self.desc.shape[:2]
        if self.keypoints.shape != (b, n, 2) or self.mask.shape != (b, n) or self.scores.shape != (b, n):
            raise ValueError(
                "LocalFeatures shapes disagree: keypoints "
                f"{tuple(self.keypoints.shape)}, desc {tuple(self.desc.shape)}, "
                f"scores {tuple(self.scores.shape)}, mask {tuple(self.mask.shape)}"
            )
