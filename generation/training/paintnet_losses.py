"""The texture renderer's losses and its optimisation step (PaintNet, Sec. 3.2.2, eq. 7-13).

Only training uses these: the proxy (`generation.paintnet`) runs the renderer alone. The choices (the
non-saturating log-loss, D_rv's three-way draw, EfficientNet-Lite0 standing in for VGG-19 in the
perceptual loss) are explained in `generation.paintnet`'s docstring.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import discriminator_loss, from_gan_range, generator_loss, set_requires_grad, uint8_to_gan
from generation.paintnet_networks import ConvDiscriminator, RelevanceDiscriminator, TextureRenderer, shape_to_input
from retrieval.backbones import EfficientNetLite0

#: Lite0 layers standing in for VGG-19's relu4_3 (features) and relu3_3 + relu4_3 (style).
PERCEPTUAL_FEATURE_LAYERS = ("block10",)
PERCEPTUAL_STYLE_LAYERS = ("block4", "block10")


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


# --------------------------------------------------------------------------------------------------
# One renderer training step (pure with respect to the data: tests call it directly)
# --------------------------------------------------------------------------------------------------


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
