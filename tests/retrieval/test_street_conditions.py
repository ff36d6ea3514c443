"""Tests of retrieval.street_conditions on tiny drawn images (no VITON needed): the street-condition
compositing behind the ``viton-street`` dataset format."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import retrieval.street_conditions as street
from retrieval.street_conditions import (
    STREET_RANGES,
    StreetRanges,
    composite_street,
    encode_jpeg,
    person_matte,
    procedural_background,
    street_photo,
    street_rng,
    street_version,
)

HEIGHT, WIDTH = 64, 48


def _studio_person(height: int = HEIGHT, width: int = WIDTH):
    """A white studio photo with a dark 'person' (labels 2 hair, 5 top, 9 pants) filling rows 4-59, cols 12-35."""
    photo = np.full((height, width, 3), 245, np.uint8)
    labels = np.zeros((height, width), np.uint8)
    top, bottom, left, right = height // 16, height - height // 16, width // 4, 3 * width // 4
    labels[top:bottom, left:right] = 5
    labels[top : top + (bottom - top) // 5, left:right] = 2
    labels[top + 3 * (bottom - top) // 5 : bottom, left:right] = 9
    photo[labels == 2] = (60, 40, 20)
    photo[labels == 5] = (200, 30, 30)
    photo[labels == 9] = (20, 30, 120)
    return photo, labels


def _gradient_energy(image: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0)).mean() + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1)).mean())


def test_street_version_is_reproducible_image_by_image():
    photo, labels = _studio_person()
    first = street_version(photo, labels, seed=3, image_id="000001_0")
    again = street_version(photo, labels, seed=3, image_id="000001_0")
    assert first.jpeg == again.jpeg and first.conditions == again.conditions
    assert np.array_equal(first.labels, again.labels)
    assert street_version(photo, labels, seed=3, image_id="000002_0").jpeg != first.jpeg
    assert street_version(photo, labels, seed=4, image_id="000001_0").jpeg != first.jpeg
    assert np.array_equal(
        procedural_background(street_rng(1, "a"), (20, 30)), procedural_background(street_rng(1, "a"), (20, 30))
    )


@pytest.mark.parametrize("size", [(HEIGHT, WIDTH), (8, 6), (256, 192)])
def test_outputs_have_the_frame_shape_and_types(size):
    photo, labels = _studio_person(*size)
    made = street_version(photo, labels, seed=0, image_id="x")
    assert made.image.shape == (*size, 3) and made.image.dtype == np.uint8
    assert made.matte.shape == size and made.matte.dtype == np.float32
    assert 0.0 <= made.matte.min() and made.matte.max() <= 1.0
    assert made.labels.shape == size and made.labels.dtype == np.uint8
    assert set(np.unique(made.labels)) <= set(np.unique(labels))
    assert np.array_equal(cv2.imdecode(np.frombuffer(made.jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], made.image)
    background = procedural_background(np.random.default_rng(0), size)
    assert background.shape == (*size, 3) and background.dtype == np.uint8
    alpha = person_matte(labels)
    assert composite_street(photo, alpha, background, np.random.default_rng(0)).shape == (*size, 3)


def test_a_larger_frame_keeps_the_person_at_its_own_resolution():
    photo, labels = _studio_person()
    made = street_version(photo, labels, seed=1, image_id="x", frame_scale=3.0)
    assert made.image.shape == (3 * HEIGHT, 3 * WIDTH, 3) and made.labels.shape == (3 * HEIGHT, 3 * WIDTH)
    # The person spans `scale` of the (3x taller) frame: at least the studio photo's own height at scale 1/3.
    rows = np.flatnonzero(made.labels.any(axis=1))
    person_rows = np.flatnonzero(labels.any(axis=1))
    expected = made.conditions["scale"] * 3 * HEIGHT * len(person_rows) / HEIGHT
    if not made.conditions["cropped"]:
        assert abs(len(rows) - expected) <= 2
    with pytest.raises(ValueError, match="frame_scale must be > 0"):
        street_version(photo, labels, seed=1, image_id="x", frame_scale=0)


def test_person_matte_takes_every_non_background_label_with_a_soft_inner_edge():
    labels = np.zeros((20, 20), np.uint8)
    labels[4:16, 4:10] = 13  # face
    labels[4:16, 10:16] = 5  # top
    alpha = person_matte(labels)
    assert alpha.dtype == np.float32 and alpha.shape == labels.shape
    assert alpha[7:13, 7:13].min() > 0.9  # both labels, well inside
    assert alpha[labels == 0].max() < 0.25  # the feather lies inside: little spills onto the studio white
    assert ((alpha > 0.05) & (alpha < 0.95)).any()  # a soft edge
    assert np.array_equal(person_matte(labels, feather=0), (labels != 0).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        person_matte(np.zeros((2, 2, 3), np.uint8))


def test_the_person_occupies_the_scale_range_of_the_frame():
    photo, labels = _studio_person()
    alpha = person_matte(labels, feather=0)
    person_rows = np.flatnonzero(alpha.any(axis=1))
    person_height = (person_rows[-1] - person_rows[0] + 1) / HEIGHT  # share of the studio frame
    uncropped = StreetRanges(crop_probability=0.0)
    scales = []
    for seed in range(40):
        background = procedural_background(np.random.default_rng(seed), (HEIGHT, WIDTH))
        made = street_photo(photo, alpha, background, np.random.default_rng(seed), ranges=uncropped)
        scale = made.conditions["scale"]
        scales.append(scale)
        assert STREET_RANGES.scale[0] <= scale <= STREET_RANGES.scale[1]
        # Area and height of the composited matte follow the scale (the whole person is in the frame).
        assert made.matte.sum() == pytest.approx(alpha.sum() * scale**2, rel=0.12, abs=3.0)
        rows = np.flatnonzero((made.matte > 0.5).any(axis=1))
        assert (rows[-1] - rows[0] + 1) / HEIGHT == pytest.approx(person_height * scale, abs=2.5 / HEIGHT)
    assert min(scales) < 0.5 and max(scales) > 0.8  # down to about a third of the frame, up to all of it

    cropped_shares = []
    for seed in range(40):
        background = procedural_background(np.random.default_rng(seed), (HEIGHT, WIDTH))
        made = street_photo(
            photo, alpha, background, np.random.default_rng(seed), ranges=StreetRanges(crop_probability=1.0)
        )
        whole = alpha.sum() * made.conditions["scale"] ** 2
        cropped_shares.append(made.matte.sum() / whole)
    assert max(cropped_shares) < 1.12 and min(cropped_shares) < 0.85  # partial crops happen, never more person


def test_labels_follow_the_person():
    photo, labels = _studio_person()
    made = street_version(photo, labels, seed=1, image_id="q")
    assert (made.labels > 0).any()
    assert made.matte[made.labels > 0].mean() > 0.8 and made.matte[made.labels == 0].mean() < 0.2


def test_backgrounds_are_cluttered_far_beyond_a_studio_white():
    studio = np.full((HEIGHT * 2, WIDTH * 2, 3), 245, np.uint8)
    studio_energy = _gradient_energy(studio)
    for seed in range(12):
        background = procedural_background(np.random.default_rng(seed), (HEIGHT * 2, WIDTH * 2))
        assert _gradient_energy(background) > studio_energy + 20.0, seed
        assert background.astype(np.float32).std() > 20.0, seed
        assert len(np.unique(background.reshape(-1, 3), axis=0)) > 200, seed  # texture, not a few flat colours
    with pytest.raises(ValueError, match="both sides"):
        procedural_background(np.random.default_rng(0), (0, 5))


def test_the_street_photo_around_the_person_is_cluttered():
    photo, labels = _studio_person(128, 96)
    made = street_version(photo, labels, seed=2, image_id="q")
    around = made.image[made.matte < 0.01].astype(np.float32)
    assert around.std() > 20.0  # the studio white around the person is gone


def test_jpeg_quality_is_drawn_from_30_to_90(monkeypatch):
    qualities = []

    def spy(image, quality):
        qualities.append(quality)
        return encode_jpeg(image, quality)

    monkeypatch.setattr(street, "encode_jpeg", spy)
    photo, labels = _studio_person()
    for index in range(60):
        made = street_version(photo, labels, seed=0, image_id=str(index))
        assert made.conditions["jpeg_quality"] == qualities[-1]
    assert min(qualities) >= 30 and max(qualities) <= 90
    assert min(qualities) < 45 and max(qualities) > 75  # the range is used, not one value
    cluttered = procedural_background(np.random.default_rng(0), (128, 96))
    assert len(encode_jpeg(cluttered, 30)) < 0.7 * len(encode_jpeg(cluttered, 90))


def test_photo_conditions_are_drawn_within_their_ranges():
    photo, labels = _studio_person()
    blurs = set()
    for index in range(40):
        conditions = street_version(photo, labels, seed=5, image_id=str(index)).conditions
        assert all(STREET_RANGES.gain[0] <= gain <= STREET_RANGES.gain[1] for gain in conditions["gain"])
        assert STREET_RANGES.contrast[0] <= conditions["contrast"] <= STREET_RANGES.contrast[1]
        assert STREET_RANGES.brightness[0] <= conditions["brightness"] <= STREET_RANGES.brightness[1]
        blurs.add(conditions["blur"])
    assert blurs == {"gaussian", "motion"}


def test_a_photo_without_a_parse_map_is_matted_by_its_white_background():
    photo, labels = _studio_person()
    made = street_version(photo, None, seed=0, image_id="q")
    assert made.labels is None and made.image.shape == photo.shape
    assert made.matte.sum() == pytest.approx(person_matte(labels).sum() * made.conditions["scale"] ** 2, rel=0.3)


def test_bad_inputs_are_refused():
    photo, labels = _studio_person()
    background = procedural_background(np.random.default_rng(0), (HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="must match the photo"):
        street_photo(photo, person_matte(labels)[:-1], background, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        street_photo(photo.astype(np.float32), person_matte(labels), background, np.random.default_rng(0))
