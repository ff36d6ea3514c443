"""The SURF descriptor (`retrieval.surf`, step 5): 64-d or 128-d sums of Haar responses in an oriented window."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from retrieval.surf.haar import _keypoint_blocks, _pack_keypoints, haar_wavelet_responses
from retrieval.surf.integral import PaddedIntegral

#: Descriptor: 20s window, 4x4 subregions of 5x5 samples, Haar side 2s, Gaussian sigma 3.3s.
DESCRIPTOR_GRID = 20
DESCRIPTOR_SUBREGIONS = 4
DESCRIPTOR_SIGMA = 3.3
DESCRIPTOR_HAAR_SIDE = 2.0


def _descriptor_samples(device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample centres in units of s ((k - 9.5), k = 0..19, row-major) and the Gaussian-weighted
    sample-to-subregion matrix that sums them per subregion.

    Returns:
        offsets (400, 2) as (u, v); pooling (400, 16) float32 with ``pooling[k, c] = w_k`` when
        sample k lies in subregion c (subregions row-major), else 0.
    """
    ticks = torch.arange(DESCRIPTOR_GRID, device=device, dtype=torch.float64) - (DESCRIPTOR_GRID - 1) / 2
    vv, uu = torch.meshgrid(ticks, ticks, indexing="ij")
    offsets = torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=1)
    weights = torch.exp(-(offsets**2).sum(dim=1) / (2 * DESCRIPTOR_SIGMA**2))
    cells = DESCRIPTOR_GRID // DESCRIPTOR_SUBREGIONS
    index = torch.arange(DESCRIPTOR_GRID, device=device) // cells
    subregion = (index[:, None] * DESCRIPTOR_SUBREGIONS + index[None, :]).reshape(-1)
    pooling = F.one_hot(subregion, DESCRIPTOR_SUBREGIONS**2).to(torch.float64) * weights[:, None]
    return offsets, pooling.float()


def surf_descriptor(
    integral: PaddedIntegral,
    keypoints: torch.Tensor,
    scales: torch.Tensor,
    orientations: torch.Tensor,
    extended: bool = False,
    mask: torch.Tensor = None,
) -> torch.Tensor:
    """SURF descriptor (Bay et al. 2008, 4.2): 64-d, or 128-d with ``extended`` (SURF-128).

    The window is a 20s square centred at the keypoint with its u axis along the orientation.
    At the centres of a 20x20 grid (spacing s) Haar wavelets of side 2s give image-axis
    responses, rotated into the window frame (du along u, dv along v) and weighted by a Gaussian
    of sigma 3.3s. Each of the 4x4 subregions (5x5 samples) contributes
    (sum du, sum dv, sum |du|, sum |dv|); extended splits the du sums by the sign of dv and the dv
    sums by the sign of du (8 values, OpenCV's order: du, |du| for dv >= 0 then dv < 0; dv, |dv| for
    du >= 0 then du < 0). The vector is L2-normalised (an all-zero one stays zero).

    Args:
        integral: `padded_integral_image` with a margin of at least ``2 * scales.max() + 1``.
        keypoints, scales, orientations (radians): as returned by the detector / `surf_orientation`.
        extended: 128-d instead of 64-d.
        mask: False for padding entries (their rows are 0); None means all real.

    Shape:
        - keypoints: (B, N, 2) xy; scales, orientations, mask: (B, N)
        - output: (B, N, 64 or 128) float32, subregion-major (subregion rows, then columns)
    """
    mask, image_index, xy, s = _pack_keypoints(integral, keypoints, scales, mask)
    if orientations.shape != scales.shape:
        raise ValueError(f"orientations {tuple(orientations.shape)} must match scales {tuple(scales.shape)}")
    theta = orientations[mask].to(torch.float64)
    device = integral.table.device
    out_dim = DESCRIPTOR_SUBREGIONS**2 * (8 if extended else 4)
    offsets, pooling = _descriptor_samples(device)
    n_samples = len(offsets)
    packed = torch.zeros(len(s), out_dim, dtype=torch.float32, device=device)
    for block in _keypoint_blocks(len(s), n_samples, device):
        n = len(s[block])
        scale = s[block, None]
        cos, sin = torch.cos(theta[block, None]), torch.sin(theta[block, None])
        u, v = offsets[:, 0], offsets[:, 1]
        dx, dy = haar_wavelet_responses(
            integral,
            image_index[block, None].expand(n, n_samples).reshape(-1),
            (xy[block, 0:1] + scale * (u * cos - v * sin)).reshape(-1),
            (xy[block, 1:2] + scale * (u * sin + v * cos)).reshape(-1),
            (DESCRIPTOR_HAAR_SIDE * scale).expand(n, n_samples).reshape(-1),
        )
        dx, dy = dx.view(n, n_samples), dy.view(n, n_samples)
        cos, sin = cos.float(), sin.float()
        du = cos * dx + sin * dy
        dv = cos * dy - sin * dx
        if extended:
            zero = torch.zeros((), dtype=du.dtype, device=device)
            dv_positive, du_positive = dv >= 0, du >= 0
            du_split = (torch.where(dv_positive, du, zero), torch.where(dv_positive, zero, du))
            dv_split = (torch.where(du_positive, dv, zero), torch.where(du_positive, zero, dv))
            parts = [
                du_split[0],
                du_split[0].abs(),
                du_split[1],
                du_split[1].abs(),
                dv_split[0],
                dv_split[0].abs(),
                dv_split[1],
                dv_split[1].abs(),
            ]
        else:
            parts = [du, dv, du.abs(), dv.abs()]
        # Gaussian weighting and the per-subregion sums in one product: (n, parts, 400) @ (400, 16).
        pooled = torch.stack(parts, dim=1) @ pooling
        packed[block] = F.normalize(pooled.transpose(1, 2).reshape(n, out_dim), dim=-1)
    out = torch.zeros(*mask.shape, out_dim, dtype=torch.float32, device=device)
    out[mask] = packed
    return out
