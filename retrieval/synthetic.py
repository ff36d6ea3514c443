"""The embedded synthetic street-to-shop set: seeded, generated in seconds, in the VITON layout.

Every product is a procedurally drawn top (t-shirt, long sleeve, tank or sweater silhouette) with its
own texture (solid colour, stripes, polka dots, checks, camouflage, gradient, optionally a printed
logo) on white: the "shop" photo. Its "street" photo is the same garment worn by a person-like
figure: the product photo is warped onto the torso (random perspective, rotation and a non-rigid
waist squeeze with small wrinkles), re-lit (gain, gamma, colour cast, light gradient), partly occluded
(an arm across the body, a bag, hair), over a cluttered background (gradients, rectangles, discs,
lines, noise), with the human-parsing label map of the figure (LIP labels, as in VITON).

The task is meant to be like the real one in kind: retrieval on raw street photos is imperfect (the
background, skin, hair and pants dominate a global colour statistic, the garment is deformed and
re-lit) but far above chance; isolating the garment (labels 5) helps, which is what the proxy stages
of the project are for.

Files are PNG (lossless, byte-identical for a seed); product `i` depends only on (seed, i), so a
larger set extends a smaller one with the same seed. Generation writes into a temporary directory and
renames it into place last, so an interrupted run never looks complete.

Example:
    >>> from retrieval.synthetic import make_synthetic_dataset
    >>> root = make_synthetic_dataset("/tmp/synthetic-120", n_products=120, seed=0)  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
    ['SYNTHETIC_COMPLETE.json', 'train', 'train_pairs.txt']
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union

import cv2
import numpy as np

from retrieval.io import write_image_atomic

logger = logging.getLogger(__name__)

#: Written last into a generated root; its presence (with matching parameters) means "complete".
SYNTHETIC_MARKER = "SYNTHETIC_COMPLETE.json"
#: Bump when the drawing changes, so cached sets made by older code are not mistaken for new ones.
SYNTHETIC_FORMAT_VERSION = 1

GARMENT_KINDS = ("t-shirt", "long-sleeve", "tank", "sweater")
TEXTURE_KINDS = ("solid", "stripes", "dots", "checks", "camo", "gradient", "logo")

# LIP human-parsing labels used by the figures (the same numbering as VITON's image-parse maps).
LABEL_BACKGROUND = 0
LABEL_HAIR = 2
LABEL_UPPER_CLOTHES = 5
LABEL_PANTS = 9
LABEL_FACE = 13
LABEL_LEFT_ARM = 14  # the person's left arm: the right side of the image for a figure facing the camera
LABEL_RIGHT_ARM = 15

# The usual LIP visualisation palette, so the parse maps look like VITON's in an image viewer.
LIP_PALETTE: Tuple[int, ...] = (
    0,
    0,
    0,
    128,
    0,
    0,
    255,
    0,
    0,
    0,
    85,
    0,
    170,
    0,
    51,
    255,
    85,
    0,
    0,
    0,
    85,
    0,
    119,
    221,
    85,
    85,
    0,
    0,
    85,
    85,
    85,
    51,
    0,
    52,
    86,
    128,
    0,
    128,
    0,
    0,
    0,
    255,
    51,
    170,
    221,
    0,
    255,
    255,
    85,
    255,
    170,
    170,
    255,
    85,
    255,
    255,
    0,
    255,
    170,
    0,
)

_SKIN_TONES = np.array(
    [[0.96, 0.80, 0.69], [0.89, 0.72, 0.58], [0.78, 0.57, 0.44], [0.60, 0.42, 0.30], [0.42, 0.28, 0.20]],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [[0.08, 0.06, 0.05], [0.25, 0.16, 0.10], [0.45, 0.30, 0.16], [0.80, 0.66, 0.42], [0.55, 0.22, 0.10]],
    dtype=np.float32,
)
_PANTS_COLOURS = np.array(
    [[0.15, 0.22, 0.40], [0.30, 0.40, 0.60], [0.08, 0.08, 0.09], [0.70, 0.63, 0.50], [0.35, 0.35, 0.36]],
    dtype=np.float32,
)

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


def _label(labels: np.ndarray, coverage: np.ndarray, value: int) -> None:
    labels[coverage > 0.5] = value


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


# --------------------------------------------------------------------------------------------------
# Street photos
# --------------------------------------------------------------------------------------------------


def _cluttered_background(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = ((ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6))[..., None]
    canvas = _random_colour(rng, value=(0.3, 0.95)) * (1.0 - ramp) + _random_colour(rng, value=(0.3, 0.95)) * ramp
    canvas = canvas.astype(np.float32)
    for _ in range(int(rng.integers(6, 16))):
        shape_kind = rng.uniform()
        colour = _random_colour(rng, saturation=(0.0, 0.9), value=(0.1, 1.0))
        opacity = rng.uniform(0.4, 1.0)
        if shape_kind < 0.55:
            x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
            w, h = rng.uniform(0.08, 0.6) * width, rng.uniform(0.05, 0.6) * height
            coverage = _polygon_mask(shape, np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]]))
        elif shape_kind < 0.8:
            centre = (rng.uniform(0, width), rng.uniform(0, height))
            radius = rng.uniform(0.03, 0.2) * width
            coverage = _ellipse_mask(shape, centre, (radius, radius * rng.uniform(0.5, 1.5)), rng.uniform(0, 180))
        else:
            points = np.stack([rng.uniform(0, width, 2), rng.uniform(0, height, 2)], axis=1)
            coverage = _polyline_mask(shape, points, rng.uniform(1.0, 6.0))
        _paint(canvas, coverage * opacity, colour)
    return canvas


def _street_photo(rng: np.random.Generator, garment: _Garment, shape: Tuple[int, int]):
    """Dress a person-like figure in `garment` over clutter; return (photo uint8 RGB, LIP labels)."""
    height, width = shape
    canvas = _cluttered_background(rng, shape)
    labels = np.zeros(shape, np.uint8)
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.05)
    hair_colour = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]

    # Where the garment goes: product pixels -> street pixels by scale, rotation and translation of
    # the neck, then each corner of the frame jittered for a random perspective.
    scale = rng.uniform(0.62, 0.76)
    squeeze_x = rng.uniform(0.88, 1.04)
    rotation = np.deg2rad(rng.uniform(-6.0, 6.0))
    neck_street = np.array([width * rng.uniform(0.42, 0.58), height * rng.uniform(0.19, 0.26)])
    neck_product = garment.keypoints["neck"]
    cos, sin = np.cos(rotation), np.sin(rotation)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([scale * squeeze_x, scale])
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    placed = (corners - neck_product) @ linear.T + neck_street
    placed += rng.uniform(-0.05, 0.05, size=(4, 2)) * np.array([width, height])
    homography = cv2.getPerspectiveTransform(corners.astype(np.float32), placed.astype(np.float32))

    def to_street(point: np.ndarray) -> np.ndarray:
        return cv2.perspectiveTransform(point.reshape(1, 1, 2).astype(np.float64), homography).reshape(2)

    # Non-rigid part: the torso narrows at the waist (a horizontal squeeze varying with height), plus
    # small smooth wrinkles. Built as a backward map for cv2.remap.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    hem_y = to_street(garment.keypoints["hem_right"])[1]
    waist_y = (neck_street[1] + hem_y) / 2.0 + rng.uniform(-0.05, 0.08) * height
    squeeze = rng.uniform(0.0, 0.12)
    factor = 1.0 + squeeze * np.exp(-(((ys - waist_y) / (0.18 * height)) ** 2))  # >1: sample wider => narrower
    wrinkle = rng.uniform(1.0, 3.0)
    map_x = neck_street[0] + (xs - neck_street[0]) * factor + wrinkle * _smooth_noise(rng, shape, 6)
    map_y = ys + wrinkle * _smooth_noise(rng, shape, 6)
    map_x, map_y = map_x.astype(np.float32), map_y.astype(np.float32)

    def deform(points: np.ndarray) -> np.ndarray:
        """Approximate forward position of a warped keypoint after the waist squeeze."""
        row_factor = 1.0 + squeeze * np.exp(-(((points[1] - waist_y) / (0.18 * height)) ** 2))
        return np.array([neck_street[0] + (points[0] - neck_street[0]) / row_factor, points[1]])

    def warp(image: np.ndarray) -> np.ndarray:
        straight = cv2.warpPerspective(
            image, homography, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        return cv2.remap(straight, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    worn_mask = warp(garment.mask)
    worn_photo = warp(garment.photo * garment.mask[..., None])
    # Body folds: broad shading plus a few vertical creases.
    creases = 1.0 + 0.12 * _smooth_noise(rng, shape, 3) - 0.08 * np.abs(np.sin(xs / rng.uniform(6.0, 14.0))) ** 8
    worn_photo = worn_photo * creases[..., None]

    keypoint = {name: deform(to_street(point)) for name, point in garment.keypoints.items()}
    shoulder_width = float(np.linalg.norm(keypoint["shoulder_right"] - keypoint["shoulder_left"]))
    torso_half = abs(keypoint["hem_right"][0] - keypoint["hem_left"][0]) / 2.0
    hem_y = max(keypoint["hem_right"][1], keypoint["hem_left"][1])
    face_centre = keypoint["neck"] + np.array([rng.uniform(-2.0, 2.0), -0.11 * height])
    face_axes = (0.085 * width * scale / 0.7, 0.07 * height * scale / 0.7)

    # Long hair falls behind the shoulders; drawn first so the body covers it.
    if rng.uniform() < 0.5:
        hair_length = rng.uniform(0.05, 0.2) * height
        top = face_centre[1]
        half = face_axes[0] * rng.uniform(1.3, 1.6)
        long_hair = _polygon_mask(
            shape,
            np.array(
                [
                    [face_centre[0] - half, top],
                    [face_centre[0] + half, top],
                    [face_centre[0] + half * 1.1, keypoint["neck"][1] + hair_length],
                    [face_centre[0] - half * 1.1, keypoint["neck"][1] + hair_length],
                ]
            ),
        )
        _paint(canvas, long_hair, hair_colour)
        _label(labels, long_hair, LABEL_HAIR)

    # Legs in pants, from under the garment down to the frame's bottom.
    pants_colour = _PANTS_COLOURS[rng.integers(len(_PANTS_COLOURS))] * rng.uniform(0.85, 1.1)
    hip = hem_y - 0.05 * height
    centre_x = keypoint["neck"][0]
    spread = rng.uniform(0.0, 0.06) * width
    for side in (-1.0, 1.0):
        leg = np.array(
            [
                [centre_x, hip],
                [centre_x + side * torso_half * 0.95, hip],
                [centre_x + side * (torso_half * 0.75 + spread), height + 2.0],
                [centre_x + side * (spread + 2.0), height + 2.0],
            ]
        )
        coverage = _polygon_mask(shape, leg)
        _paint(canvas, coverage, pants_colour * (0.92 if side < 0 else 1.0))
        _label(labels, coverage, LABEL_PANTS)

    # Arms: from the shoulder, through the sleeve end, to the hand beside the hips.
    arm_width = max(6.0, 0.15 * shoulder_width * rng.uniform(0.9, 1.2))
    for side, label in (("right", LABEL_LEFT_ARM), ("left", LABEL_RIGHT_ARM)):
        outward = 1.0 if side == "right" else -1.0
        shoulder = keypoint[f"shoulder_{side}"]
        sleeve = keypoint[f"sleeve_{side}"]
        hand = np.array(
            [
                keypoint[f"hem_{side}"][0] + outward * rng.uniform(0.02, 0.08) * width,
                max(hem_y + rng.uniform(-0.05, 0.06) * height, sleeve[1] + 0.08 * height),
            ]
        )
        arm = _polyline_mask(shape, np.stack([shoulder, sleeve, hand]), arm_width)
        arm = np.maximum(arm, _ellipse_mask(shape, hand, (arm_width * 0.6, arm_width * 0.75)))
        _paint(canvas, arm, skin * (0.95 if side == "left" else 1.0))
        _label(labels, arm, label)

    # The garment itself.
    _paint(canvas, worn_mask, worn_photo / np.maximum(worn_mask[..., None], 1e-3))
    _label(labels, worn_mask, LABEL_UPPER_CLOTHES)

    # Neck and face (LIP has no neck label; VITON's maps fold the neck into the face), then hair on top.
    neck_half = 0.35 * face_axes[0]
    neck = _polygon_mask(
        shape,
        np.array(
            [
                [face_centre[0] - neck_half, face_centre[1]],
                [face_centre[0] + neck_half, face_centre[1]],
                [keypoint["neck"][0] + neck_half, keypoint["neck"][1] + 0.02 * height],
                [keypoint["neck"][0] - neck_half, keypoint["neck"][1] + 0.02 * height],
            ]
        ),
    )
    neck = np.clip(neck - worn_mask, 0.0, 1.0)
    face = np.maximum(neck, _ellipse_mask(shape, face_centre, face_axes, rng.uniform(-5, 5)))
    _paint(canvas, face, skin)
    _label(labels, face, LABEL_FACE)
    hair_top = _ellipse_mask(
        shape,
        face_centre + np.array([0.0, -0.35 * face_axes[1]]),
        (face_axes[0] * 1.12, face_axes[1] * 0.8),
    )
    hair_top = np.clip(
        hair_top
        - _ellipse_mask(
            shape, face_centre + np.array([0.0, 0.25 * face_axes[1]]), (face_axes[0] * 0.95, face_axes[1] * 0.85)
        ),
        0.0,
        1.0,
    )
    _paint(canvas, hair_top, hair_colour)
    _label(labels, hair_top, LABEL_HAIR)

    # Occlusion: an arm across the body, a bag on its strap, or hair over one shoulder.
    occluder = rng.choice(["none", "arm", "bag", "hair"], p=[0.3, 0.25, 0.3, 0.15])
    if occluder == "arm":
        side, label = (("right", LABEL_LEFT_ARM), ("left", LABEL_RIGHT_ARM))[rng.integers(2)]
        other = "left" if side == "right" else "right"
        elbow = keypoint[f"armpit_{side}"] + np.array([0.0, rng.uniform(0.08, 0.2) * height])
        hand = keypoint[f"armpit_{other}"] + np.array([0.0, rng.uniform(0.05, 0.25) * height])
        arm = _polyline_mask(shape, np.stack([keypoint[f"shoulder_{side}"], elbow, hand]), arm_width * 1.1)
        arm = np.maximum(arm, _ellipse_mask(shape, hand, (arm_width * 0.7, arm_width * 0.7)))
        _paint(canvas, arm, skin)
        _label(labels, arm, label)
    elif occluder == "bag":
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        bag_w, bag_h = rng.uniform(0.18, 0.32) * width, rng.uniform(0.14, 0.26) * height
        bag_x = centre_x + side * torso_half * rng.uniform(0.3, 0.9)
        bag_y = rng.uniform(0.45, 0.7) * height
        bag = _polygon_mask(
            shape,
            np.array(
                [
                    [bag_x - bag_w / 2, bag_y],
                    [bag_x + bag_w / 2, bag_y],
                    [bag_x + bag_w / 2, bag_y + bag_h],
                    [bag_x - bag_w / 2, bag_y + bag_h],
                ]
            ),
        )
        strap_from = keypoint["shoulder_left" if side > 0 else "shoulder_right"]
        bag = np.maximum(bag, _polyline_mask(shape, np.stack([strap_from, np.array([bag_x, bag_y])]), 3.0))
        _paint(canvas, bag, _random_colour(rng, value=(0.1, 0.8)))
        _label(labels, bag, LABEL_BACKGROUND)  # LIP has no bag label: VITON's maps leave bags as background
    elif occluder == "hair":
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        # A lock falling from beside the face over the shoulder and chest (not across the face).
        strand_x = face_centre[0] + side * face_axes[0] * 1.15
        strand = _polyline_mask(
            shape,
            np.array(
                [
                    [strand_x, face_centre[1] + 0.3 * face_axes[1]],
                    [strand_x + side * 3.0, keypoint["neck"][1] + rng.uniform(0.1, 0.22) * height],
                ]
            ),
            face_axes[0] * rng.uniform(0.4, 0.6),
        )
        _paint(canvas, strand, hair_colour)
        _label(labels, strand, LABEL_HAIR)

    # Re-lighting of the whole scene: gain, gamma, colour cast and a light gradient, then sensor noise
    # and a touch of blur.
    gain = rng.uniform(0.7, 1.25)
    gamma = rng.uniform(0.75, 1.35)
    cast = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    light_angle = rng.uniform(0.0, 2.0 * np.pi)
    light = xs * np.cos(light_angle) + ys * np.sin(light_angle)
    light = 1.0 + rng.uniform(0.0, 0.25) * ((light - light.mean()) / max(float(np.ptp(light)), 1e-6))
    lit = (np.clip(canvas, 0.0, 1.0) ** gamma) * gain * cast * light[..., None]
    blur_sigma = rng.uniform(0.3, 1.0)
    lit = cv2.GaussianBlur(lit.astype(np.float32), (0, 0), blur_sigma)
    lit += rng.normal(0.0, rng.uniform(0.005, 0.025), size=lit.shape).astype(np.float32)
    photo = np.round(np.clip(lit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return photo, labels


# --------------------------------------------------------------------------------------------------
# The data set on disk
# --------------------------------------------------------------------------------------------------


def _marker_content(n_products: int, seed: int, size: Tuple[int, int]) -> Dict[str, object]:
    return {
        "format_version": SYNTHETIC_FORMAT_VERSION,
        "generator": "retrieval.synthetic.make_synthetic_dataset",
        "n_products": int(n_products),
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
    }


def _is_complete(root: Path, expected: Dict[str, object]) -> bool:
    """True if `root` holds a finished set made with the `expected` parameters.

    Raises:
        FileExistsError: `root` holds a finished set made with other parameters.
    """
    marker = root / SYNTHETIC_MARKER
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != expected:
        raise FileExistsError(
            f"{root} already holds a synthetic set with other parameters ({found}, wanted {expected}); "
            "choose another directory or delete this one."
        )
    return True


def make_synthetic_product(index: int, seed: int = 0, size: Tuple[int, int] = (256, 192)):
    """Draw product `index` of the set for `seed`: its shop photo, mask, street photo and parse map.

    Args:
        index: product number; the drawing depends only on (seed, index).
        seed: the set's seed.
        size: (H, W) of every image.

    Returns:
        dict with "product" (H, W, 3) uint8, "product_mask" (H, W) uint8 (0/255-ish, anti-aliased),
        "street" (H, W, 3) uint8, "parse" (H, W) uint8 LIP labels, "garment_kind" str.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    shape = (int(size[0]), int(size[1]))
    garment = _draw_product(rng, shape)
    street, parse = _street_photo(rng, garment, shape)
    return {
        "product": np.round(garment.photo * 255.0).astype(np.uint8),
        "product_mask": np.round(garment.mask * 255.0).astype(np.uint8),
        "street": street,
        "parse": parse,
        "garment_kind": garment.kind,
    }


def make_synthetic_dataset(
    root: Union[str, os.PathLike],
    n_products: int = 120,
    seed: int = 0,
    size: Tuple[int, int] = (256, 192),
) -> Path:
    """Generate the synthetic street-to-shop set into `root`, in the VITON layout.

    Layout (ids NNNNNN = 000001 ... n_products)::

        train_pairs.txt                  "NNNNNN_0.png NNNNNN_1.png" per line (person, product)
        train/image/NNNNNN_0.png         street photo
        train/cloth/NNNNNN_1.png         shop photo on white
        train/image-parse/NNNNNN_0.png   palette PNG, LIP labels 0, 2, 5, 9, 13, 14, 15
        train/cloth-mask/NNNNNN_1.png    grey product mask
        SYNTHETIC_COMPLETE.json          parameters; written last

    If `root` already holds a complete set with the same parameters nothing is done (resumable).

    Args:
        root: destination directory (its parent is created if needed).
        n_products: number of products (= pairs).
        seed: seed of the whole set.
        size: (H, W) of the images.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: n_products or size not positive.
        FileExistsError: `root` exists, is not empty and is not a complete set with these parameters.
    """
    if int(n_products) <= 0:
        raise ValueError(f"n_products must be positive, got {n_products}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (H, W) with both sides >= 32, got {size}")
    root = Path(root)
    expected = _marker_content(n_products, seed, size)
    if root.exists():
        if _is_complete(root, expected):
            return root
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists but is not a complete synthetic set (no {SYNTHETIC_MARKER}); delete it and retry."
            )
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    try:
        half = staging / "train"
        for folder in ("image", "cloth", "image-parse", "cloth-mask"):
            (half / folder).mkdir(parents=True)

        def draw_and_write(index: int) -> None:
            pair_id = f"{index:06d}"
            drawn = make_synthetic_product(index, seed=seed, size=size)
            # zlib level 1: the noisy street photos barely compress better at higher levels, and
            # encoding at the default level was most of the generation time.
            fast = {"compress_level": 1}
            write_image_atomic(half / "image" / f"{pair_id}_0.png", drawn["street"], **fast)
            write_image_atomic(half / "cloth" / f"{pair_id}_1.png", drawn["product"], **fast)
            write_image_atomic(half / "image-parse" / f"{pair_id}_0.png", drawn["parse"], palette=LIP_PALETTE, **fast)
            write_image_atomic(half / "cloth-mask" / f"{pair_id}_1.png", drawn["product_mask"], **fast)

        # Products are independent (product i depends on (seed, i) only) and numpy, cv2 and zlib release
        # the GIL, so threads speed generation up without changing a byte of the output.
        indices = range(1, int(n_products) + 1)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for _ in pool.map(draw_and_write, indices):
                pass
        finally:
            # On failure, drop the products not started yet and wait for the running ones, so nothing
            # writes into the staging directory while it is being removed.
            pool.shutdown(wait=True, cancel_futures=True)
        lines = [f"{index:06d}_0.png {index:06d}_1.png" for index in indices]
        (staging / "train_pairs.txt").write_text("\n".join(lines) + "\n")
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished the same set first: keep theirs if it is complete.
            if root.exists() and _is_complete(root, expected):
                shutil.rmtree(staging, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("generated synthetic street-to-shop set: %d products in %s", n_products, root)
    return root
