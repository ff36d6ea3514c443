"""R-MAC: regional maximum activations of convolutions (Tolias et al., ICLR 2016).

Max-pooled regions at L scales over a pretrained EfficientNet-Lite0 (or Lite2) feature map, each region vector
L2-normalised, PCA-whitened (learned by `fit`), summed and L2-normalised again.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, List, Tuple

import numpy as np
import torch

from retrieval.backbones import HEAD_CHANNELS, LITE_MEAN, LITE_STD, EfficientNetLite
from retrieval.descriptors.base import DESCRIPTORS, Descriptor
from retrieval.types import GlobalFeatures, InputSpec
from retrieval.whitening import PCAWhitening


@lru_cache(maxsize=64)
def rmac_regions(
    height: int, width: int, levels: int = 3, overlap: float = 0.4
) -> Tuple[Tuple[int, int, int, int], ...]:
    """Square regions (y0, x0, y1, x1) of the R-MAC grid on an H x W feature map, whole map first.

    Follows the reference implementation (Tolias et al.; cirtorch's `rmac`): level l has squares of
    side floor(2 * min(H, W) / (l + 1)), l along the short side and l + extra along the long side,
    where `extra` makes neighbouring regions overlap by about `overlap` (40% in the paper).
    """
    short = min(height, width)
    steps = np.arange(2, 8)
    spacing = (max(height, width) - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short**2 - short * spacing) / short**2 - overlap))) + 1
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0
    regions: List[Tuple[int, int, int, int]] = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        side = int(np.floor(2 * short / (level + 1)))
        half = np.floor(side / 2 - 1)
        if side < 1:
            break

        def starts(length: int, count: int) -> np.ndarray:
            step = 0.0 if count == 1 else (length - side) / (count - 1)
            return (np.floor(half + np.arange(count) * step) - half).astype(int)

        for y in starts(height, level + extra_h):
            for x in starts(width, level + extra_w):
                regions.append((int(y), int(x), int(y) + side, int(x) + side))
    return tuple(dict.fromkeys(regions))


def regional_max(feature_map: torch.Tensor, regions: Tuple[Tuple[int, int, int, int], ...]) -> torch.Tensor:
    """Max over each region; a loop over the ~20 regions, never over pixels.

    Shape:
        - feature_map: (B, C, H, W)
        - Output: (B, R, C)
    """
    return torch.stack([feature_map[:, :, y0:y1, x0:x1].amax(dim=(2, 3)) for y0, x0, y1, x1 in regions], dim=1)


@DESCRIPTORS.register("rmac")
class RMAC(Descriptor):
    """R-MAC over pretrained EfficientNet-Lite head features with learned PCA-whitening.

    `backbone`: "lite0" (default) or "lite2"; both give 1280-channel head maps. `query_flip`: queries are the
    mean of the photo's and its mirror image's vectors (`Descriptor.embed`).
    """

    kind = "global"
    needs_fit = True
    default_conf = {
        "image_size": (384, 288),
        "levels": 3,
        "whiten_dim": 512,
        "whiten_power": 0.5,
        "whiten_shrinkage": 0.1,
        "max_fit_regions": 200_000,
        "seed": 0,
        "pretrained": True,
        "backbone": "lite0",
        "query_flip": False,
    }

    def __init__(self, **conf):
        super().__init__(**conf)
        self.backbone = EfficientNetLite(self.conf["backbone"], pretrained=self.conf["pretrained"]).eval()
        self.whitening = PCAWhitening(HEAD_CHANNELS, self.conf["whiten_dim"])

    @property
    def dim(self) -> int:
        return self.conf["whiten_dim"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), mean=LITE_MEAN, std=LITE_STD)

    def region_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, R, 1280) L2-normalised region maxima."""
        feature_map = self.backbone(images)
        regions = rmac_regions(feature_map.shape[2], feature_map.shape[3], self.conf["levels"])
        return torch.nn.functional.normalize(regional_max(feature_map, regions), dim=-1)

    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        whitened = self.whitening(self.region_vectors(images))
        return GlobalFeatures(torch.nn.functional.normalize(whitened.sum(dim=1), dim=-1))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> "RMAC":
        """Learn the PCA-whitening from the region vectors of training images."""
        collected = [self.region_vectors(batch.to(self.device)).flatten(0, 1).cpu() for batch in batches]
        if not collected:
            raise ValueError("R-MAC fit got no training images")
        regions = torch.cat(collected)
        if len(regions) > self.conf["max_fit_regions"]:
            generator = torch.Generator().manual_seed(self.conf["seed"])
            regions = regions[torch.randperm(len(regions), generator=generator)[: self.conf["max_fit_regions"]]]
        self.whitening.fit(regions, self.conf["whiten_power"], self.conf["whiten_shrinkage"])
        self._fitted.fill_(True)
        return self
