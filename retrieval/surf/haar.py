"""Haar wavelets on the padded integral image, for SURF's orientation and descriptor (`retrieval.surf`, steps 4-5).

Also the keypoint packing both steps share: the real keypoints of a padded batch as one flat list,
evaluated in blocks that bound memory.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from retrieval.surf.integral import PaddedIntegral

#: Haar wavelets evaluated per block of keypoints: bounds the temporaries (~100 bytes per wavelet).
_SAMPLES_PER_BLOCK = 1 << 16

# Corner and edge-midpoint look-ups of a Haar square, in units of its half-side: tl tm tr ml mr bl bm br.
_CORNER_X = (-1.0, 0.0, 1.0, -1.0, 1.0, -1.0, 0.0, 1.0)
_CORNER_Y = (-1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0)
# dx = (br - bm - tr + tm) - (bm - bl - tm + tl): right half minus left half; dy: bottom minus top.
_HAAR_WEIGHTS = (
    (-1.0, 2.0, -1.0, 0.0, 0.0, 1.0, -2.0, 1.0),
    (-1.0, 0.0, 1.0, 2.0, -2.0, -1.0, 0.0, 1.0),
)


def haar_wavelet_responses(
    integral: PaddedIntegral, image_index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, side: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Haar wavelet responses of side ``side`` centred at (x, y): dx = right - left half, dy = bottom - top.

    Unnormalised sums as in the paper (a response grows with the wavelet area). Positions and
    sides may be fractional: eight bilinear look-ups of the integral image per wavelet (corners
    and edge midpoints of its square), which is the exact box sum of the piecewise-constant image.
    A centre beyond the padded border is moved back to where the wavelet still lies in the
    replicated zone, which leaves its response unchanged (the replicated image is constant
    across the border); wavelets wider than the margin are cut at the padded border.

    The wavelets of all images are evaluated in one `grid_sample` call on the integral images
    stacked vertically (each keeps to its own rows), so no work is spent on padding keypoints.

    Args:
        integral: from `padded_integral_image`.
        image_index: the image (0..B-1) of each wavelet.
        x, y: centres in pixels; side: sides in pixels.

    Shape:
        - image_index, x, y, side: (P,)
        - output: two (P,) float32
    """
    table, margin = integral.table, integral.margin
    rows_per_image, padded_width = table.shape[1], table.shape[2] - 1
    padded_height = rows_per_image - 1
    r = side.to(torch.float64) / 2
    # Pixel c covers [c - 0.5, c + 0.5] of the image, i.e. [c + margin, c + margin + 1] of its table.
    reach = (margin - r).clamp_min(0.0)
    u = torch.minimum(torch.maximum(x.to(torch.float64), -0.5 - reach), integral.width - 0.5 + reach) + (0.5 + margin)
    v = torch.minimum(torch.maximum(y.to(torch.float64), -0.5 - reach), integral.height - 0.5 + reach) + (0.5 + margin)
    total_height = table.shape[0] * rows_per_image - 1  # of the stacked tables, in grid_sample's terms
    corner_x = torch.tensor(_CORNER_X, dtype=torch.float64, device=table.device)[:, None]
    corner_y = torch.tensor(_CORNER_Y, dtype=torch.float64, device=table.device)[:, None]
    # (8, P) corner coordinates: a corner-major layout keeps every elementwise op long and contiguous.
    grid_x = torch.addcmul(u[None], r[None], corner_x)
    grid_y = torch.addcmul(v[None], r[None], corner_y)
    if len(r) and float(r.max()) > margin:  # wider than the padding: cut at the padded border
        grid_x = grid_x.clamp(0, padded_width)
        grid_y = grid_y.clamp(0, padded_height)
    grid_y = grid_y + image_index.to(torch.float64) * rows_per_image
    grid = torch.stack([grid_x * (2.0 / padded_width) - 1.0, grid_y * (2.0 / total_height) - 1.0], dim=-1)
    stacked = table.reshape(1, 1, -1, table.shape[2])
    looked_up = F.grid_sample(stacked, grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    responses = (torch.tensor(_HAAR_WEIGHTS, dtype=torch.float64, device=table.device) @ looked_up).float()  # (2, P)
    return responses[0], responses[1]


def _keypoint_blocks(n_keypoints: int, samples_per_keypoint: int, device: torch.device) -> List[slice]:
    """Slices of a packed keypoint list that keep each block near `_SAMPLES_PER_BLOCK` wavelets (x16 on CUDA)."""
    budget = _SAMPLES_PER_BLOCK * (16 if device.type == "cuda" else 1)  # GPUs want fewer, larger kernels
    per_block = max(1, budget // max(1, samples_per_keypoint))
    return [slice(start, min(start + per_block, n_keypoints)) for start in range(0, n_keypoints, per_block)]


def _pack_keypoints(integral: PaddedIntegral, keypoints: torch.Tensor, scales: torch.Tensor, mask) -> Tuple:
    """Check shapes; return the mask and the real keypoints as flat (M,) image index, (M, 2) xy, (M,) scale."""
    if not isinstance(integral, PaddedIntegral):
        raise TypeError(f"expected a PaddedIntegral (see padded_integral_image), got {type(integral).__name__}")
    batch = integral.table.shape[0]
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2 or keypoints.shape[0] != batch:
        raise ValueError(f"keypoints must be (B, N, 2) with B = {batch}, got {tuple(keypoints.shape)}")
    if scales.shape != keypoints.shape[:2]:
        raise ValueError(f"scales {tuple(scales.shape)} must be (B, N) matching keypoints {tuple(keypoints.shape)}")
    if mask is None:
        mask = torch.ones(scales.shape, dtype=torch.bool, device=scales.device)
    elif mask.shape != scales.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match scales {tuple(scales.shape)}")
    image_index = torch.arange(batch, device=scales.device)[:, None].expand_as(mask)[mask]
    return mask, image_index, keypoints[mask].to(torch.float64), scales[mask].to(torch.float64)
