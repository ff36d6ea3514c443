"""GeM: generalised-mean pooling of a pretrained CNN feature map (Radenović et al., 2018).

The modern global baseline: EfficientNet-Lite0 (or, with `backbone=lite2`, Lite2) ImageNet head
activations, pooled with
    f_c = (mean_{x,y} X_c(x, y)^p)^(1/p),
so p = 1 is average pooling and p -> inf max pooling.
"""

from __future__ import annotations

import torch

from retrieval.backbones import HEAD_CHANNELS, LITE_MEAN, LITE_STD, EfficientNetLite
from retrieval.descriptors.base import DESCRIPTORS, Descriptor
from retrieval.types import GlobalFeatures, InputSpec


def gem_pool(feature_map: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling.

    Shape:
        - feature_map: (B, C, H, W), non-negative (post-ReLU).
        - Output: (B, C).

    Example:
        >>> gem_pool(torch.tensor([[[[1.0, 3.0]]]]), p=1.0)
        tensor([[2.]])
    """
    return feature_map.clamp_min(eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


@DESCRIPTORS.register("gem")
class GeM(Descriptor):
    """GeM over pretrained EfficientNet-Lite head features (`backbone`: "lite0" or "lite2"); 1280-d, nothing to fit.

    `query_flip`: queries are the mean of the photo's and its mirror image's vectors (`Descriptor.embed`).
    """

    kind = "global"
    default_conf = {"image_size": (320, 240), "p": 3.0, "pretrained": True, "backbone": "lite0", "query_flip": False}

    def __init__(self, **conf):
        super().__init__(**conf)
        self.backbone = EfficientNetLite(self.conf["backbone"], pretrained=self.conf["pretrained"]).eval()

    @property
    def dim(self) -> int:
        return HEAD_CHANNELS

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), mean=LITE_MEAN, std=LITE_STD)

    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        feature_map = self.backbone(images)
        return GlobalFeatures(torch.nn.functional.normalize(gem_pool(feature_map, self.conf["p"]), dim=-1))
