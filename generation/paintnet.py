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

Where the code lives: the networks are `generation.paintnet_networks`; this module is the proxy
(inference and its checkpoints); the training (losses, Algorithm 1, the renderer's loop, pair archives,
joining parts trained elsewhere) is `generation.training.paintnet`, reached through `PaintNet.train_on`.

Example:
    >>> from generation.proxies import create_proxy                  # doctest: +SKIP
    >>> proxy = create_proxy("paintnet@runs/paintnet/final.pt", parser="runs/parsing/final.pt")  # doctest: +SKIP
    >>> products = proxy(person_photos)  # (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import from_gan_range, set_requires_grad, to_gan_range
from generation.paintnet_networks import ShapePredictor, TextureRenderer, _check_image_size, shape_to_input
from generation.proxies import PROXIES, Proxy
from retrieval.garments import segmented_texture
from retrieval.training import load_checkpoint

log = logging.getLogger("street2shop.paintnet")

#: How the shape predictor's triplets are ranked (`sp_ranking`, see above).
SP_RANKINGS = ("shape_iou", "product_gem")


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


@PROXIES.register("paintnet-wo-sp")
class PaintNetWithoutShapePredictor(PaintNet):
    """The "w/o SP" ablation of Table 3: the renderer gets the segmented texture only (no shape map)."""

    default_conf = {**PaintNet.default_conf, "use_shape_predictor": False}


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
