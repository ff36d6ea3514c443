"""Step 1 of SURF (`retrieval.surf`): the summed-area table, in float64, and its replicate-padded variant.

Any box sum costs four look-ups of it; the precision argument and the off-image convention are in the
package docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def integral_image(grey: torch.Tensor) -> torch.Tensor:
    """Summed-area table with a leading zero row and column, in float64 (see the package docstring).

    ``out[b, y, x] = sum(grey[b, :y, :x])``, so the sum over rows y0..y1-1, columns x0..x1-1 is
    ``out[y1, x1] - out[y0, x1] - out[y1, x0] + out[y0, x0]``.

    Shape:
        - grey: (B, H, W)
        - output: (B, H + 1, W + 1) float64

    Example:
        >>> integral_image(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))[0]
        tensor([[ 0.,  0.,  0.],
                [ 0.,  1.,  3.],
                [ 0.,  4., 10.]], dtype=torch.float64)
    """
    if grey.ndim != 3:
        raise ValueError(f"expected grey images of shape (B, H, W), got {tuple(grey.shape)}")
    table = grey.to(torch.float64).cumsum(dim=1).cumsum(dim=2)
    return F.pad(table, (1, 0, 1, 0))


@dataclass
class PaddedIntegral:
    """Integral image of an image replicate-padded by `margin` pixels on every side.

    Haar wavelets of half-size up to ``margin / 2`` anywhere (even off the image) then see the
    image's border pixels repeated outwards: no edge is invented at the frame.

    Shape:
        table: (B, H + 2 margin + 1, W + 2 margin + 1) float64
    """

    table: torch.Tensor
    margin: int
    height: int
    width: int


def padded_integral_image(grey: torch.Tensor, margin: int) -> PaddedIntegral:
    """`integral_image` of ``grey`` replicate-padded by ``margin`` (see `PaddedIntegral`).

    Shape:
        - grey: (B, H, W)
    """
    if grey.ndim != 3:
        raise ValueError(f"expected grey images of shape (B, H, W), got {tuple(grey.shape)}")
    margin = int(margin)
    padded = F.pad(grey[:, None].to(torch.float64), (margin,) * 4, mode="replicate")[:, 0] if margin else grey
    return PaddedIntegral(integral_image(padded), margin, int(grey.shape[1]), int(grey.shape[2]))
