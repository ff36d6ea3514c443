"""The inference base of the "one generator from the person photo" baselines (pix2pix, DTGAN).

`GeneratorProxy` holds what they share at inference: the supported sizes, resizing in and out, the
[0, 1] <-> [-1, 1] conversion around the generator, and a readable error for weights of another
config. Their training (pair tensors, discriminators, the loop) lives in `generation.training.gan`.

Example:
    >>> import torch
    >>> from generation.proxies import create_proxy
    >>> proxy = create_proxy("pix2pix").eval()                     # a GeneratorProxy, untrained
    >>> proxy(torch.rand(2, 3, 256, 192)).shape
    torch.Size([2, 3, 256, 192])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import from_gan_range, to_gan_range
from generation.proxies import Proxy

SUPPORTED_SIZES = (64, 128)


def resize_images(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize a batch: area averaging when shrinking (as the training data, cv2.INTER_AREA), else bilinear.

    Shape:
        - images: (B, C, H, W) float.
        - Output: (B, C, size[0], size[1]).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if images.shape[-2] >= size[0] and images.shape[-1] >= size[1]:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def build_seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module under a fixed seed (without touching the global RNG), so an untrained proxy is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class GeneratorProxy(Proxy):
    """A proxy made of one image-to-image generator trained on (person photo, product photo) pairs.

    Subclasses build `self.generator` ([-1, 1] -> [-1, 1] at `image_size` x `image_size`) in `__init__`.
    Only the generator belongs to the proxy (its state dict, its fingerprint, final.pt); the
    discriminators live for the training run only (`generation.training.gan`; they are in last.pt, for
    resuming).

    `forward`: (B, 3, H, W) in [0, 1] -> image_size x image_size -> generator -> [0, 1] -> (B, 3, H, W).
    """

    trainable = True

    generator: nn.Module

    def check_image_size(self) -> int:
        """conf["image_size"], refused unless one of SUPPORTED_SIZES (the generators' input side)."""
        size = int(self.conf["image_size"])
        if size not in SUPPORTED_SIZES:
            raise ValueError(f"{self.name}: image_size must be one of {SUPPORTED_SIZES}, got {size}")
        return size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Generate the product image of each person photo, at the photo's own size.

        An inference stage (no autograd graph); call `.eval()` first, as the engine does, so BatchNorm
        uses its running statistics and a batch gives the same images as its photos one by one.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name} expects float images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        side = int(self.conf["image_size"])
        small = resize_images(images, (side, side))
        generated = from_gan_range(self.generator(to_gan_range(small)))
        return resize_images(generated, images.shape[-2:]).clamp(0.0, 1.0)

    @classmethod
    def conf_for_checkpoint(cls, checkpoint, conf: Dict[str, Any]) -> Dict[str, Any]:
        """`conf` completed with the config final.pt was trained with ("proxy_conf"), the given options winning:
        'NAME@run/final.pt' then builds the architecture it was trained with (a bench's 'cyclegan[width=32]'
        comes back as 'cyclegan@.../final.pt'), and an option that contradicts it fails in `load_trained`."""
        from retrieval.training import load_checkpoint  # training stays out of the inference modules until used

        if not Path(checkpoint).is_file():
            return dict(conf)  # load_trained says what is wrong with the path
        stored = load_checkpoint(checkpoint).get("proxy_conf") or {}
        return {**{k: v for k, v in stored.items() if k in cls.default_conf}, **conf}

    def load_trained(self, checkpoint) -> "GeneratorProxy":
        """`Proxy.load_trained`, with weights of another width (a shape mismatch) reported as a ValueError."""
        try:
            return super().load_trained(checkpoint)
        except RuntimeError as exc:  # load_state_dict raises RuntimeError on tensors of another shape
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise ValueError(
                f"{checkpoint} does not fit proxy {self.name!r} with config {self.conf}: was it trained "
                f"with another config? ({first})"
            ) from None
