"""Step 2 of spatial verification (`retrieval.rerank`): geometric models and RANSAC, batched torch or OpenCV.

The models (similarity, affine, homography) as linear systems of their parameters, the batched solver
and transfer error, then the two back-ends behind one contract, `ransac` (``backend="torch"``: every candidate's
hypotheses at once; ``"opencv"``, also `ransac_opencv`: one OpenCV call per candidate); the package
docstring says which to use when.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

# Parameters and minimal sample size of each geometric model.
MODELS: Dict[str, Tuple[int, int]] = {"similarity": (4, 2), "affine": (6, 3), "homography": (8, 4)}


def _design_rows(model: str, src: torch.Tensor, dst: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linear equations A p = b of the model parameters p, two rows per correspondence.

    similarity: x' = a x - b y + tx, y' = b x + a y + ty          p = (a, b, tx, ty)
    affine:     x' = a11 x + a12 y + tx, y' = a21 x + a22 y + ty   p = (a11, a12, tx, a21, a22, ty)
    homography: h33 = 1, the DLT equations, linear in the other 8 entries.

    Shape:
        - src, dst: (..., K, 2)
        - output: ((..., 2K, P), (..., 2K))
    """
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    if model == "similarity":
        rows_u = torch.stack([x, -y, one, zero], dim=-1)
        rows_v = torch.stack([y, x, zero, one], dim=-1)
    elif model == "affine":
        rows_u = torch.stack([x, y, one, zero, zero, zero], dim=-1)
        rows_v = torch.stack([zero, zero, zero, x, y, one], dim=-1)
    elif model == "homography":
        rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], dim=-1)
        rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], dim=-1)
    else:
        raise ValueError(f"unknown geometric model {model!r}; valid models: {', '.join(MODELS)}")
    a = torch.stack([rows_u, rows_v], dim=-2).flatten(-3, -2)  # (..., 2K, P), rows u0, v0, u1, v1, ...
    b = torch.stack([u, v], dim=-1).flatten(-2)
    return a, b


def _to_matrix(model: str, params: torch.Tensor) -> torch.Tensor:
    """Model parameters (..., P) -> 3x3 transforms (..., 3, 3) acting on homogeneous xy."""
    zero, one = torch.zeros_like(params[..., 0]), torch.ones_like(params[..., 0])
    if model == "similarity":
        a, b, tx, ty = params.unbind(-1)
        rows = [a, -b, tx, b, a, ty, zero, zero, one]
    elif model == "affine":
        rows = [*params.unbind(-1), zero, zero, one]
    else:
        rows = [*params.unbind(-1), one]
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def transfer_error(matrices: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Distance between ``matrices`` applied to ``src`` and ``dst`` (inf where a point maps to infinity).

    Written element-wise: a batched matmul of (M, 2) by (2, 2) pays per-matrix overhead.

    Shape:
        - matrices: (..., 3, 3)
        - src, dst: (..., M, 2), broadcastable against the matrices' batch shape
        - output: (..., M)

    Example:
        >>> shift = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
        >>> transfer_error(shift, torch.zeros(1, 2), torch.zeros(1, 2))
        tensor([5.])
    """
    m = matrices[..., None, :, :]  # (..., 1, 3, 3): broadcasts over the points
    x, y = src[..., 0], src[..., 1]
    u = m[..., 0, 0] * x + m[..., 0, 1] * y + m[..., 0, 2]
    v = m[..., 1, 0] * x + m[..., 1, 1] * y + m[..., 1, 2]
    w = m[..., 2, 0] * x + m[..., 2, 1] * y + m[..., 2, 2]
    safe = w.abs() > 1e-8
    w = torch.where(safe, w, torch.ones_like(w))
    error = torch.hypot(u / w - dst[..., 0], v / w - dst[..., 1])
    return torch.where(safe, error, torch.full_like(error, float("inf")))


def solve_small_systems(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> Tuple[torch.Tensor, torch.Tensor]:
    """Solve many tiny linear systems ``a x = b`` by Gauss-Jordan elimination with partial pivoting.

    Written out because LAPACK's batched solvers pay a per-matrix call: for the ~10^4 systems of
    4 to 8 unknowns RANSAC makes per query, these P vectorised elimination steps are ~50x faster.

    Returns:
        (x, ok): the solutions, and False where a pivot was below ``eps`` (singular / degenerate).

    Shape:
        - a: (..., P, P), b: (..., P)
        - output: ((..., P), (...) bool)

    Example:
        >>> x, ok = solve_small_systems(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([4.0, 3.0]))
        >>> x.tolist(), ok.item()
        ([1.0, 2.0], True)
    """
    n = a.shape[-1]
    augmented = torch.cat([a, b[..., None]], dim=-1)
    ok = torch.ones(a.shape[:-2], dtype=torch.bool, device=a.device)
    rows = torch.arange(n, device=a.device)
    for k in range(n):
        column = augmented[..., k:, k].abs()
        pivot = column.argmax(dim=-1) + k
        ok &= column.amax(dim=-1) > eps
        # swap rows k and pivot: a permutation that maps k <-> pivot and fixes the others
        permutation = torch.where(rows == k, pivot[..., None], rows)
        permutation = torch.where(rows == pivot[..., None], torch.full_like(permutation, k), permutation)
        augmented = augmented.gather(-2, permutation[..., None].expand_as(augmented))
        pivot_value = augmented[..., k : k + 1, k : k + 1]
        pivot_row = augmented[..., k : k + 1, :] / torch.where(
            pivot_value.abs() > eps, pivot_value, torch.ones_like(pivot_value)
        )
        factors = torch.where(
            (rows == k)[:, None], torch.zeros_like(augmented[..., :, k : k + 1]), augmented[..., :, k : k + 1]
        )
        augmented = augmented - factors * pivot_row
        augmented = torch.where((rows == k)[:, None], pivot_row.expand_as(augmented), augmented)
    return augmented[..., -1], ok


def _normalisation(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Similarity T (C, 3, 3) moving the valid points' centroid to 0 and their mean distance to sqrt 2.

    Hartley's normalisation: it conditions the DLT equations and makes one float32 tolerance fit all.
    """
    weights = valid.float()[..., None]
    count = weights.sum(dim=1).clamp_min(1.0)
    centre = (points * weights).sum(dim=1) / count  # (C, 2)
    spread = (((points - centre[:, None]).norm(dim=-1, keepdim=True) * weights).sum(dim=1) / count).clamp_min(1e-6)
    scale = (2.0**0.5) / spread[:, 0]  # (C,)
    transform = torch.zeros(points.shape[0], 3, 3, dtype=points.dtype, device=points.device)
    transform[:, 0, 0] = transform[:, 1, 1] = scale
    transform[:, :2, 2] = -centre * scale[:, None]
    transform[:, 2, 2] = 1.0
    return transform


def _apply(transform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ transform[:, :2, :2].transpose(1, 2) + transform[:, None, :2, 2]


def ransac(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor,
    model: str = "similarity",
    threshold: float = 20.0,
    iterations: Optional[int] = None,
    max_scale_change: Optional[float] = 4.0,
    generator: Optional[torch.Generator] = None,
    backend: str = "torch",
    confidence: float = 0.999,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RANSAC for C independent point sets: best transform src -> dst and its inliers.

    backend "torch": every set's hypotheses at once.
    Each set gets ``iterations`` hypotheses from minimal samples of its valid matches (drawn with
    replacement; a sample with a repeated match is singular and discarded); a hypothesis whose
    linear part changes area by more than ``max_scale_change`` squared, or mirrors, is discarded
    as implausible for two photos of one object. The best hypothesis (most inliers) is re-fitted
    by least squares on its inliers and kept if that does not lose inliers. Points are
    normalised per set (Hartley) before solving; errors are measured in pixels of ``dst``.
    A set with fewer valid matches than the minimal sample gets no inlier at all.

    backend "opencv": one OpenCV call per set, the fast choice on a CPU (see the package doc).
    similarity: ``cv2.estimateAffinePartial2D``, affine: ``cv2.estimateAffine2D`` (both RANSAC plus a
    Levenberg-Marquardt refinement), homography: ``cv2.findHomography`` with RANSAC. OpenCV adapts
    the number of hypotheses to the inlier ratio it finds (``iterations`` is the cap), which is why
    it beats the fixed-size batch on a CPU. The scale bound is checked on the final model only:
    an implausible model counts no inlier. Seed OpenCV with ``cv2.setRNGSeed`` for repeatability.

    Args:
        src: points in the first image (the query).
        dst: matched points in the second image (the candidate).
        valid: True for real matches.
        model: "similarity" (4 dof), "affine" (6) or "homography" (8).
        threshold: inlier distance in pixels of the second image.
        iterations: hypotheses per set (torch; default 256), or OpenCV's cap on them (default 2000).
        max_scale_change: bound on the scale change of a hypothesis, or None for no bound.
        generator: seeds the minimal samples (torch; deterministic re-ranking).
        backend: "torch" or "opencv".
        confidence: OpenCV's stopping confidence.

    Returns:
        (matrices, inliers): 3x3 transforms src -> dst in pixels (identity where nothing was
        found) and inlier masks.

    Shape:
        - src, dst: (C, M, 2)
        - valid: (C, M) bool
        - output: ((C, 3, 3), (C, M) bool)

    Example:
        >>> src = torch.rand(1, 20, 2, generator=torch.Generator().manual_seed(0)) * 100
        >>> dst = src * 2 + 5  # a pure scaling + shift
        >>> _, inliers = ransac(src, dst, torch.ones(1, 20, dtype=torch.bool), threshold=1.0)
        >>> int(inliers.sum())
        20
    """
    if model not in MODELS:
        raise ValueError(f"unknown geometric model {model!r}; valid models: {', '.join(MODELS)}")
    if src.ndim != 3 or src.shape[-1] != 2 or dst.shape != src.shape or valid.shape != src.shape[:2]:
        raise ValueError(
            f"expected src/dst (C, M, 2) and valid (C, M), "
            f"got {tuple(src.shape)}, {tuple(dst.shape)}, {tuple(valid.shape)}"
        )
    if backend == "opencv":
        cap = 2000 if iterations is None else iterations
        return _opencv_ransac(src, dst, valid, model, threshold, cap, max_scale_change, confidence)
    if backend != "torch":
        raise ValueError(f"unknown RANSAC backend {backend!r}; valid: torch, opencv")
    hypotheses = 256 if iterations is None else iterations
    return _torch_ransac(src, dst, valid, model, threshold, hypotheses, max_scale_change, generator)


def ransac_opencv(src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor, **options) -> Tuple[torch.Tensor, ...]:
    """`ransac` with ``backend="opencv"`` (one OpenCV call per set); the same contract and options."""
    return ransac(src, dst, valid, backend="opencv", **options)


def _torch_ransac(src, dst, valid, model, threshold, iterations, max_scale_change, generator):
    """`ransac`'s torch back-end on checked inputs: all sets' hypotheses in one batch."""
    _, sample_size = MODELS[model]
    n_sets, n_matches = valid.shape
    device = src.device
    identity = torch.eye(3, device=device).expand(n_sets, 3, 3).clone()
    if n_sets == 0 or n_matches < sample_size:
        return identity, torch.zeros_like(valid)
    valid = valid.bool()
    # Only valid matches take part: move them to the front (stable) and drop the columns beyond
    # the largest count, which cuts the (C, hypotheses, M) work by the share of invalid matches.
    valid_first = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # (C, M)
    n_valid = valid.sum(dim=1)
    width = max(int(n_valid.max()), sample_size)
    columns = valid_first[:, :width]
    src = src.float().gather(1, columns[..., None].expand(-1, -1, 2))
    dst = dst.float().gather(1, columns[..., None].expand(-1, -1, 2))
    valid = valid.gather(1, columns)
    norm_src, norm_dst = _normalisation(src, valid), _normalisation(dst, valid)
    src_n, dst_n = _apply(norm_src, src), _apply(norm_dst, dst)
    threshold_n = (threshold * norm_dst[:, 0, 0])[:, None, None]  # (C, 1, 1) in normalised dst units
    # area change in pixels = area change in normalised units * (scale_src / scale_dst)^2
    area_to_pixels = (norm_src[:, 0, 0] / norm_dst[:, 0, 0]) ** 2  # (C,)
    solvable = n_valid >= sample_size

    # Minimal samples: valid matches come first, so rank j < n_valid is the j-th valid match.
    draws = torch.rand(n_sets, iterations, sample_size, generator=generator).to(device)
    samples = (draws * n_valid.clamp_min(1)[:, None, None]).long().clamp_max(width - 1)  # (C, I, K)

    def pick(points: torch.Tensor) -> torch.Tensor:
        return points[:, None].expand(-1, iterations, -1, -1).gather(2, samples[..., None].expand(-1, -1, -1, 2))

    a, b = _design_rows(model, pick(src_n), pick(dst_n))  # (C, I, P, P), (C, I, P)
    params, plausible = solve_small_systems(a, b)
    matrices = _to_matrix(model, params)  # (C, I, 3, 3), normalised coordinates
    plausible &= torch.isfinite(matrices).flatten(-2).all(dim=-1)
    plausible &= _plausible_scale(matrices, area_to_pixels[:, None], max_scale_change)
    errors = transfer_error(matrices, src_n[:, None], dst_n[:, None])  # (C, I, M)
    hypothesis_inliers = (errors < threshold_n) & valid[:, None] & plausible[..., None]
    best = hypothesis_inliers.sum(dim=2).argmax(dim=1)  # (C,)
    sets = torch.arange(n_sets, device=device)
    best_matrices, inliers = matrices[sets, best], hypothesis_inliers[sets, best]

    # Local optimisation: weighted least squares (normal equations) on the inliers, kept if not worse.
    a, b = _design_rows(model, src_n, dst_n)  # (C, 2M, P)
    row_weights = inliers.float().repeat_interleave(2, dim=1)
    normal_a = torch.einsum("cnp,cnq,cn->cpq", a, a, row_weights)
    normal_b = torch.einsum("cnp,cn,cn->cp", a, b, row_weights)
    refined_params, refined_ok = solve_small_systems(normal_a, normal_b, eps=1e-9)
    refined = _to_matrix(model, refined_params)
    refined_ok &= torch.isfinite(refined).flatten(1).all(dim=1) & (inliers.sum(dim=1) > sample_size)
    refined_ok &= _plausible_scale(refined, area_to_pixels, max_scale_change)
    refined = torch.where(refined_ok[:, None, None], refined, best_matrices)
    refined_inliers = (transfer_error(refined, src_n, dst_n) < threshold_n[:, 0]) & valid
    better = refined_ok & (refined_inliers.sum(dim=1) >= inliers.sum(dim=1))
    best_matrices = torch.where(better[:, None, None], refined, best_matrices)
    inliers = torch.where(better[:, None], refined_inliers, inliers) & solvable[:, None]
    inliers = torch.zeros(n_sets, n_matches, dtype=torch.bool, device=device).scatter(1, columns, inliers)
    pixel_matrices = torch.linalg.inv(norm_dst) @ best_matrices @ norm_src
    return torch.where(solvable[:, None, None], pixel_matrices, identity), inliers


def _opencv_ransac(src, dst, valid, model, threshold, iterations, max_scale_change, confidence):
    """`ransac`'s OpenCV back-end on checked inputs: one call per set."""
    import cv2

    _, sample_size = MODELS[model]
    src_np, dst_np = src.detach().cpu().double().numpy(), dst.detach().cpu().double().numpy()
    valid_np = valid.detach().cpu().numpy().astype(bool)
    matrices = np.tile(np.eye(3), (len(valid_np), 1, 1))
    inliers = np.zeros(valid_np.shape, dtype=bool)
    for c in range(len(valid_np)):  # OpenCV estimates one point set per call
        rows = np.flatnonzero(valid_np[c])
        if len(rows) < sample_size:
            continue
        a, b = src_np[c, rows], dst_np[c, rows]
        if model == "homography":
            matrix, mask = cv2.findHomography(a, b, cv2.RANSAC, threshold, maxIters=iterations, confidence=confidence)
        else:
            estimate = cv2.estimateAffinePartial2D if model == "similarity" else cv2.estimateAffine2D
            matrix, mask = estimate(
                a, b, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=iterations, confidence=confidence
            )
            if matrix is not None:
                matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
        if matrix is None or mask is None or not np.isfinite(matrix).all():
            continue
        if max_scale_change is not None:
            area_change = np.linalg.det(matrix[:2, :2])
            if not 1.0 / max_scale_change**2 < area_change < max_scale_change**2:
                continue
        matrices[c] = matrix
        inliers[c, rows] = mask.ravel().astype(bool)
    return torch.from_numpy(matrices).float().to(src.device), torch.from_numpy(inliers).to(valid.device)


def _plausible_scale(
    matrices: torch.Tensor, area_to_pixels: torch.Tensor, max_scale_change: Optional[float]
) -> torch.Tensor:
    """True where the linear part keeps orientation and changes area by less than max_scale_change^2."""
    if max_scale_change is None:
        return torch.ones(matrices.shape[:-2], dtype=torch.bool, device=matrices.device)
    linear = matrices[..., :2, :2]
    area_change = (linear[..., 0, 0] * linear[..., 1, 1] - linear[..., 0, 1] * linear[..., 1, 0]) * area_to_pixels
    return (area_change > 1.0 / max_scale_change**2) & (area_change < max_scale_change**2)
