"""SURF orientation assignment (`retrieval.surf`, step 4): the dominant direction of Haar responses in a disc."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from retrieval.surf.haar import _keypoint_blocks, _pack_keypoints, haar_wavelet_responses
from retrieval.surf.integral import PaddedIntegral

#: Orientation: samples within radius 6s, step s; Gaussian sigma 2s; Haar side 4s; window pi / 3.
ORIENTATION_RADIUS = 6
ORIENTATION_SIGMA = 2.0
ORIENTATION_HAAR_SIDE = 4.0
ORIENTATION_BINS = 42  # 2 pi / 42 per bin, so that the pi / 3 window is exactly 7 bins
ORIENTATION_WINDOW_BINS = 7


def haar_margin(max_scale: float) -> int:
    """Padding that keeps the orientation wavelets (side 4s, the largest) exact up to scale `max_scale`."""
    return int(math.ceil(ORIENTATION_HAAR_SIDE * max(float(max_scale), 0.0))) + 1


def _orientation_samples(device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer (i, j) with i^2 + j^2 < 36 (109 points, in units of s) and their Gaussian weights."""
    ticks = torch.arange(-ORIENTATION_RADIUS, ORIENTATION_RADIUS + 1, device=device, dtype=torch.float64)
    jj, ii = torch.meshgrid(ticks, ticks, indexing="ij")
    inside = ii**2 + jj**2 < ORIENTATION_RADIUS**2
    offsets = torch.stack([ii[inside], jj[inside]], dim=1)  # (S, 2) xy
    weights = torch.exp(-(offsets**2).sum(dim=1) / (2 * ORIENTATION_SIGMA**2))
    return offsets, weights.float()


def _wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Radians -> float32 in [0, 2 pi) (a tiny negative angle must not round up to 2 pi in float32)."""
    wrapped = torch.remainder(angle.double(), 2 * math.pi).float()
    return torch.where(wrapped >= 2 * math.pi, torch.zeros_like(wrapped), wrapped)


def surf_orientation(
    integral: PaddedIntegral, keypoints: torch.Tensor, scales: torch.Tensor, mask: torch.Tensor = None
) -> torch.Tensor:
    """Dominant orientation per keypoint (Bay et al. 2008, 4.1), all keypoints of the batch at once.

    Each Gaussian-weighted Haar response (dx, dy) of the disc is a point in the plane; the
    orientation is the direction of the largest sum of the responses whose angle falls in a
    window of pi/3. The angle axis is cut into 42 bins of pi/21, so the window is exactly 7 bins
    and its 42 positions (start angles k pi/21, the reference code's 0.15 rad step) are a circular
    running sum over the bin sums.

    Args:
        integral: `padded_integral_image` with a margin of at least `haar_margin(scales.max())`.
        keypoints: xy in pixels.
        scales: s per keypoint.
        mask: False for padding entries (their output is 0); None means all real.

    Returns:
        Angles in radians, [0, 2 pi), of ``atan2(dy, dx)`` in image axes; 0 for a keypoint with no
        gradient around it.

    Shape:
        - keypoints: (B, N, 2) xy; scales, mask: (B, N)
        - output: (B, N) float32
    """
    mask, image_index, xy, s = _pack_keypoints(integral, keypoints, scales, mask)
    device = integral.table.device
    offsets, weights = _orientation_samples(device)
    n_samples = len(offsets)
    packed = torch.zeros(len(s), dtype=torch.float32, device=device)
    bin_width = 2 * math.pi / ORIENTATION_BINS
    for block in _keypoint_blocks(len(s), n_samples, device):
        n = len(s[block])
        scale = s[block, None]
        dx, dy = haar_wavelet_responses(
            integral,
            image_index[block, None].expand(n, n_samples).reshape(-1),
            (xy[block, 0:1] + scale * offsets[:, 0]).reshape(-1),
            (xy[block, 1:2] + scale * offsets[:, 1]).reshape(-1),
            (ORIENTATION_HAAR_SIDE * scale).expand(n, n_samples).reshape(-1),
        )
        dx = dx.view(n, n_samples) * weights
        dy = dy.view(n, n_samples) * weights
        bins = (torch.atan2(dy, dx) % (2 * math.pi) / bin_width).long().clamp(max=ORIENTATION_BINS - 1)
        sums = torch.zeros(2, n, ORIENTATION_BINS, dtype=torch.float32, device=device)
        sums[0].scatter_add_(1, bins, dx)
        sums[1].scatter_add_(1, bins, dy)
        # Window k covers bins k..k+6 (mod 42): differences of wrapped cumulative sums.
        wrapped = torch.cat([sums, sums[..., : ORIENTATION_WINDOW_BINS - 1]], dim=-1)
        cumulative = F.pad(wrapped.cumsum(-1), (1, 0))
        windows = cumulative[..., ORIENTATION_WINDOW_BINS:] - cumulative[..., :-ORIENTATION_WINDOW_BINS]
        best = (windows**2).sum(dim=0).argmax(dim=-1, keepdim=True)  # (n, 1), first maximum
        packed[block] = _wrap_angle(torch.atan2(windows[1].gather(-1, best), windows[0].gather(-1, best))[:, 0])
    orientation = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    orientation[mask] = packed
    return orientation
