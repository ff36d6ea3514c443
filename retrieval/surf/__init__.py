"""SURF: Speeded-Up Robust Features, batched in torch (Bay, Tuytelaars & Van Gool, ECCV 2006;
Bay, Ess, Tuytelaars & Van Gool, "Speeded-Up Robust Features (SURF)", CVIU 110(3), 2008).

Why it is written here: the OpenCV wheels on PyPI (``opencv-python``, ``opencv-contrib-python``)
are built without the patented "non-free" algorithms, so ``cv2.xfeatures2d.SURF_create`` raises
there; SURF exists only in a self-built opencv-contrib with ``OPENCV_ENABLE_NONFREE``. This package
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

The modules, in pipeline order: `integral` (step 1, and the replicate-padded table that steps 4 and 5
read), `detector` (steps 2 and 3: `detect_surf_keypoints`, `SURFFeatures`), `haar` (the Haar wavelets
of steps 4 and 5), `orientation` (step 4), `descriptor` (step 5); `surf`, here, runs them all.

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

from typing import Any

import torch

from retrieval.surf.descriptor import surf_descriptor
from retrieval.surf.detector import (
    BASE_FILTER_SIZE,
    BASE_SIGMA,
    DEFAULT_HESSIAN_THRESHOLD,
    HESSIAN_WEIGHT,
    SURFFeatures,
    box_hessian_response,
    detect_surf_keypoints,
    filter_size_to_scale,
    refine_maxima,
    scale_space_maxima,
    surf_filter_sizes,
)
from retrieval.surf.haar import haar_wavelet_responses
from retrieval.surf.integral import PaddedIntegral, integral_image, padded_integral_image
from retrieval.surf.orientation import haar_margin, surf_orientation

__all__ = [
    "BASE_FILTER_SIZE",
    "BASE_SIGMA",
    "DEFAULT_HESSIAN_THRESHOLD",
    "HESSIAN_WEIGHT",
    "PaddedIntegral",
    "SURFFeatures",
    "box_hessian_response",
    "detect_surf_keypoints",
    "filter_size_to_scale",
    "haar_margin",
    "haar_wavelet_responses",
    "integral_image",
    "padded_integral_image",
    "refine_maxima",
    "scale_space_maxima",
    "surf",
    "surf_descriptor",
    "surf_filter_sizes",
    "surf_orientation",
]


def surf(
    grey: torch.Tensor,
    hessian_threshold: float = DEFAULT_HESSIAN_THRESHOLD,
    *,
    extended: bool = False,
    upright: bool = False,
    **detector_options: Any,
) -> SURFFeatures:
    """Detect and describe SURF features in a batch of grey images.

    Args:
        grey: images in [0, 1].
        hessian_threshold: see `detect_surf_keypoints`.
        extended: 128-d descriptors (SURF-128) instead of 64-d.
        upright: U-SURF: no orientation assignment (all 0), faster, not rotation-invariant.
        detector_options: n_octaves, initial_step, max_keypoints, hessian_weight of
            `detect_surf_keypoints` (its defaults otherwise).

    Returns:
        `SURFFeatures` with descriptors; padding rows are all zero.

    Shape:
        - grey: (B, H, W)
        - descriptors: (B, N, 64 or 128)
    """
    features = detect_surf_keypoints(grey, hessian_threshold, **detector_options)
    max_scale = float(features.scales.max()) if features.scales.numel() else 0.0
    integral = padded_integral_image(grey, haar_margin(max_scale))
    if not upright:
        features.orientations = surf_orientation(integral, features.keypoints, features.scales, features.mask)
    features.descriptors = surf_descriptor(
        integral, features.keypoints, features.scales, features.orientations, extended, features.mask
    )
    return features
