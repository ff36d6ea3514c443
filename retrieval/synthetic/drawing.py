"""Shop photos of the synthetic set: procedurally drawn tops on white, and the drawing primitives they use.

A product is a front-view top (t-shirt, long sleeve, tank or sweater silhouette) with its own texture
(solid colour, stripes, polka dots, checks, camouflage, gradient, optionally a printed logo), soft folds
and a darker seam. The primitives return anti-aliased float32 coverage masks that `_paint` blends with;
`retrieval.synthetic.street` draws its figures with the same ones.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Dict, Tuple

import cv2
import numpy as np

GARMENT_KINDS = ("t-shirt", "long-sleeve", "tank", "sweater")
TEXTURE_KINDS = ("solid", "stripes", "dots", "checks", "camo", "gradient", "logo")

# Sub-pixel precision for cv2 drawing (coordinates are multiplied by 2**_SHIFT).
_SHIFT = 4


@dataclass
class _Garment:
    """A drawn product: its photo, its mask and the keypoints a figure's arms attach to (pixels)."""

    photo: np.ndarray  # (H, W, 3) float32 in [0, 1], white background
    mask: np.ndarray  # (H, W) float32 in [0, 1]
    keypoints: Dict[str, np.ndarray]  # name -> (2,) xy
    kind: str


# --------------------------------------------------------------------------------------------------
# Drawing primitives: every one returns an anti-aliased float32 coverage mask in [0, 1].
# --------------------------------------------------------------------------------------------------


def _fixed_point(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * (1 << _SHIFT)).astype(np.int32)


def _polygon_mask(shape: Tuple[int, int], points: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [_fixed_point(points).reshape(-1, 1, 2)], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) / 255.0


def _ellipse_mask(shape: Tuple[int, int], center, axes, angle: float = 0.0) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.ellipse(
        canvas,
        tuple(int(v) for v in _fixed_point(center)),
        tuple(int(v) for v in _fixed_point(axes)),
        float(angle),
        0.0,
        360.0,
        255,
        thickness=-1,
        lineType=cv2.LINE_AA,
        shift=_SHIFT,
    )
    return canvas.astype(np.float32) / 255.0


def _polyline_mask(shape: Tuple[int, int], points: np.ndarray, thickness: float) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.polylines(
        canvas,
        [_fixed_point(points).reshape(-1, 1, 2)],
        False,
        255,
        thickness=max(1, int(round(thickness))),
        lineType=cv2.LINE_AA,
        shift=_SHIFT,
    )
    return canvas.astype(np.float32) / 255.0


def _paint(canvas: np.ndarray, coverage: np.ndarray, colour) -> None:
    """Alpha-blend `colour` (3,) or (H, W, 3) into `canvas` in place where `coverage` is set."""
    # Blend only inside the coverage's bounding box: most shapes are small, and full-frame blends
    # were most of the generation time.
    x, y, w, h = cv2.boundingRect((coverage > 0).astype(np.uint8))
    if w == 0 or h == 0:
        return
    window = (slice(y, y + h), slice(x, x + w))
    alpha = coverage[window][..., None]
    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 3:
        colour = colour[window]
    region = canvas[window]
    region *= 1.0 - alpha
    region += alpha * colour


def _random_colour(rng: np.random.Generator, saturation=(0.25, 1.0), value=(0.25, 1.0)) -> np.ndarray:
    hue = rng.uniform(0.0, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value)), dtype=np.float32)


def _contrasting_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A random colour at least a little distinguishable from `base` (so patterns stay visible)."""
    for _ in range(8):
        colour = _random_colour(rng, saturation=(0.0, 1.0), value=(0.1, 1.0))
        if np.abs(colour - base).sum() > 0.6:
            return colour
    return (1.0 - base).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a few random values per side, upsampled bicubically."""
    height, width = shape
    coarse = rng.standard_normal((cells + 1, max(2, round(cells * width / height)) + 1)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------------------------------


def _garment_outline(rng: np.random.Generator, kind: str, height: int, width: int):
    """Right half of a front-view top (neck centre -> hem centre) in pixels, mirrored into a polygon.

    Returns:
        (polygon (N, 2), keypoints) where keypoints name the right/left shoulder, sleeve end, armpit
        and hem corner, plus the neck.
    """
    top = rng.uniform(0.08, 0.13) * height
    hem = rng.uniform(0.80, 0.92) * height
    centre = width / 2.0
    neck_half = rng.uniform(0.09, 0.14) * width
    neck_depth = rng.uniform(0.02, 0.09) * height
    hem_half = rng.uniform(0.24, 0.33) * width
    waist_half = hem_half * rng.uniform(0.9, 1.02)
    shoulder = np.array([centre + rng.uniform(0.24, 0.30) * width, top + 0.03 * height])
    armpit_y = top + rng.uniform(0.20, 0.26) * height

    # Round or V neckline from the neck centre up to the shoulder seam.
    if rng.uniform() < 0.7:
        theta = np.linspace(0.0, np.pi / 2.0, 7)
        neckline = np.stack([centre + neck_half * np.sin(theta), top + neck_depth * np.cos(theta)], axis=1)
    else:
        neckline = np.array([[centre, top + neck_depth * 1.8], [centre + neck_half, top]])

    if kind == "tank":
        strap_end = np.array([centre + neck_half + rng.uniform(0.05, 0.09) * width, top])
        armpit = np.array([centre + waist_half * 1.02, armpit_y + 0.03 * height])
        t = np.linspace(0.0, 1.0, 6)[1:-1, None]
        control = np.array([strap_end[0] - 0.01 * width, armpit[1]])
        armhole = (1 - t) ** 2 * strap_end + 2 * (1 - t) * t * control + t**2 * armpit
        right = [neckline, strap_end[None], armhole, armpit[None]]
        sleeve_end = armpit.copy()
        shoulder = strap_end
    else:
        long_sleeves = kind in ("long-sleeve", "sweater")
        if long_sleeves:
            angle = np.deg2rad(rng.uniform(58.0, 75.0))
            length = rng.uniform(0.42, 0.52) * height
            sleeve_width = rng.uniform(0.10, 0.14) * width
        else:
            angle = np.deg2rad(rng.uniform(25.0, 50.0))
            length = rng.uniform(0.13, 0.20) * height
            sleeve_width = rng.uniform(0.15, 0.20) * width
        direction = np.array([np.cos(angle), np.sin(angle)])
        inward = np.array([-np.sin(angle), np.cos(angle)])  # perpendicular, towards the body
        outer_end = shoulder + length * direction
        inner_end = outer_end + sleeve_width * inward
        # A long sleeve hangs beside the body, its inner edge meeting the side seam at the armpit; a
        # short sleeve's armpit must sit below the sleeve's inner end for the outline not to fold.
        armpit_y = armpit_y if long_sleeves else max(armpit_y, inner_end[1] + 0.02 * height)
        armpit = np.array([centre + waist_half * 1.05, armpit_y])
        right = [neckline, shoulder[None], outer_end[None], inner_end[None], armpit[None]]
        sleeve_end = (outer_end + inner_end) / 2.0
    waist = np.array([centre + waist_half, (armpit[1] + hem) / 2.0])
    hem_corner = np.array([centre + hem_half, hem])
    right.extend([waist[None], hem_corner[None], np.array([[centre, hem]])])
    hem_corner_index = -2  # in right_half: ..., waist, hem corner, hem centre (read after narrowing)
    right_half = np.concatenate(right, axis=0)
    # Long sleeves can reach past the frame: narrow the whole drawing to keep a white margin.
    reach = float(np.max(right_half[:, 0]) - centre)
    narrowing = min(1.0, 0.46 * width / max(reach, 1e-6))
    right_half[:, 0] = centre + (right_half[:, 0] - centre) * narrowing
    shoulder, sleeve_end, armpit = (
        np.array([centre + (point[0] - centre) * narrowing, point[1]]) for point in (shoulder, sleeve_end, armpit)
    )
    left_half = right_half[::-1].copy()
    left_half[:, 0] = width - left_half[:, 0]
    polygon = np.concatenate([right_half, left_half[1:-1]], axis=0)

    def mirror(point: np.ndarray) -> np.ndarray:
        return np.array([width - point[0], point[1]])

    keypoints = {
        "neck": np.array([centre, top]),
        "shoulder_right": shoulder,
        "shoulder_left": mirror(shoulder),
        "sleeve_right": sleeve_end,
        "sleeve_left": mirror(sleeve_end),
        "armpit_right": armpit,
        "armpit_left": mirror(armpit),
        "hem_right": right_half[hem_corner_index].copy(),
        "hem_left": mirror(right_half[hem_corner_index]),
    }
    return polygon, keypoints


def _pattern(rng: np.random.Generator, kind: str, shape: Tuple[int, int]) -> np.ndarray:
    """A full-frame (H, W, 3) float32 texture of the given kind; the garment mask cuts it out later."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = _random_colour(rng)
    second = _contrasting_colour(rng, base)
    texture = np.empty((height, width, 3), np.float32)
    texture[:] = base
    if kind in ("solid", "logo"):
        return texture
    if kind == "stripes":
        angle = np.deg2rad(rng.choice([0.0, 90.0, 45.0, -45.0, rng.uniform(-80.0, 80.0)]))
        period = rng.uniform(6.0, 30.0)
        duty = rng.uniform(0.25, 0.6)
        phase = (xs * np.sin(angle) + ys * np.cos(angle)) / period + rng.uniform()
        fraction = phase - np.floor(phase)
        # Anti-aliased stripe edges (about one pixel wide), so thin stripes do not shimmer.
        edge = 1.0 / period
        coverage = np.clip(np.minimum(fraction, duty - fraction) / edge + 0.5, 0.0, 1.0)
        _paint(texture, coverage, second)
        if rng.uniform() < 0.35:  # a thin accent stripe in a third colour
            accent_half_width = min(0.08, (1.0 - duty) / 4.0)
            accent = np.clip((accent_half_width - np.abs(fraction - (duty + 1.0) / 2.0)) / edge + 0.5, 0.0, 1.0)
            _paint(texture, accent, _random_colour(rng))
        return texture
    if kind == "dots":
        spacing = rng.uniform(10.0, 26.0)
        radius = rng.uniform(0.18, 0.38) * spacing
        row = np.floor(ys / spacing)
        shifted_x = xs + (row % 2) * spacing / 2.0 * float(rng.uniform() < 0.6)
        du = (shifted_x + rng.uniform(0, spacing)) % spacing - spacing / 2.0
        dv = (ys % spacing) - spacing / 2.0
        coverage = np.clip(radius - np.sqrt(du * du + dv * dv) + 0.5, 0.0, 1.0)
        _paint(texture, coverage, second)
        return texture
    if kind == "checks":
        size = rng.uniform(8.0, 28.0)
        angle = np.deg2rad(rng.choice([0.0, 45.0]))
        u = (xs * np.cos(angle) + ys * np.sin(angle)) / size
        v = (-xs * np.sin(angle) + ys * np.cos(angle)) / size
        band_u = (np.floor(u) % 2).astype(np.float32)
        band_v = (np.floor(v) % 2).astype(np.float32)
        # Gingham: the crossing of two bands is full colour, a single band is half-way.
        _paint(texture, (band_u + band_v) / 2.0, second)
        return texture
    if kind == "camo":
        noise = _smooth_noise(rng, shape, int(rng.integers(5, 10)))
        levels = np.quantile(noise, [0.3, 0.55, 0.8])
        for level in levels:
            _paint(texture, (noise > level).astype(np.float32), _random_colour(rng, value=(0.2, 0.9)))
        return texture
    if kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        _paint(texture, ramp, second)
        return texture
    raise ValueError(f"unknown texture kind {kind!r}; valid: {', '.join(TEXTURE_KINDS)}")


def _draw_logo(rng: np.random.Generator, texture: np.ndarray, centre: np.ndarray, size: float) -> None:
    """Print a random logo-like shape (star, ring, triangle, diamond or 'text' rows) onto `texture`."""
    shape = texture.shape[:2]
    colour = _contrasting_colour(rng, texture[int(centre[1]), int(centre[0])])
    kind = rng.choice(["star", "ring", "triangle", "diamond", "text"])
    if kind == "star":
        points = int(rng.integers(5, 9))
        angles = np.linspace(0.0, 2.0 * np.pi, 2 * points, endpoint=False) + rng.uniform(0, np.pi)
        radii = np.where(np.arange(2 * points) % 2 == 0, size / 2.0, size * rng.uniform(0.2, 0.35))
        star = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        coverage = _polygon_mask(shape, star)
    elif kind == "ring":
        outer = _ellipse_mask(shape, centre, (size / 2.0, size / 2.0))
        inner = _ellipse_mask(shape, centre, (size * 0.3, size * 0.3))
        coverage = np.clip(outer - inner, 0.0, 1.0)
    elif kind == "triangle":
        angles = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6]) + rng.uniform(-0.3, 0.3)
        coverage = _polygon_mask(shape, centre + size / 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1))
    elif kind == "diamond":
        half = size / 2.0
        coverage = _polygon_mask(shape, centre + np.array([[0, -half], [half * 0.7, 0], [0, half], [-half * 0.7, 0]]))
    else:
        coverage = np.zeros(shape, np.float32)
        rows = int(rng.integers(1, 4))
        line_height = size / (2.0 * rows)
        for row in range(rows):
            x = centre[0] - size / 2.0
            y = centre[1] - size / 4.0 + row * line_height * 1.6
            while x < centre[0] + size / 2.0:
                letter = rng.uniform(0.3, 0.8) * line_height
                box = np.array([[x, y], [x + letter, y], [x + letter, y + line_height], [x, y + line_height]])
                coverage = np.maximum(coverage, _polygon_mask(shape, box))
                x += letter + 0.25 * line_height
    _paint(texture, coverage, colour)


def _draw_product(rng: np.random.Generator, shape: Tuple[int, int]) -> _Garment:
    """Draw one shop photo: a garment with its texture, folds and seams, on white."""
    height, width = shape
    kind = str(rng.choice(GARMENT_KINDS))
    texture_kind = str(rng.choice(TEXTURE_KINDS))
    polygon, keypoints = _garment_outline(rng, kind, height, width)
    mask = _polygon_mask(shape, polygon)
    texture = _pattern(rng, texture_kind, shape)
    if texture_kind == "logo" or rng.uniform() < 0.25:
        chest = np.array(
            [width / 2.0 + rng.uniform(-0.08, 0.08) * width, keypoints["neck"][1] + rng.uniform(0.18, 0.3) * height]
        )
        _draw_logo(rng, texture, chest, rng.uniform(0.15, 0.32) * width)
    if kind == "sweater":
        # Knit ribs, plus a darker ribbed band at the hem and cuffs.
        columns = np.arange(width, dtype=np.float32)
        texture *= (1.0 - 0.06 * (np.sin(columns * 2.0 * np.pi / 4.0) > 0))[None, :, None]
        hem_band = np.zeros(shape, np.float32)
        hem_band[int(keypoints["hem_right"][1] - 0.05 * height) :, :] = 1.0
        for side in ("right", "left"):
            hem_band = np.maximum(
                hem_band, _ellipse_mask(shape, keypoints[f"sleeve_{side}"], (0.07 * width, 0.04 * height))
            )
        texture *= (1.0 - 0.18 * hem_band)[..., None]
    # Soft folds and a darker seam along the outline, as in a flat-lay photo.
    folds = 1.0 + 0.05 * _smooth_noise(rng, shape, 4)
    seam = mask - cv2.erode(mask, np.ones((3, 3), np.uint8))
    shading = (folds * (1.0 - 0.25 * seam))[..., None]
    garment = np.clip(texture * shading, 0.0, 1.0)
    photo = np.ones((height, width, 3), np.float32)
    _paint(photo, mask, garment)
    return _Garment(photo=photo, mask=mask, keypoints=keypoints, kind=kind)
