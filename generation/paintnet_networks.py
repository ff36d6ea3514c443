"""PaintNet's networks (paper 000, Table 1 and Sec. 3.2.1): the texture renderer, its two discriminators
and the shape predictor with its memory of training shape maps.

What each layer is and why is told in `generation.paintnet` (the proxy that runs them); the training
that fits them (losses, the renderer step, Algorithm 1) is `generation.training.paintnet`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import conv_block, init_gan_weights, set_requires_grad, up_block
from retrieval.backbones import EfficientNetLite0

#: Table 1 channel widths at 64x64.
ENCODER_CHANNELS = (96, 192, 384, 768)
BOTTLENECK_CHANNELS = 1536
DISCRIMINATOR_CHANNELS = (96, 192, 384, 768)
#: Extra first layer of the 128x128 variant.
EXTRA_CHANNELS_128 = 48


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


def shape_to_input(shape: torch.Tensor) -> torch.Tensor:
    """A shape map (B, 1, S, S) in [-1, 1] -> Table 1's 3-channel map (B, 3, S, S)."""
    return shape.expand(-1, 3, -1, -1)


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
