"""Street photos of the synthetic set: a shop photo worn by a person-like figure over clutter, with its parse map.

The product photo is warped onto the torso (random perspective, rotation and a non-rigid waist squeeze
with small wrinkles), re-lit (gain, gamma, colour cast, light gradient), partly occluded (an arm across
the body, a bag, hair), over a cluttered background (gradients, rectangles, discs, lines, noise), with
the human-parsing label map of the figure (LIP labels, as in VITON).
"""

from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

from retrieval.synthetic.drawing import (
    _ellipse_mask,
    _Garment,
    _paint,
    _polygon_mask,
    _polyline_mask,
    _random_colour,
    _smooth_noise,
)

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


def _label(labels: np.ndarray, coverage: np.ndarray, value: int) -> None:
    labels[coverage > 0.5] = value


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
