"""SURF: Speeded-Up Robust Features, batched in torch (Bay, Tuytelaars & Van Gool, ECCV 2006;
Bay, Ess, Tuytelaars & Van Gool, "Speeded-Up Robust Features (SURF)", CVIU 110(3), 2008).

Why it is written here: the OpenCV wheels on PyPI (``opencv-python``, ``opencv-contrib-python``)
are built without the patented "non-free" algorithms, so ``cv2.xfeatures2d.SURF_create`` raises
there; SURF exists only in a self-built opencv-contrib with ``OPENCV_ENABLE_NONFREE``. This module
is an implementation from the papers, in pure torch: batched over images, on whatever device the
input lives (CPU or CUDA), with Python loops only over the handful of octaves and filter sizes and
over fixed-size blocks of keypoints that bound memory.

The pipeline, each step a pure function:

1. `integral_image`: summed-area table, so that any box sum costs four look-ups.
2. `box_hessian_response`: Dxx, Dyy, Dxy box filters of side L (9, 15, 21, 27 in octave 1; the
   filter-size increment doubles each octave: 15, 27, 39, 51; 27, 51, 75, 99; ...), normalised by
   the filter area L^2; ``det(H) = Dxx Dyy - (0.9 Dxy)^2`` and the Laplacian sign ``sign(Dxx + Dyy)``.
   Octave ``o`` is evaluated every ``initial_step * 2^o`` pixels. The paper assigns a filter of
   side L the scale ``s = 1.2 L / 9`` (the sigma of the Gaussian derivative it approximates).
3. `scale_space_maxima` + `refine_maxima`: threshold, 3x3x3 non-maximum suppression over
   (filter size, y, x), then a 3-D quadratic fitted to the 27 neighbours (one batched 3x3 solve);
   points whose offset exceeds half a sample in any of x, y, scale are dropped.
4. `surf_orientation`: Haar wavelet responses of side 4s at the points of a disc of radius 6s
   (step s), Gaussian-weighted (sigma 2s); the dominant orientation is that of the longest summed
   response vector in a sliding window of angle pi/3, evaluated at 42 window positions at once.
5. `surf_descriptor`: a 20s square window along that orientation, 4x4 subregions of 5x5 samples,
   Haar wavelets of side 2s, responses rotated into the keypoint frame and Gaussian-weighted
   (sigma 3.3s); per subregion (sum dx, sum dy, sum |dx|, sum |dy|) -> 64-d, or with the sums split by
   the sign of the other response -> 128-d (SURF-128); L2-normalised. U-SURF skips step 4.

Conventions: images are grey (B, H, W) floats in [0, 1] (the Hessian threshold is in those units:
``det`` of a unit-contrast blob at its own scale is about 0.06); pixel ``(x, y)`` is the centre of
column x, row y (OpenCV's keypoint convention); angles are radians of ``atan2(dy, dx)`` in image
axes (x right, y down), in [0, 2 pi).

Precision: the integral image is float64. Its values grow to H * W (49,152 at 256x192); in float32
a box sum, the difference of four such values, would carry an absolute error of ~1e-2, as large as
the response of a low-contrast garment edge. The Hessian filters first take strip differences of
the integral image in float64 (the sum of one band of rows or columns, at most band width x image
side) and continue in float32 from there; Haar responses are formed in float64 and then cast.

Off-image samples: orientation and descriptor windows of large keypoints leave the image. They are
computed on the integral image of the image replicate-padded by a margin that covers the largest
wavelet (`padded_integral_image`), so the frame invents no edge. Box corners fall between pixels;
bilinear interpolation of the integral image is the exact box sum of the piecewise-constant image
there (the integral is bilinear inside each pixel).

What the box filters are, measured (tests/retrieval/test_surf.py, benchmarks/local_eval.py): det(H) of the
box filters correlates with the Gaussian det(H) at 0.75-0.85 at the paper's sigma = 1.2 L / 9 but
at 0.93-0.97 at sigma ~= 1.6 L / 9, and a Gaussian blob of sigma_b is detected at s ~= 0.74 sigma_b
(the box lobes reach +-L/2, where a sigma = 1.2 L / 9 derivative has long decayed). We keep the
paper's s, which sizes the orientation and descriptor windows its parameters were tuned with.
Box det(H) is also positive along oblique straight edges (up to ~10% of a blob's response at 30-45
degrees), and SURF has no edge rejection: weak maxima there are the least repeatable under rotation.

Example:
    >>> grey = torch.rand(2, 96, 64, generator=torch.Generator().manual_seed(0))
    >>> feats = surf(grey, hessian_threshold=1e-3, max_keypoints=50)
    >>> feats.descriptors.shape[0], feats.descriptors.shape[2]
    (2, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

#: The relative weight of Dxy in det(H): Frobenius-norm ratio of Gaussian vs box derivatives at the
#: 9x9 filter, 0.912 (Bay et al. 2008, Eq. 4), rounded as in the paper.
HESSIAN_WEIGHT = 0.9
#: Side of the first filter, and the Gaussian sigma it approximates.
BASE_FILTER_SIZE = 9
BASE_SIGMA = 1.2
#: Filters per octave; maxima are searched in the inner n - 2.
N_INTERVALS = 4
#: Sub-pixel/sub-scale offsets larger than this (in samples) mean the extremum lies elsewhere.
MAX_OFFSET = 0.5
#: Orientation: samples within radius 6s, step s; Gaussian sigma 2s; Haar side 4s; window pi / 3.
ORIENTATION_RADIUS = 6
ORIENTATION_SIGMA = 2.0
ORIENTATION_HAAR_SIDE = 4.0
ORIENTATION_BINS = 42  # 2 pi / 42 per bin, so that the pi / 3 window is exactly 7 bins
ORIENTATION_WINDOW_BINS = 7
#: Descriptor: 20s window, 4x4 subregions of 5x5 samples, Haar side 2s, Gaussian sigma 3.3s.
DESCRIPTOR_GRID = 20
DESCRIPTOR_SUBREGIONS = 4
DESCRIPTOR_SIGMA = 3.3
DESCRIPTOR_HAAR_SIDE = 2.0
#: Default minimum det(H) (grey levels in [0, 1], area-normalised filters). Retrieval on a VITON
#: subset is flat from 1e-5 to 5e-5 and drops above (fewer, only high-contrast keypoints); 5e-5 is
#: the cheapest of the flat range (~150-250 keypoints on a 256x192 photo).
DEFAULT_HESSIAN_THRESHOLD = 5e-5
#: Haar wavelets evaluated per block of keypoints: bounds the temporaries (~100 bytes per wavelet).
_SAMPLES_PER_BLOCK = 1 << 16


@dataclass
class SURFFeatures:
    """SURF keypoints (and descriptors) of a batch, padded to the batch's largest count.

    Shape:
        keypoints: (B, N, 2) float32 xy in pixels.
        scales: (B, N) float32, the paper's scale s = 1.2 L / 9 in pixels for box filter side L.
        responses: (B, N) float32, interpolated det(H); rows are sorted by it, strongest first.
        laplacian: (B, N) int8, sign of the trace: -1 bright blob on dark, +1 dark blob on bright.
        orientations: (B, N) float32 radians in [0, 2 pi) (0 for U-SURF).
        descriptors: (B, N, 64 or 128) float32, unit L2 rows (None when only detected).
        mask: (B, N) bool, False on padding (whose entries are all zero).
    """

    keypoints: torch.Tensor
    scales: torch.Tensor
    responses: torch.Tensor
    laplacian: torch.Tensor
    mask: torch.Tensor
    orientations: torch.Tensor
    descriptors: Optional[torch.Tensor] = None


# ---- integral image and box filters ---------------------------------------------------------------
def integral_image(grey: torch.Tensor) -> torch.Tensor:
    """Summed-area table with a leading zero row and column, in float64 (see the module docstring).

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


def surf_filter_sizes(octave: int, n_intervals: int = N_INTERVALS) -> List[int]:
    """Box-filter sides of an octave (0-based): 9, 15, 21, 27 | 15, 27, 39, 51 | 27, 51, 75, 99 | ...

    Side ``3 * (2^(octave+1) * (interval+1) + 1)``: the lobe (a third of the side) grows by
    ``2^(octave+1)`` pixels per interval, so it stays odd and the filter keeps a centre pixel.
    """
    return [3 * ((2 ** (octave + 1)) * (interval + 1) + 1) for interval in range(n_intervals)]


def filter_size_to_scale(filter_size):
    """s = 1.2 L / 9: the Gaussian sigma a box filter of side L approximates (works on tensors)."""
    return filter_size * (BASE_SIGMA / BASE_FILTER_SIZE)


def _pad_integral(integral: torch.Tensor, margin: int) -> torch.Tensor:
    """Integral image with its edge rows/columns repeated `margin` times: look-ups beyond it clamp."""
    if margin == 0:
        return integral
    return F.pad(integral[:, None], (margin, margin, margin, margin), mode="replicate")[:, 0]


def _hessian_from_padded(
    padded: torch.Tensor, margin: int, height: int, width: int, filter_size: int, step: int, hessian_weight: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """det and trace on the step grid from an integral image padded by `margin` >= L/2 + 1.

    Boxes that share their column range (the Dyy lobes) or row range (Dxx, Dxy) first take a
    strip difference of the integral image, then one more difference per box: every look-up is
    a strided view, no gather.
    """
    n_rows, n_cols = -(-height // step), -(-width // step)
    lobe, half = filter_size // 3, filter_size // 2
    side = lobe - 1  # half-width of the Dxx/Dyy lobes across the derivative direction
    mid = (lobe - 1) // 2  # half-extent of the central lobe along it

    def rows(table: torch.Tensor, offset: int) -> torch.Tensor:  # integral row (i * step + offset), every i
        start = margin + offset
        return table[:, start : start + step * (n_rows - 1) + 1 : step]

    def cols(table: torch.Tensor, offset: int) -> torch.Tensor:
        start = margin + offset
        return table[:, :, start : start + step * (n_cols - 1) + 1 : step]

    # Pixels of columns -side..side (for each grid column), cumulated over rows: then any row range.
    # A strip sums one band of the image, so its values (<= band width x image height) are small
    # enough for float32: only this first difference of the integral image needs float64.
    column_strip = (cols(padded, side + 1) - cols(padded, -side)).float()
    dyy = (rows(column_strip, half + 1) - rows(column_strip, -half)) - 3.0 * (
        rows(column_strip, mid + 1) - rows(column_strip, -mid)
    )  # whole column of three lobes minus 3x the centre lobe = weights +1, -2, +1
    row_strip = (rows(padded, side + 1) - rows(padded, -side)).float()
    dxx = (cols(row_strip, half + 1) - cols(row_strip, -half)) - 3.0 * (
        cols(row_strip, mid + 1) - cols(row_strip, -mid)
    )
    # Rows -lobe..-1 minus rows 1..lobe; then columns -lobe..-1 minus columns 1..lobe:
    # (top-left - bottom-left) - (top-right - bottom-right) = tl + br - tr - bl.
    top_minus_bottom = (rows(padded, 0) - rows(padded, -lobe)).float() - (
        rows(padded, lobe + 1) - rows(padded, 1)
    ).float()
    dxy = (cols(top_minus_bottom, 0) - cols(top_minus_bottom, -lobe)) - (
        cols(top_minus_bottom, lobe + 1) - cols(top_minus_bottom, 1)
    )
    area = float(filter_size * filter_size)
    dxx, dyy, dxy = dxx / area, dyy / area, dxy / area
    return dxx * dyy - (hessian_weight * dxy) ** 2, dxx + dyy


def _filter_fits(height: int, width: int, filter_size: int, step: int, device) -> torch.Tensor:
    """(Hg, Wg) bool: grid points where the whole filter lies inside the image."""
    half = filter_size // 2
    rows = torch.arange(0, height, step, device=device)
    cols = torch.arange(0, width, step, device=device)
    return ((rows - half >= 0) & (rows + half <= height - 1))[:, None] & (
        (cols - half >= 0) & (cols + half <= width - 1)
    )[None, :]


def box_hessian_response(
    integral: torch.Tensor, filter_size: int, step: int = 1, hessian_weight: float = HESSIAN_WEIGHT
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximated det(H) and trace of one box-filter size on a regular grid (Bay et al. 2008, 3.2).

    Dyy: three lobes of ``L/3`` rows and ``2L/3 - 1`` columns weighted +1, -2, +1; Dxx its
    transpose; Dxy: four ``L/3`` squares, +1 top-left and bottom-right, -1 elsewhere, around a
    one-pixel cross. All divided by ``L^2``, so responses are comparable across sizes. Every box
    sum is four strided views of the integral image: no gather, no copy.

    Args:
        integral: from `integral_image`.
        filter_size: L, an odd multiple of 3 (see `surf_filter_sizes`).
        step: the grid spacing in pixels; grid point (i, j) is pixel (x = j * step, y = i * step).
        hessian_weight: w in ``det = Dxx Dyy - (w Dxy)^2``.

    Returns:
        ``(det, trace, valid)``: det and trace float32; valid (Hg, Wg) bool, True where the whole
        filter lies inside the image (elsewhere the filter is cut by the border: mask those).

    Shape:
        - integral: (B, H + 1, W + 1)
        - det, trace: (B, Hg, Wg) with Hg = ceil(H / step), Wg = ceil(W / step)
    """
    _check_filter_size(filter_size)
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    margin = filter_size // 2 + 1
    det, trace = _hessian_from_padded(
        _pad_integral(integral, margin), margin, height, width, filter_size, step, hessian_weight
    )
    return det, trace, _filter_fits(height, width, filter_size, step, integral.device)


def _check_filter_size(filter_size: int) -> None:
    if filter_size % 3 or filter_size % 2 == 0 or filter_size < 9:
        raise ValueError(f"filter_size must be an odd multiple of 3 and >= 9, got {filter_size}")


# ---- scale-space extrema -------------------------------------------------------------------------
def scale_space_maxima(responses: torch.Tensor, threshold: float) -> torch.Tensor:
    """3x3x3 non-maximum suppression over (scale, y, x) of a stack of responses above a threshold.

    Only inner scales (1..S-2) can hold a maximum: the outer ones lack a neighbour. Positions set
    to -inf (filter not fitting the image) never win. Of neighbours with equal values only the
    first in memory order (scale, y, x) is kept, so a plateau cannot double-count.

    Args:
        responses: det(H) per scale of one octave.
        threshold: keep maxima with a response strictly above it.

    Returns:
        ``(M, 4)`` int64 rows ``(b, scale, y, x)`` of the maxima, in memory order.

    Shape:
        - responses: (B, S, H, W)
        - output: (M, 4)
    """
    if responses.ndim != 4:
        raise ValueError(f"responses must be (B, S, H, W), got {tuple(responses.shape)}")
    batch, n_scales, height, width = responses.shape
    if n_scales < 3 or height < 3 or width < 3:
        return torch.zeros(0, 4, dtype=torch.long, device=responses.device)
    # Separable 3x3x3 maximum (x, then y, then scale): six elementwise maxima instead of a 27-wide pool.
    padded = F.pad(responses, (1, 1, 1, 1), value=float("-inf"))
    pooled = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    pooled = torch.maximum(torch.maximum(pooled[:, :, :-2], pooled[:, :, 1:-1]), pooled[:, :, 2:])
    pooled = torch.maximum(torch.maximum(pooled[:, :-2], pooled[:, 1:-1]), pooled[:, 2:])  # inner scales
    inner = responses[:, 1:-1]
    points = ((inner >= pooled) & (inner > threshold)).nonzero()
    points[:, 1] += 1
    if len(points) == 0:
        return points
    # Plateaus: a point tied with a neighbour earlier in memory order (scale, y, x) yields to it.
    values = _neighbourhoods(responses, points).flatten(1)  # (M, 27), centre at 13
    earlier_tie = (values[:, :13] == values[:, 13:14]).any(dim=1)
    return points[~earlier_tie]


def _neighbourhoods(responses: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(M, 3, 3, 3) values around each (b, s, y, x), -inf where a neighbour falls off the stack."""
    batch, n_scales, height, width = responses.shape
    offsets = torch.arange(-1, 2, device=responses.device)
    b = points[:, 0].view(-1, 1, 1, 1)
    s = points[:, 1].view(-1, 1, 1, 1) + offsets.view(1, 3, 1, 1)
    y = points[:, 2].view(-1, 1, 1, 1) + offsets.view(1, 1, 3, 1)
    x = points[:, 3].view(-1, 1, 1, 1) + offsets.view(1, 1, 1, 3)
    inside = (s >= 0) & (s < n_scales) & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    values = responses[b, s.clamp(0, n_scales - 1), y.clamp(0, height - 1), x.clamp(0, width - 1)]
    return torch.where(inside, values, torch.full((), float("-inf"), dtype=values.dtype, device=values.device))


def refine_maxima(responses: torch.Tensor, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-sample (x, y, scale) position of maxima by fitting a 3-D quadratic to their 27 neighbours.

    Gradient g and Hessian H of the response by central differences; the extremum of the
    quadratic is at ``offset = -H^-1 g`` (Brown & Lowe 2002, as in Bay et al. 2008, 4.2). All
    systems are solved at once. A point is kept when its 3x3x3 neighbourhood is finite, H is
    invertible and every offset component is at most `MAX_OFFSET` (beyond, the true extremum is
    nearer another sample and the fit is an extrapolation).

    Args:
        responses: the response stack the points were found in.
        points: ``(b, scale, y, x)`` rows from `scale_space_maxima`.

    Returns:
        ``(offsets, values, keep)``: offsets (M, 3) float32 in samples, ordered (dx, dy, dscale);
        values (M,) the interpolated response ``v + g . offset / 2``; keep (M,) bool.

    Shape:
        - responses: (B, S, H, W)
        - points: (M, 4)
    """
    values = _neighbourhoods(responses, points).double()  # [scale, y, x], centre at [1, 1, 1]
    centre = values[:, 1, 1, 1]
    grad = torch.stack(
        [
            (values[:, 1, 1, 2] - values[:, 1, 1, 0]) / 2,
            (values[:, 1, 2, 1] - values[:, 1, 0, 1]) / 2,
            (values[:, 2, 1, 1] - values[:, 0, 1, 1]) / 2,
        ],
        dim=1,
    )
    dxx = values[:, 1, 1, 2] + values[:, 1, 1, 0] - 2 * centre
    dyy = values[:, 1, 2, 1] + values[:, 1, 0, 1] - 2 * centre
    dss = values[:, 2, 1, 1] + values[:, 0, 1, 1] - 2 * centre
    dxy = (values[:, 1, 2, 2] - values[:, 1, 2, 0] - values[:, 1, 0, 2] + values[:, 1, 0, 0]) / 4
    dxs = (values[:, 2, 1, 2] - values[:, 2, 1, 0] - values[:, 0, 1, 2] + values[:, 0, 1, 0]) / 4
    dys = (values[:, 2, 2, 1] - values[:, 2, 0, 1] - values[:, 0, 2, 1] + values[:, 0, 0, 1]) / 4
    hessian = torch.stack(
        [torch.stack([dxx, dxy, dxs], 1), torch.stack([dxy, dyy, dys], 1), torch.stack([dxs, dys, dss], 1)], 1
    )
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    # Non-finite systems would poison the batched solve's error reporting; give them the identity.
    eye = torch.eye(3, dtype=hessian.dtype, device=hessian.device).expand_as(hessian)
    hessian = torch.where(finite[:, None, None], hessian, eye)
    grad = torch.where(finite[:, None], grad, torch.zeros_like(grad))
    offsets, info = torch.linalg.solve_ex(hessian, -grad)
    keep = finite & (info == 0) & torch.isfinite(offsets).all(dim=1) & (offsets.abs() <= MAX_OFFSET).all(dim=1)
    interpolated = centre + 0.5 * (grad * offsets).sum(dim=1)
    return offsets.float(), interpolated.float(), keep


# ---- detection -----------------------------------------------------------------------------------
def _top_k_per_image(
    image_index: torch.Tensor, scores: torch.Tensor, batch: int, k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For candidates of many images: (selected ids, their image, their rank, N), the k best per image."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(image_index[by_score], stable=True)]  # image-major, best first
    image_sorted = image_index[order]
    counts = torch.bincount(image_sorted, minlength=batch)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=scores.device) - starts[image_sorted]
    keep = rank < k
    n_max = int(counts.clamp(max=k).max()) if batch else 0
    return order[keep], image_sorted[keep], rank[keep], n_max


def detect_surf_keypoints(
    grey: torch.Tensor,
    hessian_threshold: float = DEFAULT_HESSIAN_THRESHOLD,
    n_octaves: int = 4,
    initial_step: int = 1,
    max_keypoints: int = 1000,
    hessian_weight: float = HESSIAN_WEIGHT,
    integral: Optional[torch.Tensor] = None,
) -> SURFFeatures:
    """Fast-Hessian detector: box-filter det(H) pyramid, 3x3x3 NMS, quadratic refinement, top-k.

    Args:
        grey: images in [0, 1].
        hessian_threshold: minimum det(H) (units: see the module docstring).
        n_octaves: octaves of 4 filter sizes each (see `surf_filter_sizes`); an octave whose
            filters do not fit the image simply finds nothing.
        initial_step: sampling step of the first octave in pixels; doubles every octave.
        max_keypoints: keep at most this many per image, by interpolated response.
        hessian_weight: w in ``det = Dxx Dyy - (w Dxy)^2``.
        integral: `integral_image(grey)` if already computed.

    Returns:
        `SURFFeatures` with orientations 0 and no descriptors.

    Shape:
        - grey: (B, H, W)
        - outputs: (B, N, ...) with N <= max_keypoints
    """
    if grey.ndim != 3:
        raise ValueError(f"expected grey images of shape (B, H, W), got {tuple(grey.shape)}")
    if n_octaves < 1 or initial_step < 1 or max_keypoints < 1:
        raise ValueError(
            f"n_octaves, initial_step and max_keypoints must be >= 1, got {n_octaves}, {initial_step}, {max_keypoints}"
        )
    batch = grey.shape[0]
    device = grey.device
    if integral is None:
        integral = integral_image(grey)
    height, width = grey.shape[1:]
    found = {key: [] for key in ("image", "x", "y", "size", "response", "laplacian")}
    for octave in range(n_octaves):
        step = initial_step * 2**octave
        sizes = surf_filter_sizes(octave)
        if sizes[2] > min(height, width):
            break  # maxima need the third filter to fit; larger octaves fit even less
        margin = sizes[-1] // 2 + 1
        padded = _pad_integral(integral, margin)
        dets, traces = zip(
            *(_hessian_from_padded(padded, margin, height, width, size, step, hessian_weight) for size in sizes)
        )
        valid = torch.stack([_filter_fits(height, width, size, step, device) for size in sizes])  # (S, Hg, Wg)
        responses = torch.stack(dets, dim=1).masked_fill(~valid, float("-inf"))  # (B, S, Hg, Wg)
        points = scale_space_maxima(responses, hessian_threshold)
        if len(points) == 0:
            continue
        offsets, values, keep = refine_maxima(responses, points)
        points, offsets, values = points[keep], offsets[keep], values[keep]
        size_step = sizes[1] - sizes[0]
        found["image"].append(points[:, 0])
        found["x"].append((points[:, 3].float() + offsets[:, 0]) * step)
        found["y"].append((points[:, 2].float() + offsets[:, 1]) * step)
        found["size"].append(sizes[0] + (points[:, 1].float() + offsets[:, 2]) * size_step)
        found["response"].append(values)
        trace = torch.stack(traces, dim=1)[points[:, 0], points[:, 1], points[:, 2], points[:, 3]]
        found["laplacian"].append(torch.where(trace < 0, -1, 1).to(torch.int8))

    if found["image"]:
        cat = {key: torch.cat(parts) for key, parts in found.items()}
    else:
        cat = {key: torch.zeros(0, device=device) for key in found}
        cat["image"] = cat["image"].long()
        cat["laplacian"] = cat["laplacian"].to(torch.int8)
    chosen, image, rank, n_max = _top_k_per_image(cat["image"], cat["response"], batch, max_keypoints)

    def per_image(values: torch.Tensor) -> torch.Tensor:  # chosen candidates -> (B, N, ...) zero-padded rows
        out = torch.zeros((batch, n_max, *values.shape[1:]), dtype=values.dtype, device=device)
        out[image, rank] = values[chosen]
        return out

    mask = torch.zeros(batch, n_max, dtype=torch.bool, device=device)
    mask[image, rank] = True
    return SURFFeatures(
        keypoints=per_image(torch.stack([cat["x"], cat["y"]], dim=1).float()),
        scales=per_image(filter_size_to_scale(cat["size"]).float()),
        responses=per_image(cat["response"].float()),
        laplacian=per_image(cat["laplacian"]),
        mask=mask,
        orientations=torch.zeros(batch, n_max, device=device),
    )


# ---- Haar wavelets on the integral image ---------------------------------------------------------
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


def haar_margin(max_scale: float) -> int:
    """Padding that keeps the orientation wavelets (side 4s, the largest) exact up to scale `max_scale`."""
    return int(math.ceil(ORIENTATION_HAAR_SIDE * max(float(max_scale), 0.0))) + 1


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


# ---- orientation ---------------------------------------------------------------------------------
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


# ---- descriptor ----------------------------------------------------------------------------------
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


# ---- everything ----------------------------------------------------------------------------------
def surf(
    grey: torch.Tensor,
    hessian_threshold: float = DEFAULT_HESSIAN_THRESHOLD,
    n_octaves: int = 4,
    initial_step: int = 1,
    max_keypoints: int = 1000,
    extended: bool = False,
    upright: bool = False,
    hessian_weight: float = HESSIAN_WEIGHT,
) -> SURFFeatures:
    """Detect and describe SURF features in a batch of grey images.

    Args:
        grey: images in [0, 1].
        hessian_threshold, n_octaves, initial_step, max_keypoints, hessian_weight: see
            `detect_surf_keypoints`.
        extended: 128-d descriptors (SURF-128) instead of 64-d.
        upright: U-SURF: no orientation assignment (all 0), faster, not rotation-invariant.

    Returns:
        `SURFFeatures` with descriptors; padding rows are all zero.

    Shape:
        - grey: (B, H, W)
        - descriptors: (B, N, 64 or 128)
    """
    features = detect_surf_keypoints(grey, hessian_threshold, n_octaves, initial_step, max_keypoints, hessian_weight)
    max_scale = float(features.scales.max()) if features.scales.numel() else 0.0
    integral = padded_integral_image(grey, haar_margin(max_scale))
    if not upright:
        features.orientations = surf_orientation(integral, features.keypoints, features.scales, features.mask)
    features.descriptors = surf_descriptor(
        integral, features.keypoints, features.scales, features.orientations, extended, features.mask
    )
    return features
