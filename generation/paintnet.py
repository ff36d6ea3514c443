"""PaintNet: shape-constrained generation of a product photo from a person photo (paper 000, Sec. 3.2).

Two stages, trained one after the other (the paper's "argmax" between them is not differentiable):

1. **Shape predictor** (Sec. 3.2.1, Algorithm 1). Frozen feature maps F of the person photo (the paper:
   InceptionV4; here the pretrained EfficientNet-Lite0 "head" map, 1280 x H/32 x W/32) give
   f_m = W [avg-pool(F), attention-pool(F)] (eq. 3-4): the attention weights are a softmax over positions
   of two successive 1x1 convolutions of F. With the backbone frozen, the linear map W is what makes the
   average-pooled half learnable too (the paper does not say whether it fine-tuned InceptionV4; a frozen
   trunk lets us cache its maps once and train in seconds). Triplets (eq. 5, squared euclidean distance,
   margin alpha = 5): for an anchor person photo, the K = 20 training photos whose *product images* are
   most similar are positives, the K least similar are negatives. The paper ranks by the inner product of
   visual features of the product images; `sp_ranking` offers that ("product_gem": cosine of GeM-pooled
   Lite0 features of the product photos) and "shape_iou", the IoU of the products' shape maps, which
   ranks by exactly the property the predictor exists to predict. It is the default because it predicts
   better shapes: trained on 1,000 VITON pairs (10 epochs; the loss is ~0 after 5), the nearest
   neighbour's shape map overlaps a validation product's cloth-mask with mean IoU 0.675 ("shape_iou")
   vs 0.654 ("product_gem"); for
   reference, a random training shape gives 0.620, the nearest neighbour by raw average-pooled Lite0
   features 0.661 and the best training shape (oracle) 0.871 (100 validation photos). At inference the
   predicted shape map is the stored shape map of the nearest training person photo by f_m: the training
   embeddings and their shape maps (uint8, at the renderer's size) live in the checkpoint.

2. **Texture renderer** (Sec. 3.2.2, Table 1): an encoder-decoder G(T_m, S) from the segmented texture
   T_m (the garment of the person photo cut out on white) and the shape map S to the product image, with
   two discriminators and a perceptual loss:

   - generator, 64x64 (Table 1): 4x4 stride-2 convolutions 6 -> 96 -> 192 -> 384 -> 768 (Leaky-ReLU 0.2),
     Conv(5) 4x4 valid -> 1x1x1536 (the 1536-d embedding), then the decoder. Table 1 lists four transposed
     convolutions 768 -> 384 -> 192 -> 96 -> 3, which double 4x4 to 64x64, so a 4x4x768 map must come
     from the 1x1x1536 embedding: we add the mirror of Conv(5), a 4x4 transposed convolution 1536 -> 768
     at stride 1 (as DTGAN's decoder does). Table 1's "pad 2" for 4x4 stride-2 layers is the total
     ("SAME") padding: 1 pixel per side, which halves 64 -> 32 -> 16 -> 8 -> 4.
   - real/fake discriminator D_rf on 64x64x3 and relevance discriminator D_rv on 64x64x6 (image, T_m):
     4x4 stride-2 convolutions 96 -> 192 -> 384 -> 768 and Table 1's 1x1 Conv(5) -> 1, which on the
     4x4x768 map gives 16 local logits; their log-losses are averaged (the "scalar probability" of the
     paper is the mean of their sigmoids, `ConvDiscriminator.probability`).
   - Table 1 names no normalisation; as in DCGAN and DTGAN (whose architecture Table 1 follows) every
     layer but the first of each encoder/discriminator and the output layers has BatchNorm (`norm`).
   - The 128x128 variant (`image_size=128`) prepends one 48-channel stride-2 layer to each encoder and
     discriminator and appends one 96 -> 48 transposed convolution to the decoder (48 -> 3 last).
   - losses (eq. 7-13): L_r = lambda_rf * L_rf + lambda_rv * L_rv + lambda_f * L_fea + lambda_s * L_sty
     with lambda_rf = lambda_rv = 0.5, lambda_f = 0.1, lambda_s = 0.01. The adversarial terms are the
     log-loss of eq. 7/8 in the non-saturating form (the generator minimises -log D(fake) rather than
     maximising the discriminator's loss, eq. 9: same fixed point, usable gradients early on). D_rv sees
     (I, T_m) with I drawn per example with equal probability among the true product I_c (label 1), the
     generated one (0) and the product of another, random training pair I_c^- (0). The paper's renderer
     loss has **no pixel (L1) term**; `lambda_l1` (default 0, i.e. as the paper) exists for experiments.
   - perceptual network: the paper's VGG-19 (J_f = {relu4_3}, J_s = {relu3_3, relu4_3}) is not available
     offline here (no torchvision weights), so phi is the pretrained EfficientNet-Lite0 at layers of
     matching depth: "block4" (end of Lite0's 3rd of 7 stages, stride 8, 40 channels) stands for relu3_3
     (VGG's 3rd of 5 stages) and "block10" (end of the 5th stage, stride 16, 112 channels, the middle of
     the trunk) for relu4_3. J_f = {block10}, J_s = {block4, block10}. On the 64x64 images they are 8x8 and
     4x4 maps (VGG's are 16x16 and 8x8 there): `perceptual_size=128` upsamples the images first to match
     VGG's resolutions, at about 4x the perceptual cost (a fifth of a renderer step at 64); the default
     keeps 64 for the CPU budget. L_fea = sum_j mean((phi_j(x) - phi_j(y))^2) (eq. 10),
     L_sty = sum_j ||G_j(x) - G_j(y)||_F^2 with G = M M^T / (C H W) (eq. 11).

Training uses the *ground-truth* parse maps (garment = LIP labels 5, 6, 7) for T_m and the product's own
shape map S (the data set's cloth-mask, or GrabCut as the paper, `shape_maps`); inference uses the trained
parser (`parser` = an hp checkpoint; GrabCut without one) and the predicted shape map. `train_shapes =
"predicted"` trains on the leave-one-out nearest neighbour's shape map instead, as seen at inference.

Ablations (Sec. 4.3, Table 3) are switches: `use_shape_predictor=False` ("w/o SP": the renderer gets T_m
only, a 3-channel input; registered as the proxy "paintnet-wo-sp"), `use_rf_discriminator=False`,
`use_rv_discriminator=False`, `use_perceptual=False`. A removed part is neither built into the loss nor
logged.

Example:
    >>> from generation.proxies import create_proxy                  # doctest: +SKIP
    >>> proxy = create_proxy("paintnet@runs/paintnet/final.pt", parser="runs/parsing/final.pt")  # doctest: +SKIP
    >>> products = proxy(person_photos)  # (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import (
    GanTrainer,
    conv_block,
    discriminator_loss,
    from_gan_range,
    generator_loss,
    init_gan_weights,
    load_pair_archive,
    prepare_pair_tensors,
    set_requires_grad,
    to_gan_range,
    uint8_to_gan,
    up_block,
)
from generation.proxies import PROXIES, Proxy
from retrieval.backbones import EfficientNetLite0
from retrieval.garments import segmented_texture
from retrieval.registry import typed_options
from retrieval.training import TrainingRun, atomic_torch_save, load_checkpoint, seed_everything

log = logging.getLogger("street2shop.paintnet")

#: Table 1 channel widths at 64x64.
ENCODER_CHANNELS = (96, 192, 384, 768)
BOTTLENECK_CHANNELS = 1536
DISCRIMINATOR_CHANNELS = (96, 192, 384, 768)
#: Extra first layer of the 128x128 variant.
EXTRA_CHANNELS_128 = 48
#: Lite0 layers standing in for VGG-19's relu4_3 (features) and relu3_3 + relu4_3 (style).
PERCEPTUAL_FEATURE_LAYERS = ("block10",)
PERCEPTUAL_STYLE_LAYERS = ("block4", "block10")
SP_RANKINGS = ("shape_iou", "product_gem")


def _widths(channels: Sequence[int], multiplier: float) -> List[int]:
    return [max(4, int(round(c * multiplier))) for c in channels]


def _check_image_size(image_size: int) -> int:
    if int(image_size) not in (64, 128):
        raise ValueError(f"PaintNet's renderer is defined at 64x64 (Table 1) or 128x128, got image_size={image_size}")
    return int(image_size)


# --------------------------------------------------------------------------------------------------
# Texture renderer and discriminators (Table 1)
# --------------------------------------------------------------------------------------------------


class TextureRenderer(nn.Module):
    """The generator of Table 1: (segmented texture, shape map) -> product image, in [-1, 1].

    Args:
        in_channels: 6 (T_m and the 3-channel shape map, Table 1) or 3 (T_m only: "w/o SP").
        image_size: 64 (Table 1) or 128 (one more down and up layer).
        width: multiplier of every channel count (1.0 = Table 1; smaller only for fast tests).
        norm: BatchNorm after every layer but the first and the last (DCGAN convention).

    Shape:
        - texture: (B, 3, S, S) in [-1, 1]; shape: (B, 3, S, S) in [-1, 1] or None (in_channels 3).
        - Output: (B, 3, S, S) in [-1, 1] (tanh); the bottleneck `encode(...)` is (B, 1536, 1, 1).

    Example:
        >>> renderer = TextureRenderer(width=0.25)
        >>> renderer(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, in_channels: int = 6, image_size: int = 64, width: float = 1.0, norm: bool = True):
        super().__init__()
        image_size = _check_image_size(image_size)
        if in_channels not in (3, 6):
            raise ValueError(f"in_channels must be 6 (texture + shape) or 3 (texture only), got {in_channels}")
        self.in_channels = in_channels
        channels = _widths(((EXTRA_CHANNELS_128,) if image_size == 128 else ()) + ENCODER_CHANNELS, width)
        bottleneck = max(4, int(round(BOTTLENECK_CHANNELS * width)))
        encoder = []
        previous = in_channels
        for i, c in enumerate(channels):
            encoder.append(conv_block(previous, c, norm=norm and i > 0, activation="lrelu"))
            previous = c
        # Conv(5): 4x4 valid convolution of the 4x4 map -> the 1536-d embedding.
        encoder.append(
            conv_block(previous, bottleneck, kernel_size=4, stride=1, padding=0, norm=norm, activation="lrelu")
        )
        self.encoder = nn.Sequential(*encoder)
        decoder = [up_block(bottleneck, channels[-1], kernel_size=4, stride=1, padding=0, norm=norm, activation="relu")]
        reversed_channels = list(reversed(channels))
        for c_in, c_out in zip(reversed_channels[:-1], reversed_channels[1:]):
            decoder.append(up_block(c_in, c_out, norm=norm, activation="relu"))
        decoder.append(up_block(reversed_channels[-1], 3, norm=False, activation="tanh"))
        self.decoder = nn.Sequential(*decoder)
        init_gan_weights(self)

    def encode(self, texture: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.in_channels == 6:
            if shape is None:
                raise ValueError("this renderer takes a shape map (in_channels=6); pass shape=(B, 3, S, S)")
            x = torch.cat([texture, shape], dim=1)
        else:
            x = texture
        return self.encoder(x)

    def forward(self, texture: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decoder(self.encode(texture, shape))


class ConvDiscriminator(nn.Module):
    """Table 1's discriminator: 4x4 stride-2 convolutions 96-192-384-768, then a 1x1 convolution to 1.

    Returns logits (the sigmoid of Table 1 is applied by the log-loss), one per position of the 4x4 map.

    Shape:
        - Input: (B, in_channels, S, S), S = 64 (or 128).
        - Output: (B, 1, 4, 4) logits.

    Example:
        >>> ConvDiscriminator(3, width=0.25)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(self, in_channels: int, image_size: int = 64, width: float = 1.0, norm: bool = True):
        super().__init__()
        image_size = _check_image_size(image_size)
        channels = _widths(((EXTRA_CHANNELS_128,) if image_size == 128 else ()) + DISCRIMINATOR_CHANNELS, width)
        layers = []
        previous = in_channels
        for i, c in enumerate(channels):
            layers.append(conv_block(previous, c, norm=norm and i > 0, activation="lrelu"))
            previous = c
        layers.append(nn.Conv2d(previous, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)
        init_gan_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @torch.no_grad()
    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) the scalar probability of the paper: the mean sigmoid of the local logits."""
        return torch.sigmoid(self.forward(images)).flatten(1).mean(1)


class RealFakeDiscriminator(ConvDiscriminator):
    """D_rf: is a 64x64x3 product image real or generated? (Table 1, eq. 7)"""

    def __init__(self, image_size: int = 64, width: float = 1.0, norm: bool = True):
        super().__init__(3, image_size, width, norm)


class RelevanceDiscriminator(ConvDiscriminator):
    """D_rv: does the product image belong to the segmented texture T_m? 64x64x6 input (Table 1, eq. 8)."""

    def __init__(self, image_size: int = 64, width: float = 1.0, norm: bool = True):
        super().__init__(6, image_size, width, norm)

    def forward(self, images: torch.Tensor, texture: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        return self.net(images if texture is None else torch.cat([images, texture], dim=1))


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = M M^T / (C H W) for M = features reshaped to (C, H W) (eq. 11).

    Shape:
        - features: (B, C, H, W); Output: (B, C, C).

    Example:
        >>> gram_matrix(torch.ones(1, 2, 2, 2))
        tensor([[[0.5000, 0.5000],
                 [0.5000, 0.5000]]])
    """
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w).float()
    return flat @ flat.transpose(1, 2) / (c * h * w)


def perceptual_losses(
    fake_features: Mapping[str, torch.Tensor],
    real_features: Mapping[str, torch.Tensor],
    feature_layers: Sequence[str] = PERCEPTUAL_FEATURE_LAYERS,
    style_layers: Sequence[str] = PERCEPTUAL_STYLE_LAYERS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_fea, L_sty) of eq. 10-11 from feature maps of the generated and the true image, batch-averaged.

    L_fea = sum_j ||phi_j(x) - phi_j(y)||^2 / (C_j H_j W_j); L_sty = sum_j ||G_j(x) - G_j(y)||_F^2.

    Example:
        >>> a = {"l": torch.zeros(1, 2, 2, 2)}; b = {"l": torch.ones(1, 2, 2, 2)}
        >>> [round(v.item(), 4) for v in perceptual_losses(a, b, ("l",), ("l",))]
        [1.0, 1.0]
    """
    feature = sum(((fake_features[j].float() - real_features[j].float()) ** 2).mean() for j in feature_layers)
    style = sum(
        ((gram_matrix(fake_features[j]) - gram_matrix(real_features[j])) ** 2).sum(dim=(1, 2)).mean()
        for j in style_layers
    )
    return feature, style


class PerceptualLoss(nn.Module):
    """Feature + style losses on a frozen, pretrained EfficientNet-Lite0 (stand-in for VGG-19, see module doc).

    Args:
        backbone: a Lite0 to share (frozen here); a pretrained one is made when None.
        size: images are resized to size x size first (128: Lite0's block4/block10 maps then have the
            16x16 / 8x8 resolution of VGG's relu3_3 / relu4_3 on 64x64 images; 64: 8x8 / 4x4).

    Shape:
        - fake, real: (B, 3, S, S) in [-1, 1]. Output: (L_fea, L_sty) scalars.
    """

    def __init__(
        self,
        backbone: Optional[EfficientNetLite0] = None,
        size: int = 64,
        feature_layers: Sequence[str] = PERCEPTUAL_FEATURE_LAYERS,
        style_layers: Sequence[str] = PERCEPTUAL_STYLE_LAYERS,
    ):
        super().__init__()
        self.backbone = (backbone if backbone is not None else EfficientNetLite0(pretrained=True)).eval()
        set_requires_grad(self.backbone, False)
        self.size = int(size)
        self.feature_layers = tuple(feature_layers)
        self.style_layers = tuple(style_layers)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm statistics, always
        return self

    def features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        images = from_gan_range(images)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.backbone.features(images, tuple(sorted(set(self.feature_layers) | set(self.style_layers))))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            real_features = self.features(real)
        return perceptual_losses(self.features(fake), real_features, self.feature_layers, self.style_layers)


def relevance_batch(
    product: torch.Tensor, generated: torch.Tensor, irrelevant: torch.Tensor, choice: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images D_rv judges and their labels: per example, choice 0 = I_c (1), 1 = generated (0), 2 = I_c^- (0).

    Shape:
        - product, generated, irrelevant: (B, 3, S, S); choice: (B,) int in {0, 1, 2}.
        - Output: images (B, 3, S, S), targets (B,) float.
    """
    pick = choice.view(-1, 1, 1, 1)
    images = torch.where(pick == 0, product, torch.where(pick == 1, generated, irrelevant))
    return images, (choice == 0).float()


def relevance_discriminator_loss(logits: torch.Tensor, targets: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """Eq. 8: loss of D_rv's local logits (B, 1, h, w) against per-example 0/1 targets (B,).

    "bce" is eq. 8's log-loss; "lsgan" (x - t)^2 and "hinge" relu(1 -/+ x) follow `generation.gan`.

    Example:
        >>> round(relevance_discriminator_loss(torch.zeros(2, 1, 4, 4), torch.tensor([1.0, 0.0])).item(), 4)
        0.6931
    """
    t = targets.view(-1, 1, 1, 1).expand_as(logits)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(logits, t)
    if mode == "lsgan":
        return ((logits - t) ** 2).mean()
    if mode == "hinge":
        return F.relu(1.0 - (2.0 * t - 1.0) * logits).mean()
    raise ValueError(f"unknown GAN loss mode {mode!r}")


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 5.0
) -> torch.Tensor:
    """Eq. 5: mean over triplets of max(0, ||a - p||^2 - ||a - n||^2 + margin) (squared euclidean).

    The paper sums over triplets; the mean makes the learning rate independent of the batch size.

    Example:
        >>> triplet_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), margin=5.0)
        tensor(0.)
    """
    positive_distance = ((anchor - positive) ** 2).sum(dim=1)
    negative_distance = ((anchor - negative) ** 2).sum(dim=1)
    return F.relu(positive_distance - negative_distance + margin).mean()


# --------------------------------------------------------------------------------------------------
# Shape predictor
# --------------------------------------------------------------------------------------------------


def attention_pool(feature_map: torch.Tensor, attention_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sum over positions of softmax(attention_logits) * feature_map.

    Shape:
        - feature_map: (B, C, H, W); attention_logits: (B, 1, H, W). Output: (B, C).

    Example:
        >>> attention_pool(torch.tensor([[[[1.0, 3.0]]]]), torch.zeros(1, 1, 1, 2))
        tensor([[2.]])
    """
    weights = torch.softmax(attention_logits.flatten(2), dim=-1)  # (B, 1, HW)
    return (feature_map.flatten(2) * weights).sum(-1)


def rank_triplet_candidates(similarity: torch.Tensor, k: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k (positives) and bottom-k (negatives) of each row of a similarity matrix, itself excluded.

    Shape:
        - similarity: (N, N). Output: positives (N, k), negatives (N, k) int64 (k capped at (N - 1) // 2).

    Example:
        >>> s = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> rank_triplet_candidates(s, k=1)
        (tensor([[1],
                [0],
                [1]]), tensor([[2],
                [2],
                [0]]))
    """
    n = similarity.shape[0]
    if n < 3:
        raise ValueError(f"triplets need at least 3 training pairs, got {n}")
    k = max(1, min(int(k), (n - 1) // 2))
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    positives = similarity.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    negatives = similarity.masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    return positives, negatives


def shape_iou_matrix(shapes: torch.Tensor, size: int = 32, chunk: int = 1024) -> torch.Tensor:
    """IoU of every pair of binary shape maps, at size x size.

    Shape:
        - shapes: (N, 1, H, W) uint8 (0/255) or bool. Output: (N, N) float in [0, 1].
    """
    masks = (
        F.interpolate(shapes.float(), size=(size, size), mode="area")
        .flatten(1)
        .ge(0.5 * shapes.float().max().clamp_min(1))
    )
    masks = masks.float()
    areas = masks.sum(1)
    rows = []
    for start in range(0, len(masks), chunk):
        inter = masks[start : start + chunk] @ masks.T
        union = areas[start : start + chunk, None] + areas[None, :] - inter
        rows.append(inter / union.clamp_min(1.0))
    return torch.cat(rows)


def mean_iou(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean IoU between two batches of binary masks (B, 1, H, W) (> 0.5 of the max is foreground)."""
    p = predicted.float() > 0.5 * float(predicted.float().max().clamp_min(1e-6))
    t = target.float() > 0.5 * float(target.float().max().clamp_min(1e-6))
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return float((inter / union.clamp_min(1)).mean())


class ShapePredictor(nn.Module):
    """Sec. 3.2.1: f_m = W [avg-pool(F), attention-pool(F)] over frozen Lite0 maps, and a shape-map memory.

    Args:
        image_size: (H, W) the person photo is resized to for the backbone.
        layer: the Lite0 endpoint used as F ("head": 1280 channels at stride 32).
        hidden: channels of the first of the two attention convolutions.
        dim: size of the embedding f_m.
        shape_size: side of the stored shape maps (the renderer's image size).
        pretrained: ImageNet weights for the backbone.

    Shape:
        - `forward(images)`: (B, 3, H, W) in [0, 1] -> (B, dim) embeddings.
        - `predict_shape(images)`: -> (B, 1, S, S) float in {0, 1}: the nearest training photo's shape map.

    Example:
        >>> sp = ShapePredictor(image_size=(64, 48), pretrained=False, dim=8, shape_size=64)
        >>> sp.set_memory(torch.randn(5, 8), torch.zeros(5, 1, 64, 64, dtype=torch.uint8))
        >>> sp.predict_shape(torch.rand(2, 3, 64, 48)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        image_size: Tuple[int, int] = (256, 192),
        layer: str = "head",
        hidden: int = 64,
        dim: int = 256,
        shape_size: int = 64,
        pretrained: bool = True,
        backbone: Optional[EfficientNetLite0] = None,
    ):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.layer = layer
        self.backbone = (backbone if backbone is not None else EfficientNetLite0(pretrained=pretrained)).eval()
        set_requires_grad(self.backbone, False)
        channels = self._layer_channels(layer)
        # Two successive 1x1 convolutions -> one weighting map over positions (eq. 3).
        self.attention = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
        self.embedding = nn.Linear(2 * channels, dim)
        self.dim = dim
        self.shape_size = int(shape_size)
        self.register_buffer("memory_embeddings", torch.zeros(0, dim))
        self.register_buffer("memory_shapes", torch.zeros(0, 1, self.shape_size, self.shape_size, dtype=torch.uint8))

    def _layer_channels(self, layer: str) -> int:
        if layer == "head":
            return EfficientNetLite0.out_channels
        with torch.no_grad():
            return int(self.backbone.features(torch.zeros(1, 3, 64, 64), (layer,))[layer].shape[1])

    def train(self, mode: bool = True) -> "ShapePredictor":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the frozen backbone's maps F (B, C, h, w), float32, contiguous."""
        if images.shape[-2:] != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return self.backbone.features(images, (self.layer,))[self.layer].float().contiguous()

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """F (B, C, h, w) -> f_m (B, dim) (eq. 4 and the linear map W)."""
        local = maps.mean(dim=(2, 3))
        attended = attention_pool(maps, self.attention(maps))
        return self.embedding(torch.cat([local, attended], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(self.feature_maps(images))

    # ---- memory of the training set ------------------------------------------------------------
    def set_memory(self, embeddings: torch.Tensor, shapes: torch.Tensor) -> None:
        """Store the training photos' embeddings (N, dim) and their product shape maps (N, 1, S, S) uint8."""
        if embeddings.shape[0] != shapes.shape[0] or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"memory needs (N, {self.dim}) embeddings and (N, 1, S, S) shapes, got "
                f"{tuple(embeddings.shape)} and {tuple(shapes.shape)}"
            )
        if shapes.dtype != torch.uint8 or shapes.shape[1:] != (1, self.shape_size, self.shape_size):
            raise ValueError(
                f"shape maps must be uint8 (N, 1, {self.shape_size}, {self.shape_size}), got "
                f"{shapes.dtype} {tuple(shapes.shape)}"
            )
        self.memory_embeddings = embeddings.detach().float().to(self.memory_embeddings.device).clone()
        self.memory_shapes = shapes.detach().to(self.memory_shapes.device).clone()

    @property
    def has_memory(self) -> bool:
        return self.memory_embeddings.shape[0] > 0

    def nearest(self, embeddings: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """Index (B,) of the nearest stored embedding by squared euclidean distance (the metric of eq. 5).

        `exclude_self`: `embeddings` are the memory itself; each row's own entry is skipped (leave-one-out).
        """
        if not self.has_memory:
            raise RuntimeError("the shape predictor has no training memory: train it (PaintNet.train_on) first")
        distances = torch.cdist(embeddings.float(), self.memory_embeddings) ** 2
        if exclude_self:
            distances.fill_diagonal_(float("inf"))
        return distances.argmin(dim=1)

    @torch.no_grad()
    def predict_shape(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) person photos -> (B, 1, S, S) float 0/1: the nearest training photo's shape map."""
        index = self.nearest(self.forward(images))
        return self.memory_shapes[index].float() / 255.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The memory's size is the training set's: resize the buffers to the stored ones before copying.
        for name in ("memory_embeddings", "memory_shapes"):
            key = prefix + name
            if key in state_dict:
                stored = state_dict[key]
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# One renderer training step (pure with respect to the data: tests call it directly)
# --------------------------------------------------------------------------------------------------


def shape_to_input(shape: torch.Tensor) -> torch.Tensor:
    """A shape map (B, 1, S, S) in [-1, 1] -> Table 1's 3-channel map (B, 3, S, S)."""
    return shape.expand(-1, 3, -1, -1)


class RendererStep:
    """The texture renderer's optimisation step: D_rf, D_rv, then G (eq. 7-13), with the ablation switches.

    Args:
        renderer, rf, rv: the generator and the discriminators (rf / rv None when switched off).
        perceptual: a `PerceptualLoss`, or None when L_per is switched off.
        optimizers: "g", and "rf" / "rv" for the discriminators that exist.
        conf: lambda_rf, lambda_rv, lambda_f, lambda_s, lambda_l1, gan_mode.

    `step(batch, generator, irrelevant_pool)` returns the logged losses: "d_rf", "d_rv" (discriminators),
    "g_rf", "g_rv", "g_fea", "g_sty", "g_l1" (unweighted generator terms; only those switched on) and
    "g_total" (the weighted sum that is minimised).
    """

    def __init__(
        self,
        renderer: TextureRenderer,
        rf: Optional[ConvDiscriminator],
        rv: Optional[RelevanceDiscriminator],
        perceptual: Optional[PerceptualLoss],
        optimizers: Mapping[str, torch.optim.Optimizer],
        conf: Mapping[str, Any],
    ):
        self.renderer, self.rf, self.rv, self.perceptual = renderer, rf, rv, perceptual
        self.optimizers = optimizers
        self.conf = conf
        if rf is None and rv is None and perceptual is None and not conf.get("lambda_l1", 0.0):
            raise ValueError("the renderer would have no loss: keep a discriminator, L_per or lambda_l1 > 0")

    def generate(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shape = shape_to_input(batch["shape"]) if self.renderer.in_channels == 6 else None
        return self.renderer(batch["texture"], shape)

    def discriminator_losses(self, batch, fake, choice, irrelevant) -> Dict[str, torch.Tensor]:
        """The discriminators' losses for this batch (fake detached by the caller)."""
        mode = self.conf.get("gan_mode", "bce")
        losses = {}
        if self.rf is not None:
            losses["d_rf"] = discriminator_loss(self.rf(batch["product"]), self.rf(fake), mode)
        if self.rv is not None:
            images, targets = relevance_batch(batch["product"], fake, irrelevant, choice)
            losses["d_rv"] = relevance_discriminator_loss(self.rv(images, batch["texture"]), targets, mode)
        return losses

    def generator_losses(self, batch, fake) -> Dict[str, torch.Tensor]:
        """The generator's unweighted loss terms and their weighted sum "g_total" (eq. 13)."""
        mode = self.conf.get("gan_mode", "bce")
        terms: Dict[str, torch.Tensor] = {}
        total = fake.new_zeros(())
        if self.rf is not None:
            terms["g_rf"] = generator_loss(self.rf(fake), mode)
            total = total + self.conf["lambda_rf"] * terms["g_rf"]
        if self.rv is not None:
            terms["g_rv"] = generator_loss(self.rv(fake, batch["texture"]), mode)
            total = total + self.conf["lambda_rv"] * terms["g_rv"]
        if self.perceptual is not None:
            terms["g_fea"], terms["g_sty"] = self.perceptual(fake, batch["product"])
            total = total + self.conf["lambda_f"] * terms["g_fea"] + self.conf["lambda_s"] * terms["g_sty"]
        if self.conf.get("lambda_l1", 0.0):
            terms["g_l1"] = (fake - batch["product"]).abs().mean()
            total = total + self.conf["lambda_l1"] * terms["g_l1"]
        terms["g_total"] = total
        return terms

    def draw(
        self, batch, generator: torch.Generator, irrelevant_pool: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per example: D_rv's choice in {0, 1, 2} (equal probability) and an irrelevant product I_c^-.

        `irrelevant_pool` (N, 3, S, S) uint8 holds every training product; the irrelevant one is another
        row than the example's own (`batch["index"]`).
        """
        b = batch["texture"].shape[0]
        device = batch["texture"].device
        choice = torch.randint(0, 3, (b,), generator=generator, device=generator.device).to(device)
        n = irrelevant_pool.shape[0]
        offset = torch.randint(1, max(n, 2), (b,), generator=generator, device=generator.device).to(device)
        other = (batch["index"] + offset) % n
        irrelevant = uint8_to_gan(irrelevant_pool[other.cpu()].to(device))
        return choice, irrelevant

    def step(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator, irrelevant_pool: torch.Tensor
    ) -> Dict[str, float]:
        choice, irrelevant = self.draw(batch, generator, irrelevant_pool)
        fake = self.generate(batch)
        logged: Dict[str, float] = {}
        discriminators = [d for d in (self.rf, self.rv) if d is not None]
        if discriminators:
            set_requires_grad(discriminators, True)
            d_losses = self.discriminator_losses(batch, fake.detach(), choice, irrelevant)
            for name, loss in d_losses.items():
                optimizer = self.optimizers[name[2:]]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                logged[name] = float(loss.detach())
            set_requires_grad(discriminators, False)
        g_terms = self.generator_losses(batch, fake)
        self.optimizers["g"].zero_grad(set_to_none=True)
        g_terms["g_total"].backward()
        self.optimizers["g"].step()
        if discriminators:
            set_requires_grad(discriminators, True)
        logged.update({name: float(value.detach()) for name, value in g_terms.items()})
        return logged


# --------------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------------

#: Options that only change training: a checkpoint's values are adopted when loading (unless given).
TRAINING_ONLY_KEYS = (
    "use_rf_discriminator",
    "use_rv_discriminator",
    "use_perceptual",
    "lambda_rf",
    "lambda_rv",
    "lambda_f",
    "lambda_s",
    "lambda_l1",
    "gan_mode",
    "perceptual_size",
    "sp_ranking",
    "sp_k",
    "sp_margin",
    "shape_maps",
    "train_shapes",
)


@PROXIES.register("paintnet")
class PaintNet(Proxy):
    """PaintNet proxy: person photo -> generated product photo (see the module docstring).

    forward: parser (or GrabCut) -> segmented texture T_m -> shape predictor -> nearest training shape map
    -> texture renderer -> [0, 1], resized to the input's size.

    Untrained (no checkpoint), the renderer is random and the shape memory empty: the proxy still runs
    (with an all-background shape map, a warning says so) so that contract tests can exercise it, but its
    output means nothing. Train with `train_on` / `street2shop train paintnet`, load with
    `create_proxy("paintnet@run/final.pt")`.
    """

    trainable = True
    default_conf: Dict[str, Any] = {
        "image_size": 64,
        "width": 1.0,
        "norm": True,
        "use_shape_predictor": True,
        "use_rf_discriminator": True,
        "use_rv_discriminator": True,
        "use_perceptual": True,
        "lambda_rf": 0.5,
        "lambda_rv": 0.5,
        "lambda_f": 0.1,
        "lambda_s": 0.01,
        "lambda_l1": 0.0,
        "gan_mode": "bce",
        "perceptual_size": 64,
        "parser": None,
        "sp_image_size": (256, 192),
        "sp_layer": "head",
        "sp_hidden": 64,
        "sp_dim": 256,
        "sp_ranking": "shape_iou",
        "sp_k": 20,
        "sp_margin": 5.0,
        "shape_maps": "cloth_mask",
        "train_shapes": "true",
        "pretrained": True,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self._explicit = set(conf)
        self._warned_untrained = False
        self._build()

    def _build(self, seed: int = 0) -> None:
        """(Re)build the networks, initialised under `seed`: an untrained proxy is reproducible."""
        c = self.conf
        size = _check_image_size(c["image_size"])
        if c["sp_ranking"] not in SP_RANKINGS:
            raise ValueError(f"sp_ranking must be one of {SP_RANKINGS}, got {c['sp_ranking']!r}")
        if c["train_shapes"] not in ("true", "predicted"):
            raise ValueError(f"train_shapes must be 'true' or 'predicted', got {c['train_shapes']!r}")
        with torch.random.fork_rng(devices=[]):  # leaves the global generator alone
            torch.manual_seed(seed)
            self.renderer = TextureRenderer(6 if c["use_shape_predictor"] else 3, size, c["width"], c["norm"])
            if c["use_shape_predictor"]:
                self.shape_predictor = ShapePredictor(
                    tuple(c["sp_image_size"]),
                    c["sp_layer"],
                    c["sp_hidden"],
                    c["sp_dim"],
                    size,
                    pretrained=c["pretrained"],
                )
            else:
                self.shape_predictor = None
        self.parser = _load_parser(c["parser"]) if c["parser"] else None
        self.eval()

    # ---- inference ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.renderer.parameters()).device

    def garment_masks(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1, H, W) float 0/1 garment masks: the trained parser, else GrabCut."""
        from generation.parsing import garment_masks

        return garment_masks(images, self.parser)

    def segmented_textures(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) person photos -> T_m (B, 3, S, S) in [0, 1]."""
        size = self.conf["image_size"]
        return segmented_texture(images, self.garment_masks(images), size=(size, size))

    def predicted_shapes(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, 1, S, S) in {0, 1} from the shape predictor (None for "w/o SP")."""
        if self.shape_predictor is None:
            return None
        if not self.shape_predictor.has_memory:
            if not self._warned_untrained:
                log.warning(
                    "paintnet is untrained (no shape memory): using an all-background shape map; "
                    "train it with `street2shop train paintnet` and load run/final.pt"
                )
                self._warned_untrained = True
            size = self.conf["image_size"]
            return images.new_zeros(images.shape[0], 1, size, size)
        return self.shape_predictor.predict_shape(images)

    @torch.no_grad()
    def generate(self, textures: torch.Tensor, shapes: Optional[torch.Tensor]) -> torch.Tensor:
        """T_m (B, 3, S, S) in [0, 1] and shape maps (B, 1, S, S) in [0, 1] -> products (B, 3, S, S) in [0, 1]."""
        shape_input = shape_to_input(to_gan_range(shapes)) if shapes is not None else None
        return from_gan_range(self.renderer(to_gan_range(textures), shape_input))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        textures = self.segmented_textures(images)
        generated = self.generate(textures, self.predicted_shapes(images))
        # The renderer's square canvas holds the product stretched like the training products (resized
        # from the data set's frames): resizing to the input's frame undoes that stretch.
        return F.interpolate(generated, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)

    # ---- checkpoints -------------------------------------------------------------------------
    def trained_state(self) -> Dict[str, torch.Tensor]:
        """What final.pt stores: every tensor but the pretrained backbone's and the parser's."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.state_dict().items()
            if ".backbone." not in f".{k}" and not k.startswith("parser.")
        }

    def paper_name(self) -> Optional[str]:
        """ "paintnet" only for the paper's method: an ablation or `train_shapes="predicted"` has no row in Table 4."""
        switches = ("use_shape_predictor", "use_rf_discriminator", "use_rv_discriminator", "use_perceptual")
        as_paper = all(self.conf[k] for k in switches) and self.conf["train_shapes"] == "true"
        return "paintnet" if as_paper else None

    def load_trained(self, checkpoint) -> "PaintNet":
        """Load a final.pt of `train_on` (strict on the trained tensors; adopts its training-only options)."""
        payload = load_checkpoint(checkpoint, map_location=self.device)
        trained_for = payload.get("proxy")
        if trained_for not in (None, self.name):
            raise ValueError(f"{checkpoint} was trained for proxy {trained_for!r}, not {self.name!r}")
        stored_conf = payload.get("proxy_conf", {})
        architecture = [
            k
            for k in (
                "image_size",
                "width",
                "norm",
                "use_shape_predictor",
                "sp_image_size",
                "sp_layer",
                "sp_hidden",
                "sp_dim",
            )
            if k in stored_conf and _jsonable(stored_conf[k]) != _jsonable(self.conf[k])
        ]
        conflicting = [k for k in architecture if k in self._explicit]
        if conflicting:
            raise ValueError(
                f"{checkpoint} was trained with {{{', '.join(f'{k}={stored_conf[k]!r}' for k in conflicting)}}} "
                f"but this {self.name} was asked for {{{', '.join(f'{k}={self.conf[k]!r}' for k in conflicting)}}}: "
                "drop those options to use the checkpoint's"
            )
        if architecture:  # 'paintnet@run/final.pt' just works: rebuild with the architecture it was trained with
            device = self.device
            self.conf.update(
                {k: tuple(stored_conf[k]) if isinstance(stored_conf[k], list) else stored_conf[k] for k in architecture}
            )
            self._build()
            self.to(device)
        for key in TRAINING_ONLY_KEYS + ("parser",):
            if key in stored_conf and key not in self._explicit:
                self.conf[key] = stored_conf[key]
        if self.conf["parser"] and self.parser is None:
            self.parser = _load_parser(self.conf["parser"]).to(self.device)
        missing, unexpected = self.load_state_dict(payload["state_dict"], strict=False)
        missing = [k for k in missing if ".backbone." not in f".{k}" and not k.startswith("parser.")]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {self.name} with config {self.conf}: missing {missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
        return self.eval()

    # ---- training ----------------------------------------------------------------------------
    def train_on(
        self,
        dataset,
        out_dir,
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        lr: Optional[float] = None,
        seed: int = 0,
        time_budget_s: Optional[float] = None,
        progress: bool = True,
        sp_epochs: int = 5,
        sp_lr: float = 1e-3,
        sp_batch_size: int = 32,
        sample_every: int = 100,
        checkpoint_every_s: float = 300.0,
        max_pairs: Optional[int] = None,
        pairs: Optional[str] = None,
        shape_predictor_from: Optional[str] = None,
        renderer_from: Optional[str] = None,
        **conf_overrides: Any,
    ) -> Path:
        """Train the shape predictor, then the texture renderer, on `dataset.train`; return out_dir/final.pt.

        Args:
            dataset: a RetrievalSet with training pairs (person_image, product_image, parse, mask).
            out_dir: run directory: final.pt, last.pt, losses.csv/png, samples/ (the renderer's run),
                pairs_<S>.pt (the preprocessed pairs), shape_predictor/ (its own run and cached maps).
            epochs: renderer epochs (default `DEFAULT_EPOCHS`, or as many as `time_budget_s` allows when
                only a budget is given); batch_size 16 and lr 1e-4 (Adam, betas
                0.5/0.999) by default, as the paper.
            seed, time_budget_s, progress: as `TrainingRun`; the budget covers both stages. With neither
                `epochs` nor `time_budget_s` given, the budget is `DEFAULT_TIME_BUDGET_S` (15 min).
            sp_epochs, sp_lr, sp_batch_size: the shape predictor's triplet training (SGD with momentum 0.9).
            sample_every: steps between sample grids (samples/step_NNNNNN.png).
            checkpoint_every_s: seconds between last.pt writes (~750 MB at Table 1's size, with Adam's state).
            max_pairs: train on a seeded sample of at most this many pairs (smoke runs, tests).
            pairs: a pair archive (`street2shop export-pairs`) to train on instead of the data set's photos;
                `dataset` may then be None. Without photos the shape predictor cannot be trained here: give
                `shape_predictor_from`, or the run trains the renderer alone (on the true shape maps, as
                always) and final.pt says its shape predictor is untrained.
            shape_predictor_from: a PaintNet final.pt whose trained shape predictor this run takes instead
                of training one (stage 1 is skipped): ablations that differ in renderer options share it.
            renderer_from: a PaintNet final.pt whose renderer weights (float32 or float16) start this run:
                fine-tuning, or with epochs=0, joining a renderer trained elsewhere (a GPU machine) with a
                shape predictor trained here.
            conf_overrides: proxy options for this run (e.g. use_rf_discriminator=False); they are stored in
                final.pt and adopted when it is loaded.
        """
        if conf_overrides:
            unknown = set(conf_overrides) - set(self.default_conf)
            if unknown:
                raise ValueError(f"unknown {self.name} options {sorted(unknown)}; valid: {sorted(self.default_conf)}")
            # typed like --set: a text 'false' must not train the full model under an ablation's name
            self.conf.update(typed_options(conf_overrides, self.default_conf, self.name))
            self._explicit |= set(conf_overrides)
        device = self.device
        self._build(seed)  # fresh networks initialised from the run's seed (a resumed run reloads last.pt)
        self.to(device)
        if pairs is None and (dataset is None or dataset.train is None or len(dataset.train) == 0):
            name = "no data set" if dataset is None else dataset.name
            raise ValueError(f"{name} has no training pairs to train {self.name} on (or give pairs=ARCHIVE)")
        if epochs is None and time_budget_s is None:
            time_budget_s = DEFAULT_TIME_BUDGET_S
            epochs = DEFAULT_EPOCHS
            log.info(
                "%s: default run, capped at %.0f min of training (pass epochs or a time budget for more)",
                self.name,
                time_budget_s / 60,
            )
        elif epochs is None:  # a time budget alone: train until it is spent
            epochs = UNTIL_BUDGET_EPOCHS
        epochs = int(epochs)
        batch_size = 16 if batch_size is None else int(batch_size)
        lr = 1e-4 if lr is None else float(lr)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        seed_everything(seed)
        size = self.conf["image_size"]
        if pairs is not None:
            train = None
            data = self._pairs_from_archive(pairs, size, max_pairs, seed)
        else:
            train = dataset.train.reset_index(drop=True)
            if max_pairs is not None and len(train) > int(max_pairs):
                train = train.sample(int(max_pairs), random_state=seed).reset_index(drop=True)
            data = prepare_pair_tensors(
                train, out_dir / f"pairs_{size}.pt", (size, size), self.conf["shape_maps"], progress=progress
            )
        log.info(
            "%s: %d training pairs ready in %.0f s", self.name, data["product"].shape[0], time.perf_counter() - started
        )
        joined: Dict[str, Any] = {}
        if renderer_from is not None:
            source = self._load_part(renderer_from, "renderer.")
            joined["renderer_from"] = {
                "path": str(renderer_from),
                "steps": source.get("steps"),
                "train_seconds": source.get("train_seconds"),
                "config": source.get("config"),
            }

        sp_summary: Dict[str, Any] = {}
        if self.shape_predictor is not None and shape_predictor_from is not None:
            source = self._load_part(shape_predictor_from, "shape_predictor.")
            if not self.shape_predictor.has_memory:
                raise ValueError(f"{shape_predictor_from} holds no trained shape predictor (its shape memory is empty)")
            sp_summary = {**source.get("shape_predictor", {}), "taken_from": str(shape_predictor_from)}
            if self.conf["train_shapes"] == "predicted":
                # The leave-one-out neighbours come from the stored training embeddings, which are those of
                # these pairs only if the memory holds exactly these pairs' shape maps, in this order.
                memory = self.shape_predictor.memory_shapes.cpu()
                if memory.shape != data["shape"].shape or not torch.equal(memory, data["shape"]):
                    raise ValueError(
                        f"train_shapes='predicted': the shape memory of {shape_predictor_from} was not "
                        "built from these training pairs, so it gives no leave-one-out neighbours; train "
                        "the shape predictor in this run (drop shape_predictor_from)"
                    )
                with torch.no_grad():
                    loo_index = self.shape_predictor.nearest(
                        self.shape_predictor.memory_embeddings, exclude_self=True
                    ).cpu()
                data = dict(data, shape=data["shape"][loo_index])
        elif self.shape_predictor is not None and train is None:
            log.warning(
                "%s: training from a pair archive without shape_predictor_from: the shape predictor stays "
                "untrained (it needs the photos); the renderer trains on the true shape maps as always. "
                "Join a trained one later with shape_predictor_from and renderer_from (epochs=0).",
                self.name,
            )
            sp_summary = {"trained": False}
        elif self.shape_predictor is not None:
            sp_budget = None if time_budget_s is None else 0.3 * time_budget_s
            sp_summary = train_shape_predictor(
                self.shape_predictor,
                train,
                data["shape"],
                out_dir / "shape_predictor",
                ranking=self.conf["sp_ranking"],
                k=self.conf["sp_k"],
                margin=self.conf["sp_margin"],
                epochs=sp_epochs,
                batch_size=sp_batch_size,
                lr=sp_lr,
                seed=seed,
                time_budget_s=sp_budget,
                progress=progress,
            )
            if self.conf["train_shapes"] == "predicted":
                data = dict(data, shape=data["shape"][sp_summary.pop("loo_index")])
            else:
                sp_summary.pop("loo_index")

        remaining = None if time_budget_s is None else max(1.0, time_budget_s - (time.perf_counter() - started))
        final = self._train_renderer(
            data,
            out_dir,
            epochs,
            batch_size,
            lr,
            seed,
            remaining,
            progress,
            sample_every,
            checkpoint_every_s,
            sp_summary,
            device,
            joined,
        )
        log.info("%s: trained in %.0f s -> %s", self.name, time.perf_counter() - started, final)
        return final

    def _pairs_from_archive(self, path, size: int, max_pairs: Optional[int], seed: int) -> Dict[str, torch.Tensor]:
        """The pair tensors of a `save_pair_archive` file, checked against this run's image size."""
        data = load_pair_archive(Path(path))
        missing = [k for k in ("texture", "product", "shape") if k not in data]
        if missing:
            raise ValueError(f"{path} lacks {missing}: export it again with `street2shop export-pairs`")
        found = tuple(data["product"].shape[-2:])
        if found != (size, size):
            raise ValueError(
                f"{path} holds {found[0]}x{found[1]} pairs but this {self.name} renders {size}x{size}: "
                f"export it with --size {size}, or --set image_size={found[0]}"
            )
        if max_pairs is not None and data["product"].shape[0] > int(max_pairs):
            keep = torch.randperm(data["product"].shape[0], generator=torch.Generator().manual_seed(seed))[
                : int(max_pairs)
            ]
            data = {k: v[keep] for k, v in data.items()}
        return data

    def _load_part(self, checkpoint, prefix: str) -> Dict[str, Any]:
        """Copy the tensors under `prefix` ("renderer." or "shape_predictor.") from a PaintNet final.pt; return it."""
        payload = load_checkpoint(checkpoint, map_location="cpu")
        state = {k[len(prefix) :]: v for k, v in payload.get("state_dict", {}).items() if k.startswith(prefix)}
        module = getattr(self, prefix.rstrip("."))
        own = {k for k in module.state_dict() if ".backbone." not in f".{k}"}
        if not state or own - set(state) or set(state) - set(module.state_dict()):
            raise ValueError(
                f"{checkpoint}: its {prefix.rstrip('.')} does not fit this {self.name} (conf {self.conf}); "
                f"missing {sorted(own - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - set(module.state_dict()))[:3]}"
            )
        try:
            module.load_state_dict(state, strict=False)  # the frozen pretrained backbone is not in final.pt
        except RuntimeError as exc:  # same names, other shapes: another width or image size
            raise ValueError(
                f"{checkpoint}: its {prefix.rstrip('.')} does not fit this {self.name} (conf {self.conf}): "
                f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
            ) from exc
        log.info("%s: %s taken from %s", self.name, prefix.rstrip("."), checkpoint)
        return payload

    def _train_renderer(
        self,
        data,
        out_dir,
        epochs,
        batch_size,
        lr,
        seed,
        time_budget_s,
        progress,
        sample_every,
        checkpoint_every_s,
        sp_summary,
        device,
        joined=None,
    ) -> Path:
        c = self.conf
        size = c["image_size"]
        rf = RealFakeDiscriminator(size, c["width"], c["norm"]).to(device) if c["use_rf_discriminator"] else None
        rv = RelevanceDiscriminator(size, c["width"], c["norm"]).to(device) if c["use_rv_discriminator"] else None
        perceptual = None
        if c["use_perceptual"]:
            backbone = (
                self.shape_predictor.backbone
                if self.shape_predictor is not None
                else EfficientNetLite0(pretrained=c["pretrained"])
            )
            perceptual = PerceptualLoss(backbone, size=c["perceptual_size"]).to(device)
        betas = (0.5, 0.999)
        modules: Dict[str, nn.Module] = {"renderer": self.renderer}
        optimizers: Dict[str, torch.optim.Optimizer] = {
            "g": torch.optim.Adam(self.renderer.parameters(), lr=lr, betas=betas, fused=True)
        }
        for name, d in (("rf", rf), ("rv", rv)):
            if d is not None:
                modules[name] = d
                optimizers[name] = torch.optim.Adam(d.parameters(), lr=lr, betas=betas, fused=True)
        step = RendererStep(self.renderer, rf, rv, perceptual, optimizers, c)
        config = {
            "proxy": self.name,
            "conf": _jsonable(c),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "n_pairs": int(data["product"].shape[0]),
        }
        trainer = GanTrainer(
            out_dir,
            modules,
            optimizers,
            config,
            seed=seed,
            time_budget_s=time_budget_s,
            progress=f"train {self.name}" if progress else None,
            checkpoint_every_s=checkpoint_every_s,
            sample_every=sample_every,
        )
        # The fixed sample rows also get the shape the predictor gives them (leave-one-out), as at inference.
        loo_shapes = None
        if self.shape_predictor is not None and self.shape_predictor.has_memory:
            n_samples = min(trainer.n_samples, data["product"].shape[0])
            memory = self.shape_predictor.memory_embeddings
            with torch.no_grad():
                distances = torch.cdist(memory[:n_samples], memory) ** 2
                distances[torch.arange(n_samples), torch.arange(n_samples)] = float("inf")  # leave one out
                index = distances.argmin(1)
            loo_shapes = uint8_to_gan(self.shape_predictor.memory_shapes[index]).to(device)

        def sample_columns(batch):
            was_training = self.renderer.training
            self.renderer.eval()
            columns = [("photo", from_gan_range(batch["person"])), ("texture T_m", from_gan_range(batch["texture"]))]
            if self.renderer.in_channels == 6:
                columns += [
                    ("true shape", from_gan_range(batch["shape"])),
                    ("gen(true)", from_gan_range(step.generate(batch))),
                ]
                if loo_shapes is not None:
                    predicted = dict(batch, shape=loo_shapes[: batch["shape"].shape[0]])
                    columns += [
                        ("pred shape", from_gan_range(loo_shapes[: batch["shape"].shape[0]])),
                        ("gen(pred)", from_gan_range(step.generate(predicted))),
                    ]
            else:
                columns.append(("generated", from_gan_range(step.generate(batch))))
            columns.append(("truth", from_gan_range(batch["product"])))
            self.renderer.train(was_training)
            return columns

        self.renderer.train()
        trainer.train(
            data,
            epochs,
            batch_size,
            step=lambda batch, gen: step.step(batch, gen, data["product"]),
            sample=sample_columns,
        )
        self.eval()
        extra = {"proxy": self.name, "proxy_conf": _jsonable(c), "shape_predictor": sp_summary, **(joined or {})}
        final = trainer.finish(weights=self.trained_state(), extra=extra)
        self.eval()
        return final


@PROXIES.register("paintnet-wo-sp")
class PaintNetWithoutShapePredictor(PaintNet):
    """The "w/o SP" ablation of Table 3: the renderer gets the segmented texture only (no shape map)."""

    default_conf = {**PaintNet.default_conf, "use_shape_predictor": False}


#: Renderer epochs of a default run. One epoch of VITON's 3,639 training pairs is 227 steps of 16; a
#: Table-1-sized step costs about 8.6 CPU-seconds (4-5 s on an idle 2-core CPU), so an epoch takes ~17 min.
DEFAULT_EPOCHS = 1
#: Epochs of a run given a time budget but no epochs: the budget, not this, ends it.
UNTIL_BUDGET_EPOCHS = 10_000
#: A run that names neither epochs nor a time budget stops after this long (preprocessing included), so a
#: default run fits the 15-minute CPU budget; name --epochs (or a budget) for more.
DEFAULT_TIME_BUDGET_S = 15 * 60


# --------------------------------------------------------------------------------------------------
# Shape predictor training (Algorithm 1)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _backbone_maps(
    predictor: ShapePredictor, paths: Sequence[str], cache: Path, progress: bool, batch_size: int = 32
) -> torch.Tensor:
    """Frozen feature maps of the person photos, (N, C, h, w) float16, cached in `cache`."""
    from retrieval.batching import iter_batches

    key = {"paths": list(map(str, paths)), "size": list(predictor.image_size), "layer": predictor.layer}
    if cache.exists():
        stored = load_checkpoint(cache)
        if stored.get("key") == key:
            return stored["maps"]
    device = predictor.memory_embeddings.device
    batches = iter_batches(list(map(str, paths)), predictor.image_size, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(
            batches,
            total=math.ceil(len(paths) / batch_size),
            desc="shape predictor features",
            unit="batch",
            leave=False,
        )
    maps = torch.cat([predictor.feature_maps(batch.to(device)).half().cpu() for batch in batches])
    atomic_torch_save({"key": key, "maps": maps}, cache)
    return maps


@torch.no_grad()
def _product_gem_similarity(backbone: EfficientNetLite0, paths: Sequence[str], size: Tuple[int, int]) -> torch.Tensor:
    from retrieval.batching import iter_batches
    from retrieval.descriptors.gem import gem_pool

    device = next(backbone.parameters()).device
    vectors = torch.cat(
        [
            F.normalize(gem_pool(backbone(batch.to(device))), dim=1).cpu()
            for batch in iter_batches(list(map(str, paths)), size, 32)
        ]
    )
    return vectors @ vectors.T


def train_shape_predictor(
    predictor: ShapePredictor,
    train_pairs,
    shapes: torch.Tensor,
    out_dir: Path,
    ranking: str = "shape_iou",
    k: int = 20,
    margin: float = 5.0,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: Optional[float] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Algorithm 1 on cached frozen maps, then store the training embeddings and shape maps in `predictor`.

    Args:
        predictor: the ShapePredictor to train (its attention and embedding layers).
        train_pairs: the training table (person_image, product_image), in the order of `shapes`.
        shapes: (N, 1, S, S) uint8 product shape maps of the pairs (the memory; "shape_iou" ranks by them).
        out_dir: the stage's run directory (TrainingRun files + maps.pt, the cached backbone maps).
        ranking: "shape_iou" or "product_gem" (see the module docstring).
        k, margin: top/bottom K candidates and the triplet margin alpha.

    Returns:
        A summary: steps, seconds, the leave-one-out shape IoU of the nearest neighbour on the training
        set before (raw average-pooled features) and after training, and "loo_index" (N,) the
        leave-one-out nearest neighbour of every training photo.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = predictor.memory_embeddings.device
    maps = _backbone_maps(predictor, train_pairs["person_image"].tolist(), out_dir / "maps.pt", progress)
    n = maps.shape[0]
    if ranking == "shape_iou":
        similarity = shape_iou_matrix(shapes)
    elif ranking == "product_gem":
        similarity = _product_gem_similarity(
            predictor.backbone, train_pairs["product_image"].tolist(), predictor.image_size
        )
    else:
        raise ValueError(f"unknown ranking {ranking!r}; valid: {SP_RANKINGS}")
    positives, negatives = rank_triplet_candidates(similarity, k)
    k = positives.shape[1]

    optimizer = torch.optim.SGD(
        list(predictor.attention.parameters()) + list(predictor.embedding.parameters()), lr=lr, momentum=0.9
    )
    run = TrainingRun(
        out_dir,
        {"shape_predictor": predictor},
        {"sgd": optimizer},
        config={
            "ranking": ranking,
            "k": k,
            "margin": margin,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "n": n,
            "layer": predictor.layer,
            "dim": predictor.dim,
        },
        seed=seed,
        time_budget_s=time_budget_s,
        progress="train shape predictor" if progress else None,
    )
    predictor.train()
    for epoch in run.epochs(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        anchors = torch.randperm(n, generator=generator)
        pick_positive = positives[anchors, torch.randint(0, k, (n,), generator=generator)]
        pick_negative = negatives[anchors, torch.randint(0, k, (n,), generator=generator)]
        chunks = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
        for part in run.skip_done(chunks):
            index = torch.cat([anchors[part], pick_positive[part], pick_negative[part]])
            embeddings = predictor.embed_maps(maps[index].to(device).float())
            a, p, q = embeddings.chunk(3)
            loss = triplet_loss(a, p, q, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log({"triplet": float(loss.detach())})
            if run.out_of_time:
                break
    predictor.eval()
    with torch.no_grad():
        embeddings = torch.cat([predictor.embed_maps(maps[i : i + 256].to(device).float()) for i in range(0, n, 256)])
        predictor.set_memory(embeddings, shapes)
        loo_index = predictor.nearest(embeddings, exclude_self=True).cpu()
        pooled = maps.float().mean(dim=(2, 3))
        raw = torch.cdist(pooled, pooled).fill_diagonal_(float("inf")).argmin(1)
    run.finish(weights={k_: v for k_, v in predictor.state_dict().items() if not k_.startswith("backbone.")})
    summary = {
        "steps": run.step,
        "seconds": round(time.perf_counter() - started, 1),
        "loo_shape_iou": round(mean_iou(shapes[loo_index], shapes), 4),
        "loo_shape_iou_untrained_avgpool": round(mean_iou(shapes[raw], shapes), 4),
        "loo_index": loo_index,
    }
    log.info("shape predictor: %s", {k_: v for k_, v in summary.items() if k_ != "loo_index"})
    return summary


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=list))


def _load_parser(path) -> nn.Module:
    """The trained garment parser of an hp checkpoint (`street2shop train parsing`), frozen."""
    from generation.parsing import load_garment_parser

    parser = load_garment_parser(path)
    set_requires_grad(parser, False)
    return parser.eval()
