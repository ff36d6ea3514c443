"""Garment parser, GrabCut fallbacks (person photos and product shape maps), segmented texture, hp training."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from generation.parsing import (
    ENCODER_ENDPOINTS,
    GarmentParser,
    garment_masks,
    grabcut_garment_mask,
    load_garment_parser,
    remove_small_regions,
)
from generation.proxies import create_proxy
from generation.shape_maps import fill_holes, grabcut_shape_map, mask_iou, shape_map_agreement
from generation.training.parsing import (
    dice_loss,
    evaluate_garment_masks,
    garment_segmentation_loss,
    validation_parsing_pairs,
    viton_parse_path,
)
from retrieval.datasets import load_viton
from retrieval.files import write_image_atomic
from retrieval.garments import GARMENT_LABELS, garment_mask_from_labels, mask_bounding_boxes, segmented_texture
from retrieval.io import read_image, read_mask
from retrieval.street_conditions import street_version
from retrieval.training import load_checkpoint


def person_photo(height=128, width=96, seed=0):
    """A grey studio backdrop, a skin head and arms, a red textured shirt on the torso -> (uint8 RGB, shirt mask)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 215, np.uint8) + rng.integers(0, 12, (height, width, 3), dtype=np.uint8)
    skin = (224, 172, 140)
    cv2.ellipse(image, (width // 2, int(0.16 * height)), (int(0.12 * width), int(0.11 * height)), 0, 0, 360, skin, -1)
    cv2.rectangle(image, (int(0.16 * width), int(0.32 * height)), (int(0.26 * width), int(0.75 * height)), skin, -1)
    cv2.rectangle(image, (int(0.74 * width), int(0.32 * height)), (int(0.84 * width), int(0.75 * height)), skin, -1)
    shirt = np.zeros((height, width), bool)
    shirt[int(0.28 * height) : int(0.82 * height), int(0.27 * width) : int(0.73 * width)] = True
    stripes = np.broadcast_to((np.arange(height)[:, None] // 6 % 2).astype(np.uint8) * 40, (height, width))
    red = np.stack([np.full((height, width), 190, np.uint8), 25 + stripes, 30 + stripes], axis=2)
    image[shirt] = red[shirt]
    return image, shirt


def test_garment_labels_and_mask():
    assert GARMENT_LABELS == (5, 6, 7)
    labels = np.array([[0, 5, 6], [7, 9, 13]], np.uint8)
    assert garment_mask_from_labels(labels).tolist() == [[False, True, True], [True, False, False]]


def test_parser_shapes_and_frozen_encoder():
    parser = GarmentParser(image_size=(64, 64), pretrained=False)
    maps = parser.encode(torch.rand(2, 3, 64, 64))
    for (name, channels, stride), feature in zip(ENCODER_ENDPOINTS, maps):
        assert feature.shape == (2, channels, 64 // stride, 64 // stride), name
    assert parser(torch.rand(2, 3, 96, 72)).shape == (2, 1, 96, 72)  # any input size, logits at that size
    probabilities = parser.eval().predict(torch.rand(1, 3, 80, 60))
    assert probabilities.shape == (1, 1, 80, 60) and 0 <= probabilities.min() and probabilities.max() <= 1
    # stem and blocks 0-4 are frozen, the rest of the encoder trains; its batch norm never leaves eval mode
    assert not parser.encoder._conv_stem.weight.requires_grad
    assert not parser.encoder._blocks[4]._project_conv.weight.requires_grad
    assert parser.encoder._blocks[5]._project_conv.weight.requires_grad
    parser.train()
    assert parser.decoder.training and not parser.encoder.training
    assert "_fc.weight" not in parser.state_dict()
    with pytest.raises(ValueError, match="multiple of 32"):
        GarmentParser(image_size=(100, 96), pretrained=False)


def test_dice_and_loss_golden():
    target = torch.ones(1, 1, 2, 2)
    assert float(dice_loss(torch.full((1, 1, 2, 2), 30.0), target)) == pytest.approx(0.0, abs=1e-6)
    # nothing predicted: 1 - (0 + 1) / (0 + 4 + 1)
    assert float(dice_loss(torch.full((1, 1, 2, 2), -30.0), target)) == pytest.approx(0.8, abs=1e-6)
    losses = garment_segmentation_loss(torch.zeros(1, 1, 2, 2), target)
    assert float(losses["bce"]) == pytest.approx(np.log(2))
    assert float(losses["loss"]) == pytest.approx(float(losses["bce"] + losses["dice"]))


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    photos, masks = zip(*(person_photo(64, 64, seed=s) for s in range(4)))
    images = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(np.stack(masks))[:, None].float()
    parser = GarmentParser(image_size=(32, 32)).train()  # works at 32 x 32, logits back at 64 x 64
    encoder_params, decoder_params = parser.trainable_parameters()
    optimizer = torch.optim.AdamW(encoder_params + decoder_params, lr=1e-3)
    before = garment_segmentation_loss(parser(images), target)["loss"]
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = garment_segmentation_loss(parser(images), target)["loss"]
    assert float(after) < float(before.detach())


def test_mask_bounding_boxes_golden():
    masks = torch.zeros(2, 1, 6, 5, dtype=torch.bool)
    masks[0, 0, 1:4, 2:5] = True
    boxes, nonempty = mask_bounding_boxes(masks)
    assert boxes.tolist() == [[1, 2, 4, 5], [0, 0, 6, 5]]  # the empty mask gets the whole image
    assert nonempty.tolist() == [True, False]


def test_remove_small_regions():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True  # 25 px
    mask[7:9, 7:9] = True  # 4 px: 16% of the largest
    assert remove_small_regions(mask, 0.2).sum() == 25
    assert remove_small_regions(mask, 0.1).sum() == 29
    assert remove_small_regions(mask, 0.0).sum() == 29


def test_segmented_texture_crops_keeps_aspect_and_pads_white():
    photos = torch.zeros(2, 3, 20, 10)
    photos[:, 1] = 0.5  # green everywhere
    mask = torch.zeros(2, 1, 20, 10)
    mask[0, 0, 4:12, 2:6] = 1  # an 8x4 garment
    texture = segmented_texture(photos, mask, size=(16, 16), margin=0.0)
    assert texture.shape == (2, 3, 16, 16)
    # the 8x4 box fills the height (scale 2): 16x8 of green in the middle, white on both sides
    assert torch.allclose(texture[0, :, :, 4:12], torch.tensor([0.0, 0.5, 0.0])[:, None, None].expand(3, 16, 8))
    assert torch.all(texture[0, :, :, :4] == 1) and torch.all(texture[0, :, :, 12:] == 1)
    # an empty mask: the whole photo (20x10), resized keeping aspect, not blanked
    assert torch.allclose(texture[1, 1, :, 4:12], torch.full((16, 8), 0.5))
    # a margin of 25% (2 px of the 8 px box on each side) scales the box by 16 / 12: 11 rows, 2-3 white ones around
    framed = segmented_texture(photos[:1], mask[:1], size=(16, 16), margin=0.25)
    assert torch.all(framed[0, :, :2] == 1) and torch.all(framed[0, :, -3:] == 1)
    assert torch.allclose(framed[0, 1, 2:13, 8], torch.full((11,), 0.5))
    # pixels outside the mask (inside its box) are white: the garment is cut out
    mask[0, 0, 4:6, 2:4] = 0
    assert torch.all(segmented_texture(photos[:1], mask[:1], size=(16, 16), margin=0.0)[0, :, :3, 4:7] == 1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        segmented_texture(photos, mask[:, :, :10], size=(16, 16))


def test_grabcut_garment_mask_finds_the_shirt_and_is_deterministic():
    image, shirt = person_photo()
    mask = grabcut_garment_mask(image, iterations=3)
    assert mask.shape == shirt.shape and mask.dtype == bool
    assert mask_iou(mask, shirt) > 0.8
    assert np.array_equal(grabcut_garment_mask(image, iterations=3), mask)
    # the batched tensor form gives the same masks
    batch = torch.from_numpy(np.stack([image, person_photo(seed=1)[0]])).permute(0, 3, 1, 2).float() / 255
    masks = garment_masks(batch, parser=None, grabcut_iterations=3)
    assert masks.shape == (2, 1, 128, 96) and np.array_equal(masks[0, 0].numpy().astype(bool), mask)


def test_grabcut_shape_map_of_a_product_on_white():
    product = np.full((64, 48, 3), 255, np.uint8)
    product[10:56, 8:40] = (30, 60, 160)
    product[24:34, 18:30] = (252, 252, 252)  # a white print inside the garment: a hole to fill
    truth = np.zeros((64, 48), bool)
    truth[10:56, 8:40] = True
    for init in ("rect", "white"):
        assert mask_iou(grabcut_shape_map(product, init=init, iterations=3), truth) > 0.95
    assert fill_holes(grabcut_shape_map(product, keep_holes=True, iterations=3))[28, 24]
    with pytest.raises(ValueError, match="init"):
        grabcut_shape_map(product, init="nope")


def test_street_evaluation_scores_each_street_photo_against_its_own_moved_parse_map(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    photos, parses = validation_parsing_pairs(data, limit=3)
    torch.manual_seed(0)
    parser = GarmentParser((32, 32), decoder_channels=8, pretrained=False).eval()
    written = ([], [])
    for photo, parse in zip(photos, parses):  # the street versions, written out as a plain studio set
        street = street_version(read_image(photo), read_mask(parse), 7, Path(photo).stem)
        written[0].append(str(tmp_path / f"{Path(photo).stem}.png"))
        written[1].append(str(tmp_path / f"{Path(photo).stem}-parse.png"))
        write_image_atomic(written[0][-1], street.image)
        write_image_atomic(written[1][-1], street.labels)
    street = evaluate_garment_masks(photos, parses, parser, street_seed=7)
    assert street == evaluate_garment_masks(*written, parser)
    assert street != evaluate_garment_masks(photos, parses, parser)  # not the studio photos


def test_checkpoint_round_trip(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    proxy = create_proxy("hp")
    assert not proxy.uses_parser
    tiny = {"epochs": 1, "batch_size": 16, "image_size": (32, 32), "progress": False}
    final = proxy.train_on(data, tmp_path / "run", val_images=3, **tiny)
    payload = load_checkpoint(final)
    assert payload["proxy"] == "hp" and payload["parser_conf"]["image_size"] == [32, 32]
    assert payload["steps"] == 1 and payload["val"]["images"] == 3  # 16 training pairs, batch 16
    stored = json.loads((tmp_path / "run" / "val_metrics.json").read_text())
    assert stored["images"] == 3 and stored["street"]["images"] == 3  # studio photos and their street versions
    assert 0.0 <= stored["street"]["iou_garment"] <= 1.0
    photos = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    loaded = create_proxy(f"hp@{final}").eval()
    assert loaded.uses_parser
    assert torch.equal(loaded(photos), proxy.eval()(photos))
    assert loaded.fingerprint() == proxy.fingerprint() != create_proxy("hp").fingerprint()
    parser = load_garment_parser(final)
    assert torch.allclose(parser.predict(photos), proxy.parser.predict(photos))
    # running the same command again resumes the finished run: no more steps
    again = create_proxy("hp").train_on(data, tmp_path / "run", val_images=0, **tiny)
    assert load_checkpoint(again)["steps"] == 1
    with pytest.raises(ValueError, match="another config"):
        create_proxy("hp").train_on(data, tmp_path / "run", val_images=0, **{**tiny, "epochs": 2})
    with pytest.raises(ValueError, match="unknown options"):
        create_proxy("hp").train_on(data, tmp_path / "other", not_an_option=1)


def test_validation_parse_maps_are_found_by_layout(synthetic_root):
    data = load_viton(synthetic_root, split="val")
    photos, parses = validation_parsing_pairs(data, limit=3)
    assert len(photos) == 3 and all(str(viton_parse_path(p)) == q for p, q in zip(photos, parses))
    assert set(photos) <= set(data.queries["image"])
    assert viton_parse_path("/nowhere/cloth/000001_1.jpg") is None


def test_shape_maps_agree_with_viton_cloth_masks(viton_root):
    data = load_viton(viton_root, split="val")
    result = shape_map_agreement(list(data.train["product_image"]), list(data.train["mask"]), limit=3, iterations=3)
    assert result["images"] == 3 and result["mean_iou"] > 0.7


def test_street_copies_add_street_versions_of_each_pair(synthetic_root, tmp_path):
    """street_copies=1 doubles the training set with street-condition versions whose masks moved with the person."""
    from generation.training.parsing import load_parsing_pairs, parsing_pairs

    data = load_viton(synthetic_root, split="val")
    photos, parses = parsing_pairs(data.train)
    studio_images, studio_masks = load_parsing_pairs(photos[:4], parses[:4], (64, 48))
    images, masks = load_parsing_pairs(photos[:4], parses[:4], (64, 48), street_copies=1, street_seed=1000)
    assert images.shape == (8, 3, 64, 48) and masks.shape == (8, 1, 64, 48)
    assert torch.equal(images[:4], studio_images) and torch.equal(masks[:4], studio_masks)
    assert not torch.equal(images[4:], studio_images)  # other backgrounds, scales, positions
    street_area, studio_area = masks[4:].float().mean(dim=(1, 2, 3)), studio_masks.float().mean(dim=(1, 2, 3))
    assert (street_area <= studio_area * 1.05 + 1).all()  # the person is scaled down (or cropped), never up
    again, _ = load_parsing_pairs(photos[:4], parses[:4], (64, 48), street_copies=1, street_seed=1000)
    assert torch.equal(again, images)  # seeded per image
    proxy = create_proxy("hp")
    final = proxy.train_on(
        data,
        tmp_path / "run",
        epochs=1,
        batch_size=16,
        image_size=(32, 32),
        val_images=0,
        street_copies=1,
        progress=False,
    )
    assert load_checkpoint(final)["steps"] == 2  # 16 pairs + 16 street copies, batch 16


class _BlobParser(torch.nn.Module):
    """A stand-in parser: 'garment' wherever red dominates; records the crops it was shown."""

    image_size = (32, 24)

    def __init__(self):
        super().__init__()
        self.seen = []

    def predict(self, images):
        self.seen.append(tuple(images.shape[-2:]))
        return (images[:, :1] - images[:, 1:2] > 0.3).float()


def test_localised_masks_parse_the_garment_box_again_at_the_parsers_size():
    from generation.parsing import localised_garment_masks

    images = torch.ones(2, 3, 128, 96)
    images[0, 1:, 90:106, 60:72] = 0.0  # a small red garment, off-centre
    parser = _BlobParser()
    masks = localised_garment_masks(images, parser, min_region_fraction=0.0)
    assert masks.shape == (2, 1, 128, 96)
    assert parser.seen == [(128, 96), (32, 24)]  # the whole batch once, then the one non-empty box at 32 x 24
    garment = torch.zeros(128, 96, dtype=torch.bool)
    garment[90:106, 60:72] = True
    iou = (masks[0, 0].bool() & garment).sum() / (masks[0, 0].bool() | garment).sum()
    assert iou > 0.85 and not masks[0, 0, :80].any()  # nothing outside the context box
    assert not masks[1].any()  # no garment found: the empty first mask is kept, no second pass
