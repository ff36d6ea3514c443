"""Human parsing for the proxy stages: the garment of a person photo, cut out on white (PaintNet's T_m).

The paper segments the model photos with a fine-tuned Mask R-CNN and keeps only the clothing, the
"segmented texture" T_m that PaintNet's renderer and the HP+X retrieval baselines take as input. Here:

    person photo (B, 3, H, W) -> resized to the parser's size (default 128 x 96)
      -> EfficientNet-Lite0, ImageNet weights; stem + blocks 0-4 frozen, blocks 5-15 + head fine-tuned
         endpoints: block2 (24 ch, 1/4), block4 (40 ch, 1/8), block10 (112 ch, 1/16), head (1280 ch, 1/32)
      -> FPN decoder: 1x1 laterals to 64 channels, top-down bilinear upsampling + sum down to 1/4,
         two 3x3 conv-BN-ReLU, 1x1 classifier -> garment logit at 1/4, bilinearly upsampled
      -> garment probability (B, 1, H, W)

trained with BCE + Dice on VITON's LIP parse maps, garment = labels 5, 6, 7 (upper-clothes, dress,
coat; the training is in `generation.training.parsing`). A binary parser is all the proxies need.
Without a trained parser, GrabCut (OpenCV) segments the garment from a torso prior
(`grabcut_garment_mask`): slower, per image, and less accurate.

`segmented_texture` (in `retrieval.garments`, shared with the retrieval-side trainers) turns (photo, garment
mask) into T_m: the garment composited on white, cropped to the mask's bounding box plus a margin, resized
keeping its aspect ratio and padded with white.

The `hp` proxy (`HumanParsingProxy`) chains the two: `create_proxy("hp")` uses GrabCut,
`create_proxy("hp@runs/parser/final.pt")` the trained parser; `hp.train_on(dataset, out_dir)` trains it
(`street2shop train parsing --out runs/parser`, through `generation.training.parsing.train_hp`).

Example:
    >>> proxy = create_proxy("hp")                        # doctest: +SKIP
    >>> proxy(person_photos).shape                        # doctest: +SKIP
    torch.Size([B, 3, H, W])
    >>> parser = load_garment_parser("runs/parser/final.pt")  # doctest: +SKIP
    >>> texture = segmented_texture(photos, parser.predict(photos) > 0.5, size=(64, 64))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generation.proxies import PROXIES, Box, Proxy
from retrieval.backbones import EfficientNetLite0
from retrieval.garments import mask_bounding_boxes, segmented_texture

# Lite0 endpoints the decoder reads, fine to coarse: (name, channels, stride).
ENCODER_ENDPOINTS = (("block2", 24, 4), ("block4", 40, 8), ("block10", 112, 16), ("head", 1280, 32))

# GrabCut's torso prior, as fractions (top, bottom, left, right) of the photo. Measured on 300 VITON
# *training* parse maps (garment = labels 5-7): the garment lies inside SURE_BACKGROUND_OUTSIDE's box in
# >90% of photos (10th/90th percentiles of the garment's bounding box, widened), PROBABLE_GARMENT is
# where a pixel is garment in >=50% of photos, SURE_GARMENT where it is in >=95%.
SURE_BACKGROUND_OUTSIDE = (0.20, 1.00, 0.08, 0.92)
PROBABLE_GARMENT = (0.30, 0.79, 0.24, 0.76)
SURE_GARMENT = (0.42, 0.59, 0.40, 0.60)


# --------------------------------------------------------------------------------------------------
# The parser network
# --------------------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FpnDecoder(nn.Module):
    """Light FPN decoder: per-endpoint 1x1 laterals, top-down upsample-and-add, 3x3 fusion, 1x1 classifier.

    Args:
        in_channels: channels of the endpoints, finest first.
        channels: width of the laterals and fusion convolutions.
        prior: initial garment probability; the classifier's bias starts at its logit so the first
            steps do not spend themselves learning the class balance.

    Shape:
        - Input: list of maps, finest first, each (B, C_i, H / s_i, W / s_i).
        - Output: (B, 1, H / s_0, W / s_0) garment logits at the finest endpoint's resolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = tuple(c for _, c, _ in ENCODER_ENDPOINTS),
        channels: int = 64,
        prior: float = 0.2,
    ):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(_conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels))
        self.classifier = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.constant_(self.classifier.bias, math.log(prior / (1 - prior)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            x = F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False) + lateral(feature)
        return self.classifier(self.fuse(x))


class GarmentParser(nn.Module):
    """Binary garment parser: EfficientNet-Lite0 encoder (partly frozen) + FPN decoder.

    The encoder's batch-norm layers always use their ImageNet statistics (the module keeps them in
    eval mode even in `train()`): CPU batches of 16 are too small to re-estimate them, and frozen
    statistics make the parser's output independent of the batch.

    Args:
        image_size: (H, W) the parser works at; inputs of any size are resized to it and the logits
            resized back. Stored as a buffer, so a checkpoint carries it.
        decoder_channels: width of the FPN decoder.
        frozen_blocks: Lite0 MBConv blocks (after the stem, also frozen) that are not trained; 5 freezes
            everything up to stride 8 (block4), where most of the CPU time of a backward pass would go.
        pretrained: ImageNet weights for the encoder (False only when a checkpoint will be loaded).

    Shape:
        - Input: (B, 3, H, W) float in [0, 1].
        - `forward`: (B, 1, H, W) garment logits; `predict`: (B, 1, H, W) probabilities.

    Example:
        >>> parser = GarmentParser(pretrained=False).eval()
        >>> parser.predict(torch.rand(2, 3, 256, 192)).shape
        torch.Size([2, 1, 256, 192])
    """

    def __init__(
        self,
        image_size: Tuple[int, int] = (128, 96),
        decoder_channels: int = 64,
        frozen_blocks: int = 5,
        pretrained: bool = True,
    ):
        super().__init__()
        if not 0 <= frozen_blocks <= 16:
            raise ValueError(f"frozen_blocks must be in 0..16 (Lite0 has 16 MBConv blocks), got {frozen_blocks}")
        if any(int(s) % 32 for s in image_size):
            raise ValueError(
                f"image_size must be a multiple of 32 on each side (the encoder's stride), got {image_size}"
            )
        self.encoder = EfficientNetLite0(pretrained=pretrained)
        # The ImageNet classifier is not used: dropping it keeps 5 MB out of every checkpoint.
        self.encoder._fc = nn.Identity()
        self.decoder = FpnDecoder(channels=decoder_channels)
        self.frozen_blocks = int(frozen_blocks)
        self.decoder_channels = int(decoder_channels)
        self.register_buffer("image_size", torch.tensor([int(s) for s in image_size]))
        for name, parameter in self.encoder.named_parameters():
            parameter.requires_grad_(not self._is_frozen(name))
        self.encoder.eval()

    def _is_frozen(self, parameter_name: str) -> bool:
        if parameter_name.startswith(("_conv_stem.", "_bn0.")):
            return True
        if parameter_name.startswith("_blocks."):
            return int(parameter_name.split(".")[1]) < self.frozen_blocks
        return False

    def train(self, mode: bool = True) -> "GarmentParser":
        super().train(mode)
        self.encoder.eval()  # ImageNet batch-norm statistics, always (see the class docstring)
        return self

    def config(self) -> Dict[str, Any]:
        return {
            "image_size": [int(s) for s in self.image_size],
            "decoder_channels": self.decoder_channels,
            "frozen_blocks": self.frozen_blocks,
        }

    def trainable_parameters(self) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
        """(fine-tuned encoder parameters, decoder parameters): two groups with their own learning rates."""
        return [p for p in self.encoder.parameters() if p.requires_grad], list(self.decoder.parameters())

    def encode(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The four endpoint maps, finest first; the frozen part runs without autograd bookkeeping."""
        net = self.encoder
        wanted = {name for name, _, _ in ENCODER_ENDPOINTS}
        maps: Dict[str, torch.Tensor] = {}
        x = ((images - net.mean) / net.std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            x = net.act(net._bn0(net._conv_stem(x)))
            for i in range(self.frozen_blocks):
                x = net._blocks[i](x)
                if f"block{i}" in wanted:
                    maps[f"block{i}"] = x
        for i in range(self.frozen_blocks, len(net._blocks)):
            x = net._blocks[i](x)
            if f"block{i}" in wanted:
                maps[f"block{i}"] = x
        maps["head"] = net.act(net._bn1(net._conv_head(x)))
        return [maps[name] for name, _, _ in ENCODER_ENDPOINTS]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) garment logits (computed at `image_size`)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        size = tuple(int(s) for s in self.image_size)
        resized = (
            images
            if tuple(images.shape[-2:]) == size
            else F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        )
        logits = self.decoder(self.encode(resized))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False).contiguous()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) garment probability."""
        return torch.sigmoid(self.forward(images))


def load_garment_parser(checkpoint, map_location: str | torch.device = "cpu") -> GarmentParser:
    """The trained parser of a final.pt written by the hp proxy's `train_on` (the `parser` option of others).

    Raises:
        FileNotFoundError, ValueError: no such file, or not a parser checkpoint.
    """
    from retrieval.training import load_checkpoint

    payload = load_checkpoint(checkpoint, map_location=map_location)
    if payload.get("proxy") != "hp" or "parser_conf" not in payload:
        raise ValueError(f"{checkpoint} is not a garment-parser checkpoint (written by `street2shop train parsing`)")
    parser = GarmentParser(**payload["parser_conf"], pretrained=False)
    state = {k[len("parser.") :]: v for k, v in payload["state_dict"].items() if k.startswith("parser.")}
    parser.load_state_dict(state, strict=True)
    return parser.to(map_location).eval()


# --------------------------------------------------------------------------------------------------
# GrabCut fallback
# --------------------------------------------------------------------------------------------------


def _box(fractions: Tuple[float, float, float, float], height: int, width: int) -> Tuple[slice, slice]:
    top, bottom, left, right = fractions
    return slice(int(round(top * height)), int(round(bottom * height))), slice(
        int(round(left * width)), int(round(right * width))
    )


def torso_prior_mask(height: int, width: int) -> np.ndarray:
    """GrabCut's initial labels for a centred person photo: the torso prior of this module's constants.

    Returns:
        (H, W) uint8 of cv2.GC_BGD (outside SURE_BACKGROUND_OUTSIDE), GC_PR_BGD, GC_PR_FGD
        (PROBABLE_GARMENT) and GC_FGD (SURE_GARMENT).
    """
    labels = np.full((height, width), cv2.GC_BGD, np.uint8)
    labels[_box(SURE_BACKGROUND_OUTSIDE, height, width)] = cv2.GC_PR_BGD
    labels[_box(PROBABLE_GARMENT, height, width)] = cv2.GC_PR_FGD
    labels[_box(SURE_GARMENT, height, width)] = cv2.GC_FGD
    return labels


def run_grabcut(image: np.ndarray, initial_labels: np.ndarray, iterations: int = 5) -> np.ndarray:
    """OpenCV GrabCut from initial labels; returns the (H, W) boolean foreground.

    OpenCV seeds its GMM k-means from a global RNG; it is reset before each call so that the same
    image always gives the same mask (and a batch gives what one-by-one calls give).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"GrabCut needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    labels = initial_labels.copy()
    if (
        not ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).any()
        or not ((labels == cv2.GC_BGD) | (labels == cv2.GC_PR_BGD)).any()
    ):
        raise ValueError("GrabCut needs both foreground and background in its initial labels")
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    # GrabCut's colour models are symmetric in the channel order, so RGB is as good as OpenCV's BGR.
    cv2.grabCut(
        np.ascontiguousarray(image),
        labels,
        None,
        background_model,
        foreground_model,
        int(iterations),
        cv2.GC_INIT_WITH_MASK,
    )
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def grabcut_garment_mask(image: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Garment of a centred person photo by GrabCut from the torso prior (no trained parser needed).

    Args:
        image: (H, W, 3) uint8 RGB person photo, framed like VITON's (head at the top, torso centred).
        iterations: GrabCut iterations.

    Returns:
        (H, W) boolean garment mask.
    """
    return run_grabcut(image, torso_prior_mask(*image.shape[:2]), iterations)


def remove_small_regions(mask: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """Drop the connected regions of a boolean (H, W) mask smaller than `min_fraction` of its largest.

    Specks far from the garment would otherwise stretch its bounding box, and so shrink and shift the
    garment in the segmented texture.

    Example:
        >>> m = np.zeros((6, 6), bool); m[:3, :3] = True; m[5, 5] = True
        >>> int(remove_small_regions(m, 0.2).sum())
        9
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2 or min_fraction <= 0:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
    return np.isin(labels, keep)


def localised_garment_masks(
    images: torch.Tensor,
    parser: GarmentParser,
    threshold: float = 0.5,
    min_region_fraction: float = 0.05,
    context: float = 0.25,
) -> torch.Tensor:
    """Garment masks parsed twice: the whole photo to find the garment, then its box, cropped and rescaled to
    the parser's input, so that a small, off-centre person is parsed at the parser's full resolution.

    The box of the first mask (small regions dropped) grows by `context` of its side on each edge and to
    the parser's aspect ratio; an image whose first mask is empty keeps its first (empty) mask.

    Shape:
        - images: (B, 3, H, W) in [0, 1].
        - Output: (B, 1, H, W) float in {0, 1}, on the images' device.
    """
    first = garment_masks(images, parser, threshold, min_region_fraction=min_region_fraction)
    boxes, nonempty = mask_bounding_boxes(first > 0.5)
    height, width = images.shape[-2:]
    out_h, out_w = (int(v) for v in parser.image_size)
    masks = first.clone()
    for i in torch.nonzero(nonempty).flatten().tolist():  # one crop per image: each box has its own size
        top, left, bottom, right = boxes[i].tolist()
        centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
        box_h, box_w = (bottom - top) * (1 + 2 * context), (right - left) * (1 + 2 * context)
        box_h, box_w = max(box_h, box_w * out_h / out_w), max(box_w, box_h * out_w / out_h)  # parser's aspect
        y0, y1 = max(0, int(centre_y - box_h / 2)), min(height, int(round(centre_y + box_h / 2)))
        x0, x1 = max(0, int(centre_x - box_w / 2)), min(width, int(round(centre_x + box_w / 2)))
        crop = F.interpolate(
            images[i : i + 1, :, y0:y1, x0:x1], size=(out_h, out_w), mode="bilinear", align_corners=False
        )
        probability = F.interpolate(parser.predict(crop), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        local = np.zeros((height, width), dtype=bool)
        local[y0:y1, x0:x1] = (probability[0, 0] > threshold).cpu().numpy()
        masks[i, 0] = torch.from_numpy(remove_small_regions(local, min_region_fraction)).to(masks)
    return masks


def garment_masks(
    images: torch.Tensor,
    parser: Optional[GarmentParser] = None,
    threshold: float = 0.5,
    grabcut_iterations: int = 5,
    min_region_fraction: float = 0.05,
) -> torch.Tensor:
    """Binary garment masks of person photos: the trained parser when given, else GrabCut per image.

    Regions smaller than `min_region_fraction` of the largest one are dropped (`remove_small_regions`;
    0 keeps everything).

    Shape:
        - images: (B, 3, H, W) in [0, 1].
        - Output: (B, 1, H, W) float in {0, 1}, on the images' device.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if parser is not None:
        masks = (parser.predict(images) > threshold)[:, 0].cpu().numpy()
    else:
        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        masks = np.stack([grabcut_garment_mask(np.ascontiguousarray(p), grabcut_iterations) for p in pixels])
    masks = np.stack([remove_small_regions(m, min_region_fraction) for m in masks])
    return torch.from_numpy(masks)[:, None].to(device=images.device, dtype=images.dtype)


# --------------------------------------------------------------------------------------------------
# The hp proxy
# --------------------------------------------------------------------------------------------------


@PROXIES.register("hp")
class HumanParsingProxy(Proxy):
    """HP: the person photo's garment, cut out on white and cropped (the paper's segmented texture T_m).

    Untrained (`create_proxy("hp")`): GrabCut from a torso prior segments the garment, image by image
    (about 0.1 s each on a CPU). Trained (`create_proxy("hp@runs/parser/final.pt")`): the
    `GarmentParser` of that checkpoint. Either way the output is `segmented_texture` of the mask.

    Config:
        output_size: (H, W) of the output; None keeps the input's size.
        margin: white border around the garment's box, as a fraction of the box's side.
        threshold: garment probability above which a pixel is garment (trained parser only).
        grabcut_iterations: GrabCut iterations (untrained form only).
        min_region_fraction: mask regions smaller than this fraction of the largest are dropped.
        localise: parse twice, the second time on the first garment box cropped and rescaled to the parser's
            input (`localised_garment_masks`; trained parser only), for small, off-centre people.
        input_scale: read photos at this multiple of the descriptor's input size before parsing and cutting
            out (`retrieval.proxy_stage.proxy_input_size`): the garment's box is then cut from the larger photo,
            so a small person's garment keeps the photo's detail. 1 reads them at the descriptor's size.

    Shape:
        - Input: (B, 3, H, W) in [0, 1].
        - Output: (B, 3, H', W') in [0, 1], (H', W') = output_size or (H, W) / input_scale.
    """

    trainable = True
    default_conf = {
        "output_size": None,
        "margin": 0.05,
        "threshold": 0.5,
        "grabcut_iterations": 5,
        "min_region_fraction": 0.05,
        "localise": False,
        "input_scale": 1.0,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.parser: Optional[GarmentParser] = None

    @property
    def uses_parser(self) -> bool:
        return self.parser is not None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_boxes(images)[0]

    def forward_with_boxes(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[Optional[Box]]]:
        """The cut-out garments and, per photo, the garment's box (x0, y0, x1, y1) in the input's pixels (None
        when no garment was found and the whole photo was kept)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images of shape (B, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        if self.conf["localise"] and self.parser is not None:
            masks = localised_garment_masks(
                images, self.parser, self.conf["threshold"], self.conf["min_region_fraction"]
            )
        else:
            masks = garment_masks(
                images,
                self.parser,
                self.conf["threshold"],
                self.conf["grabcut_iterations"],
                self.conf["min_region_fraction"],
            )
        # Read larger by input_scale, the cut-out still comes out at the descriptor's size (one antialiased resize).
        scale = self.input_scale
        size = tuple(self.conf["output_size"] or (round(images.shape[-2] / scale), round(images.shape[-1] / scale)))
        boxes, nonempty = mask_bounding_boxes(masks > 0.5)  # the box segmented_texture cuts out
        found = [
            (left, top, right, bottom) if keep else None
            for (top, left, bottom, right), keep in zip(boxes.tolist(), nonempty.tolist())
        ]
        return segmented_texture(images, masks, size=size, margin=self.conf["margin"]), found

    def load_trained(self, checkpoint) -> "HumanParsingProxy":
        """Build the parser the checkpoint describes, then load its weights (strict)."""
        from retrieval.training import load_checkpoint

        payload = load_checkpoint(checkpoint, map_location="cpu")
        if "parser_conf" not in payload:
            raise ValueError(
                f"{checkpoint} holds no parser (no parser_conf): was it written by `street2shop train parsing`?"
            )
        device = next(iter(list(self.parameters()) + list(self.buffers())), torch.empty(0)).device
        self.parser = GarmentParser(**payload["parser_conf"], pretrained=False).to(device).eval()
        return super().load_trained(checkpoint)
