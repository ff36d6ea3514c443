"""SURF's Fast-Hessian detector (`retrieval.surf`, steps 2-3): box-filter det(H), scale-space maxima, refinement.

`detect_surf_keypoints` runs the steps over the octaves and keeps the strongest keypoints per image,
as `SURFFeatures` (the container the whole pipeline fills).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from retrieval.surf.integral import integral_image

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
#: Default minimum det(H) (grey levels in [0, 1], area-normalised filters). Retrieval on a VITON
#: subset is flat from 1e-5 to 5e-5 and drops above (fewer, only high-contrast keypoints); 5e-5 is
#: the cheapest of the flat range (~150-250 keypoints on a 256x192 photo).
DEFAULT_HESSIAN_THRESHOLD = 5e-5


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


# ---- box filters ----------------------------------------------------------------------------------
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
        hessian_threshold: minimum det(H) (units: see the package docstring, `retrieval.surf`).
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
