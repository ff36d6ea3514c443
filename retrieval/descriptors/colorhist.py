"""Colour histogram: the classic non-learned baseline that every street-to-shop method must beat.

A joint HSV histogram (hue x saturation x value bins) with the Hellinger (square-root) mapping, so
inner product of two vectors is the Bhattacharyya coefficient of the two histograms. Near-white
pixels (the product photos' background) are left out, otherwise every product would match every
other on the colour of its backdrop.
"""

from __future__ import annotations

import kornia
import torch

from retrieval.descriptors.base import DESCRIPTORS, Descriptor
from retrieval.types import GlobalFeatures, InputSpec


def hsv_histogram(
    images: torch.Tensor, bins=(8, 4, 4), white_threshold: float = 0.92, centre_sigma: float | None = None
) -> torch.Tensor:
    """Joint HSV histograms, batched (one scatter-add, no loop over pixels or images).

    `centre_sigma` (a fraction of the image height and width) weights pixels by a Gaussian around the
    image centre, where a garment sits in both a person photo and a product photo; None weights all equally.

    Shape:
        - images: (B, 3, H, W) RGB in [0, 1]
        - Output: (B, bins_h * bins_s * bins_v), each row sums to 1 (uniform if every pixel is white).
    """
    hsv = kornia.color.rgb_to_hsv(images)  # h in [0, 2pi], s and v in [0, 1]
    hue = hsv[:, 0] / (2 * torch.pi)
    n_h, n_s, n_v = bins
    h_bin = (hue * n_h).long().clamp(0, n_h - 1)
    s_bin = (hsv[:, 1] * n_s).long().clamp(0, n_s - 1)
    v_bin = (hsv[:, 2] * n_v).long().clamp(0, n_v - 1)
    joint = (h_bin * n_s + s_bin) * n_v + v_bin  # (B, H, W)
    keep = (images.min(dim=1).values < white_threshold).float()  # drop the white backdrop
    if centre_sigma is not None:
        height, width = images.shape[-2:]
        ys = (torch.arange(height, device=images.device) + 0.5) / height - 0.5
        xs = (torch.arange(width, device=images.device) + 0.5) / width - 0.5
        weight = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * centre_sigma**2))
        keep = keep * weight
    n_bins = n_h * n_s * n_v
    hist = torch.zeros(images.shape[0], n_bins, device=images.device)
    hist.scatter_add_(1, joint.flatten(1), keep.flatten(1))
    total = hist.sum(dim=1, keepdim=True)
    uniform = torch.full_like(hist, 1.0 / n_bins)
    return torch.where(total > 0, hist / total.clamp_min(1e-12), uniform)


@DESCRIPTORS.register("colorhist")
class ColorHistogram(Descriptor):
    """Centre-weighted 16x4x4 HSV histogram, Hellinger-mapped; 256-d, nothing to fit."""

    kind = "global"
    # Centre weighting and 16 hue bins were chosen on the VITON *training* split (mAP@20 0.03 without
    # centre weighting, 0.18 with sigma 0.12); the validation split agrees.
    default_conf = {"image_size": (128, 96), "bins": (16, 4, 4), "white_threshold": 0.92, "centre_sigma": 0.12}

    @property
    def dim(self) -> int:
        n_h, n_s, n_v = self.conf["bins"]
        return n_h * n_s * n_v

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]))

    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        hist = hsv_histogram(images, tuple(self.conf["bins"]), self.conf["white_threshold"], self.conf["centre_sigma"])
        return GlobalFeatures(torch.nn.functional.normalize(hist.sqrt(), dim=-1))
