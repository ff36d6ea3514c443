"""Street conditions for studio photos: a person cut out by its parse map, put onto procedural clutter.

Every VITON person photo is a studio shot (one person, centred, full height, on white); street photos are
not. `street_version` turns one studio photo into a street-like one, seeded image by image:

1. `procedural_background`: layered clutter drawn with numpy/OpenCV (gravel-like noise, bricks, foliage
   blobs, stripes, gradients, random shapes), never a stored photo;
2. `person_matte`: the person's alpha from its LIP parse map (any non-background label, edge feathered
   slightly inward so the studio's white does not halo);
3. `street_photo`: the person scaled to 0.33-1.0 of the frame height, placed at random (sometimes partly
   out of the frame: a partial crop), then the whole photo colour-cast, brightness/contrast-jittered,
   blurred (Gaussian or motion) and JPEG re-encoded at quality 30-90.

`STREET_RANGES` holds the ranges; every draw comes from one generator (`street_rng(seed, image_id)`), so a
variant is reproducible image by image and does not depend on which other images were made.

Example:
    >>> from retrieval.street_conditions import street_version
    >>> photo = street_version(person_rgb, parse_labels, seed=0, image_id="000003_0")  # doctest: +SKIP
    >>> photo.image.shape, photo.conditions["jpeg_quality"]  # doctest: +SKIP
    ((256, 192, 3), 57)
"""

from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import cv2
import numpy as np

#: Bump when a drawing or a range changes, so cached variants made by older code are not reused.
STREET_FORMAT_VERSION = 1


@dataclass(frozen=True)
class StreetRanges:
    """The ranges the street conditions are drawn from (uniformly, unless said otherwise).

    Attributes:
        scale: height of the scaled person photo / frame height ("down to about a third of the frame").
        crop_probability: chance that the person may be pushed partly out of the frame (a partial crop).
        max_crop: in a crop, at most this share of the scaled person photo leaves the frame, per axis.
        gain: per-channel colour cast (multiplies R, G, B independently).
        brightness: offset added to every channel, as a fraction of 255.
        contrast: stretch about the photo's mean grey.
        motion_blur_probability: chance of motion blur; Gaussian blur otherwise (every photo is blurred).
        gaussian_sigma: Gaussian sigma as a fraction of the frame height (0.5-1.5 px at 256).
        motion_length: motion-blur streak length as a fraction of the frame height (2.5-7.5 px at 256).
        jpeg_quality: JPEG quality, integers, both ends included.
        feather: sigma in pixels of the matte's edge (`person_matte`).
    """

    scale: Tuple[float, float] = (0.33, 1.0)
    crop_probability: float = 0.35
    max_crop: float = 0.35
    gain: Tuple[float, float] = (0.8, 1.2)
    brightness: Tuple[float, float] = (-0.12, 0.12)
    contrast: Tuple[float, float] = (0.75, 1.25)
    motion_blur_probability: float = 0.4
    gaussian_sigma: Tuple[float, float] = (0.002, 0.006)
    motion_length: Tuple[float, float] = (0.01, 0.03)
    jpeg_quality: Tuple[int, int] = (30, 90)
    feather: float = 1.0


STREET_RANGES = StreetRanges()


@dataclass
class StreetPhoto:
    """One street-condition photo and what made it.

    Attributes:
        image: the photo as a reader will see it (decoded from `jpeg`).
        jpeg: the encoded file (write these bytes: re-encoding would add a second round of artefacts).
        matte: the person's alpha in the frame, before the photo-level blur.
        labels: the parse map carried through the same scale and placement (0 outside the person), or None.
        conditions: the values drawn (scale, x0, y0, cropped, gain, brightness, contrast, blur, blur_size,
            jpeg_quality), for reports and tests.

    Shape:
        - image: (H, W, 3) uint8; matte: (H, W) float32 in [0, 1]; labels: (H, W) uint8.
    """

    image: np.ndarray
    jpeg: bytes
    matte: np.ndarray
    labels: Optional[np.ndarray] = None
    conditions: Dict[str, Any] = field(default_factory=dict)


def street_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of one image: a function of (seed, image id) only, stable across runs and machines."""
    digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode("utf-8")).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


# --------------------------------------------------------------------------------------------------
# Procedural backgrounds
# --------------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator, hue=(0.0, 1.0), saturation=(0.0, 0.8), value=(0.2, 0.95)) -> np.ndarray:
    """A random RGB colour in [0, 1], float32 (3,)."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(*hue) % 1.0, rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, np.float32)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Noise in about [-1, 1] with features about 1/cells of the frame: a coarse grid, upsampled."""
    height, width = shape
    cells = max(1, int(cells))
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, max(1, round((cells + 1) * width / max(height, 1))))).astype(
        np.float32
    )
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _gradient(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
    return _colour(rng) * (1.0 - ramp) + _colour(rng) * ramp


def _gravel(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Asphalt, gravel, sand: a dull colour under several octaves of noise and scattered stones."""
    height, width = shape
    base = _colour(rng, saturation=(0.0, 0.35), value=(0.3, 0.75))
    shade = sum(_smooth_noise(rng, shape, cells) * weight for cells, weight in ((3, 0.15), (12, 0.12), (40, 0.1)))
    shade = shade + rng.normal(0.0, 0.1, size=shape).astype(np.float32)
    canvas = base * (1.0 + shade[..., None])
    for _ in range(int(rng.integers(20, 80) * max(1.0, height * width / 49152.0))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(1, max(2, width // 40 + 2))), int(rng.integers(1, max(2, height // 50 + 2))))
        stone = np.clip(base * rng.uniform(0.5, 1.6), 0.0, 1.0)
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, stone.tolist(), -1, cv2.LINE_AA)
    return canvas


def _bricks(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """A brick or tile wall: rows of jittered rectangles in mortar, every other row offset."""
    height, width = shape
    mortar = _colour(rng, saturation=(0.0, 0.2), value=(0.5, 0.9))
    brick = _colour(rng, hue=(0.0, 0.12), saturation=(0.3, 0.8), value=(0.3, 0.8))
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = mortar
    brick_h = max(2.0, rng.uniform(0.04, 0.12) * height)
    brick_w = brick_h * rng.uniform(1.8, 3.2)
    gap = max(1, int(round(brick_h * rng.uniform(0.08, 0.2))))
    for row, top in enumerate(np.arange(0.0, height, brick_h)):
        offset = (brick_w / 2.0) * (row % 2) - brick_w
        for left in np.arange(offset, width, brick_w):
            tint = np.clip(brick * rng.uniform(0.75, 1.25, size=3), 0.0, 1.0)
            corner = (int(left) + gap, int(top) + gap)
            opposite = (int(left + brick_w) - 1, int(top + brick_h) - 1)
            cv2.rectangle(canvas, corner, opposite, tint.tolist(), -1)
    return canvas * (1.0 + 0.08 * rng.normal(size=shape).astype(np.float32)[..., None])


def _foliage(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Hedges and trees: many overlapping green-to-yellow leaf blobs over a dark base."""
    height, width = shape
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = _colour(rng, hue=(0.2, 0.4), saturation=(0.4, 0.9), value=(0.08, 0.3))
    for _ in range(int(rng.integers(80, 220))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = max(1.0, rng.uniform(0.015, 0.07) * width)
        axes = (max(1, int(size)), max(1, int(size * rng.uniform(0.4, 1.0))))
        leaf = _colour(rng, hue=(0.14, 0.42), saturation=(0.35, 0.95), value=(0.15, 0.85))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, leaf.tolist(), -1, cv2.LINE_AA)
    return canvas


def _stripes(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Awnings, fences, crossings: straight stripes of two colours at a random angle, hard or soft."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, np.pi)
    period = max(2.0, rng.uniform(0.03, 0.2) * width)
    phase = np.sin(2.0 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    mix = (phase > rng.uniform(-0.5, 0.5)).astype(np.float32) if rng.uniform() < 0.6 else (phase + 1.0) / 2.0
    return _colour(rng) * (1.0 - mix[..., None]) + _colour(rng) * mix[..., None]


def _draw_shapes(rng: np.random.Generator, canvas: np.ndarray, count: int) -> None:
    """Street furniture in the crudest form: rectangles, discs, polygons and poles/lines, in place."""
    height, width = canvas.shape[:2]
    scale = max(height, width)
    for _ in range(count):
        colour = _colour(rng, saturation=(0.0, 1.0), value=(0.05, 1.0)).tolist()
        kind = rng.uniform()
        if kind < 0.35:
            x0, y0 = int(rng.uniform(-0.2, 1.0) * width), int(rng.uniform(-0.2, 1.0) * height)
            x1, y1 = x0 + int(rng.uniform(0.05, 0.4) * width), y0 + int(rng.uniform(0.05, 0.4) * height)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, -1)
        elif kind < 0.6:
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            radius = max(1, int(rng.uniform(0.02, 0.15) * scale))
            cv2.circle(canvas, centre, radius, colour, -1, cv2.LINE_AA)
        elif kind < 0.8:
            centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            corners = centre + rng.uniform(-1.0, 1.0, size=(5, 2)) * rng.uniform(0.05, 0.25) * scale
            cv2.fillPoly(canvas, [cv2.convexHull(corners.astype(np.int32))], colour, cv2.LINE_AA)
        else:
            start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            thickness = max(1, int(rng.uniform(0.003, 0.04) * scale))
            cv2.line(canvas, start, end, colour, thickness, cv2.LINE_AA)


def _region(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Where a layer shows, (H, W) float32 in [0, 1]: a half plane (ground below a wall), a box, or blobs."""
    height, width = shape
    kind = rng.uniform()
    if kind < 0.4:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(-0.35, 0.35) + (np.pi / 2.0 if rng.uniform() < 0.75 else 0.0)  # mostly a horizon
        distance = (xs - width / 2.0) * np.cos(angle) + (ys - height / 2.0) * np.sin(angle)
        region = (distance > rng.uniform(-0.3, 0.3) * max(height, width)).astype(np.float32)
    elif kind < 0.7:
        region = np.zeros(shape, np.float32)
        x0, y0 = int(rng.uniform(-0.1, 0.7) * width), int(rng.uniform(-0.1, 0.7) * height)
        x1, y1 = x0 + int(rng.uniform(0.2, 0.8) * width), y0 + int(rng.uniform(0.2, 0.8) * height)
        cv2.rectangle(region, (x0, y0), (x1, y1), 1.0, -1)
    else:
        region = (_smooth_noise(rng, shape, int(rng.integers(2, 6))) > rng.uniform(-0.3, 0.3)).astype(np.float32)
    return region


_TEXTURES: Tuple[Callable[[np.random.Generator, Tuple[int, int]], np.ndarray], ...] = (
    _gravel,
    _bricks,
    _foliage,
    _stripes,
)


def procedural_background(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    """A cluttered street-like background, drawn (never read from a photo): several layered textures.

    A full-frame texture (gravel, bricks, foliage or stripes), one to three more textures or gradients
    showing through random regions (a half plane, a box, blobs), a few random shapes on top, then grain.

    Args:
        rng: the generator every draw comes from.
        size: (H, W) of the background.

    Shape:
        - Output: (H, W, 3) uint8 RGB.
    """
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be (H, W) with both sides >= 1, got {size}")
    shape = (height, width)
    canvas = _TEXTURES[int(rng.integers(len(_TEXTURES)))](rng, shape).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        layers = _TEXTURES + (_gradient,)
        layer = layers[int(rng.integers(len(layers)))](rng, shape)
        region = _region(rng, shape)
        region = cv2.GaussianBlur(region, (0, 0), rng.uniform(0.3, 2.0))[..., None] * rng.uniform(0.6, 1.0)
        canvas = canvas * (1.0 - region) + layer * region
    _draw_shapes(rng, canvas, int(rng.integers(3, 11)))
    # Grain: no surface of a street is one flat colour (and flat areas would be trivially told from the person).
    canvas = canvas + rng.normal(0.0, rng.uniform(0.01, 0.03), size=canvas.shape).astype(np.float32)
    return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Mattes
# --------------------------------------------------------------------------------------------------


def person_matte(parse_labels: np.ndarray, feather: float = STREET_RANGES.feather) -> np.ndarray:
    """The person's alpha from a LIP parse map: every non-background label (not 0), edge feathered.

    The mask is eroded by one pixel before the blur, so the soft edge lies inside the person and the
    studio white around it does not leave a halo on the street.

    Args:
        parse_labels: (H, W) LIP labels (0 background).
        feather: Gaussian sigma of the edge in pixels; 0 keeps the hard mask.

    Shape:
        - Output: (H, W) float32 in [0, 1].

    Example:
        >>> labels = np.zeros((9, 9), np.uint8); labels[2:7, 2:7] = 5
        >>> alpha = person_matte(labels)
        >>> float(alpha[4, 4]) > 0.9, float(alpha[0, 0])
        (True, 0.0)
    """
    labels = np.asarray(parse_labels)
    if labels.ndim != 2:
        raise ValueError(f"parse_labels must be (H, W), got shape {labels.shape}")
    hard = (labels != 0).astype(np.float32)
    if feather <= 0:
        return hard
    inner = cv2.erode(hard, np.ones((3, 3), np.uint8))
    return np.clip(cv2.GaussianBlur(inner, (0, 0), float(feather)), 0.0, 1.0)


def studio_matte(person_rgb: np.ndarray, threshold: int = 240, feather: float = STREET_RANGES.feather) -> np.ndarray:
    """A fallback alpha for a studio photo without a parse map: every pixel darker than near-white.

    Shape:
        - person_rgb: (H, W, 3) uint8; Output: (H, W) float32 in [0, 1].
    """
    foreground = (np.asarray(person_rgb).min(axis=2) < threshold).astype(np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return person_matte(foreground, feather=feather)


# --------------------------------------------------------------------------------------------------
# Compositing and photo conditions
# --------------------------------------------------------------------------------------------------


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes at `quality` (the one encoder of this module, for tests to watch)."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding of an image of shape {image.shape} failed")
    return encoded.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3)."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("cannot decode the JPEG bytes")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _resize(image: np.ndarray, size: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = height < image.shape[0]
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _offset_range(frame: int, extent: int, overhang: float) -> Tuple[float, float]:
    """Range of the top-left offset of a span of `extent` in a frame: inside (or centred-ish when larger),
    widened by `overhang` of the span on both sides for a partial crop."""
    low, high = min(0, frame - extent), max(0, frame - extent)
    return low - overhang * extent, high + overhang * extent


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    centre = (length - 1) / 2.0
    dx, dy = np.cos(angle) * centre, np.sin(angle) * centre
    start = (int(round(centre - dx)), int(round(centre - dy)))
    end = (int(round(centre + dx)), int(round(centre + dy)))
    cv2.line(kernel, start, end, 1.0, 1)
    return kernel / max(float(kernel.sum()), 1e-6)


def street_photo(
    person_rgb: np.ndarray,
    alpha: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    *,
    labels: Optional[np.ndarray] = None,
    ranges: StreetRanges = STREET_RANGES,
) -> StreetPhoto:
    """Composite a person onto a background under street conditions (`StreetRanges`), seeded by `rng`.

    The person photo (with its alpha and labels) is scaled so its height is `scale` x the frame's (aspect
    kept), placed at a random offset, partly out of the frame with probability `crop_probability`, and
    alpha-blended over the background; the whole photo then gets the colour cast, brightness/contrast,
    blur and JPEG re-encode.

    Args:
        person_rgb: the studio photo.
        alpha: the person's matte (`person_matte`), same size as the photo.
        background: the frame; the output has its size.
        rng: the generator every draw comes from (`street_rng(seed, image_id)`).
        labels: the photo's parse map, carried through the same geometry (nearest neighbour), or None.
        ranges: the ranges to draw from.

    Shape:
        - person_rgb: (h, w, 3) uint8; alpha: (h, w) float in [0, 1]; labels: (h, w) uint8.
        - background: (H, W, 3) uint8; output image (H, W, 3) uint8, matte (H, W) float32, labels (H, W).
    """
    for name, array in (("person_rgb", person_rgb), ("background", background)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{name} must be (H, W, 3) uint8, got {array.dtype} {array.shape}")
    if alpha.shape != person_rgb.shape[:2] or (labels is not None and labels.shape != person_rgb.shape[:2]):
        raise ValueError(
            f"alpha {alpha.shape} and labels {None if labels is None else labels.shape} must match the photo "
            f"{person_rgb.shape[:2]}"
        )
    height, width = background.shape[:2]
    source_h, source_w = person_rgb.shape[:2]

    scale = float(rng.uniform(*ranges.scale))
    scaled_h = max(1, int(round(scale * height)))
    scaled_w = max(1, int(round(source_w * scaled_h / source_h)))
    cropped = bool(rng.uniform() < ranges.crop_probability)
    overhang = ranges.max_crop if cropped else 0.0
    x0 = int(round(rng.uniform(*_offset_range(width, scaled_w, overhang))))
    y0 = int(round(rng.uniform(*_offset_range(height, scaled_h, overhang))))

    person = _resize(person_rgb, (scaled_h, scaled_w)).astype(np.float32) / 255.0
    person_alpha = np.clip(_resize(alpha.astype(np.float32), (scaled_h, scaled_w)), 0.0, 1.0)
    # The part of the scaled photo inside the frame (empty when it falls wholly outside).
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(height, y0 + scaled_h), min(width, x0 + scaled_w)
    matte = np.zeros((height, width), np.float32)
    canvas = background.astype(np.float32) / 255.0
    out_labels = None if labels is None else np.zeros((height, width), np.uint8)
    if bottom > top and right > left:
        inside = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
        matte[top:bottom, left:right] = person_alpha[inside]
        a = matte[top:bottom, left:right, None]
        canvas[top:bottom, left:right] = canvas[top:bottom, left:right] * (1.0 - a) + person[inside] * a
        if labels is not None:
            scaled_labels = _resize(labels, (scaled_h, scaled_w), nearest=True)
            out_labels[top:bottom, left:right] = scaled_labels[inside]

    gain = rng.uniform(*ranges.gain, size=3).astype(np.float32)
    contrast = float(rng.uniform(*ranges.contrast))
    brightness = float(rng.uniform(*ranges.brightness))
    canvas = canvas * gain
    mean = float(canvas.mean())
    canvas = np.clip((canvas - mean) * contrast + mean + brightness, 0.0, 1.0)

    if rng.uniform() < ranges.motion_blur_probability:
        blur = "motion"
        blur_size = max(2, int(round(rng.uniform(*ranges.motion_length) * height)))
        kernel = _motion_kernel(blur_size | 1, float(rng.uniform(0.0, np.pi)))
        canvas = cv2.filter2D(canvas, -1, kernel, borderType=cv2.BORDER_REFLECT)
    else:
        blur = "gaussian"
        blur_size = float(rng.uniform(*ranges.gaussian_sigma) * height)
        canvas = cv2.GaussianBlur(canvas, (0, 0), max(blur_size, 1e-3))

    quality = int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))
    composed = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    jpeg = encode_jpeg(composed, quality)
    conditions = {
        "scale": scale,
        "x0": x0,
        "y0": y0,
        "cropped": cropped,
        "gain": gain.tolist(),
        "brightness": brightness,
        "contrast": contrast,
        "blur": blur,
        "blur_size": blur_size,
        "jpeg_quality": quality,
    }
    return StreetPhoto(image=decode_jpeg(jpeg), jpeg=jpeg, matte=matte, labels=out_labels, conditions=conditions)


def composite_street(
    person_rgb: np.ndarray,
    alpha: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    ranges: StreetRanges = STREET_RANGES,
) -> np.ndarray:
    """`street_photo`'s image alone: the person under street conditions, (H, W, 3) uint8 as decoded."""
    return street_photo(person_rgb, alpha, background, rng, ranges=ranges).image


def street_version(
    person_rgb: np.ndarray,
    parse_labels: Optional[np.ndarray],
    seed: int,
    image_id: str,
    ranges: StreetRanges = STREET_RANGES,
    frame_scale: float = 1.0,
) -> StreetPhoto:
    """The street version of one studio photo, a function of (photo, parse map, seed, image id, frame scale) only.

    The frame is the photo's size times `frame_scale`; the matte comes from the parse map (resized to the photo
    when it differs), or from `studio_matte` when there is none. With `frame_scale` 1 a person scaled to a third
    of the frame keeps a third of the studio photo's pixels (a low-resolution photo); with 3 the same person
    keeps the studio photo's own resolution, as in a phone photo where the person is small in a large frame.

    Shape:
        - person_rgb: (H, W, 3) uint8; parse_labels: (h, w) uint8 or None; output image
          (round(H * frame_scale), round(W * frame_scale), 3).
    """
    if not frame_scale > 0:
        raise ValueError(f"frame_scale must be > 0, got {frame_scale}")
    rng = street_rng(seed, image_id)
    size = person_rgb.shape[:2]
    frame = (max(1, round(size[0] * frame_scale)), max(1, round(size[1] * frame_scale)))
    if parse_labels is not None:
        labels = _resize(np.asarray(parse_labels, np.uint8), size, nearest=True)
        alpha = person_matte(labels, ranges.feather)
    else:
        labels = None
        alpha = studio_matte(person_rgb, feather=ranges.feather)
    background = procedural_background(rng, frame)
    return street_photo(person_rgb, alpha, background, rng, labels=labels, ranges=ranges)
