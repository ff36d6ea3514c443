"""Generation metrics of PaintNet's Tables 2-3 (RMSE, SSIM, an Inception-Score-style score) and garment mIoU.

Scale: images are (B, 3, H, W) floats in [0, 1] and RMSE is reported on that scale. The paper's Table 2
(RMSE 0.25-0.52, SSIM 0.25-0.91) cannot be on the 0..255 scale (an RMSE of 0.3 grey levels would be a
near-perfect copy), so it is on a unit range: [0, 1] or the [-1, 1] of a tanh generator (which doubles
RMSE). We use [0, 1], the scale of every image in this project; multiply by 2 to compare with a [-1, 1]
reading.

The Inception Score of the paper needs Inception-v3 ImageNet weights, which this project does not ship.
`inception_style_score` computes the same formula, exp(E_x KL(p(y|x) || p(y))), with the pretrained
EfficientNet-Lite0 ImageNet classifier, and is named for what it is: `IS_NAME`. Its values are not
comparable with Inception-v3 numbers, only with each other.

Example:
    >>> x = torch.rand(2, 3, 32, 32)
    >>> float(rmse(x, x)), round(float(ssim(x, x)), 4)
    (0.0, 1.0)
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch

IS_NAME = "IS (EfficientNet-Lite0 ImageNet classifier)"
ArrayLike = Union[torch.Tensor, np.ndarray]


def _check_pair(generated: torch.Tensor, target: torch.Tensor) -> None:
    for name, images in (("generated", generated), ("target", target)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a float tensor (B, C, H, W) in [0, 1], got {shape}")
    if generated.shape != target.shape:
        raise ValueError(
            f"generated {tuple(generated.shape)} and target {tuple(target.shape)} differ in shape; resize first"
        )


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def rmse(generated: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Root mean squared error per image on the [0, 1] scale, averaged over images by default.

    Args:
        generated: generated images in [0, 1].
        target: ground-truth images in [0, 1].
        reduction: "mean" (mean of the per-image RMSEs, as generation papers report) or "none".

    Shape:
        - generated, target: (B, C, H, W).
        - Output: () for "mean", (B,) for "none".

    Example:
        >>> rmse(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]))
        tensor(0.7071)
    """
    _check_pair(generated, target)
    per_image = (generated.float() - target.float()).pow(2).flatten(1).mean(dim=1).sqrt()
    return _reduce(per_image, reduction)


def ssim(generated: torch.Tensor, target: torch.Tensor, window_size: int = 11, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) via `kornia.metrics.ssim`, Gaussian window (sigma 1.5).

    The map is computed with padding "valid" (the window never leaves the image, as in the reference
    implementation and scikit-image), averaged over pixels and channels per image.

    Args:
        generated: images in [0, 1] (data range 1).
        target: images in [0, 1].
        window_size: odd Gaussian window size; the images must be at least this large.
        reduction: "mean" over images, or "none".

    Shape:
        - generated, target: (B, C, H, W) with H, W >= window_size.
        - Output: () for "mean", (B,) for "none".
    """
    import kornia

    _check_pair(generated, target)
    if min(generated.shape[-2:]) < window_size:
        raise ValueError(
            f"SSIM with window {window_size} needs images at least {window_size} px on a side, "
            f"got {tuple(generated.shape[-2:])}"
        )
    index_map = kornia.metrics.ssim(generated.float(), target.float(), window_size, max_val=1.0, padding="valid")
    return _reduce(index_map.flatten(1).mean(dim=1), reduction)


def inception_score_from_probabilities(probabilities: ArrayLike, splits: int = 10) -> Tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal chunks; returns (mean, std) over the chunks.

    p(y) is the marginal of each chunk, as in Salimans et al. (2016). The score lies in [1, K]: 1 when
    every image gets the same class distribution, K when the images are confidently and evenly spread
    over all K classes.

    Shape:
        - probabilities: (N, K), rows summing to 1, N >= splits.

    Example:
        >>> inception_score_from_probabilities(torch.eye(4), splits=1)
        (4.0, 0.0)
    """
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    if probabilities.ndim != 2 or len(probabilities) == 0:
        raise ValueError(f"probabilities must be (N, K) with N > 0, got {tuple(probabilities.shape)}")
    if not 1 <= splits <= len(probabilities):
        raise ValueError(
            f"splits must be in 1..N={len(probabilities)}, got {splits}: score more images or use fewer splits"
        )
    scores = []
    for chunk in torch.tensor_split(probabilities, splits):
        marginal = chunk.mean(dim=0, keepdim=True)
        # xlogy: 0 log 0 = 0, and the marginal is positive wherever a row is.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def inception_style_score(
    images: Union[torch.Tensor, Iterable[torch.Tensor]],
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    splits: int = 10,
    batch_size: int = 50,
    image_size: Tuple[int, int] = (224, 224),
) -> Tuple[float, float]:
    """The Inception-Score formula with an ImageNet classifier: `IS_NAME`, (mean, std) over `splits`.

    Args:
        images: (N, 3, H, W) in [0, 1], or an iterable of such batches (generated images).
        classifier: images (B, 3, h, w) in [0, 1] -> logits (B, K). Default: the pretrained
            EfficientNet-Lite0 ImageNet classifier (K = 1000), on CPU or the images' device.
        splits: chunks the score is averaged over (10 in the original).
        batch_size: classifier batch size when `images` is one tensor.
        image_size: images are resized (bilinear, antialiased) to this before the classifier.

    Returns:
        (mean, std) of the per-chunk scores, each in [1, K].
    """
    batches = torch.split(images, batch_size) if isinstance(images, torch.Tensor) else images
    probabilities = []
    for batch in batches:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected image batches (B, 3, H, W), got {tuple(batch.shape)}")
        if classifier is None:
            from retrieval.backbones import EfficientNetLite0

            classifier = EfficientNetLite0(pretrained=True).to(batch.device).eval().classify
        resized = torch.nn.functional.interpolate(
            batch.float(), size=image_size, mode="bilinear", align_corners=False, antialias=True
        )
        probabilities.append(torch.softmax(classifier(resized.clamp(0, 1)).double(), dim=1).cpu())
    if not probabilities:
        raise ValueError("inception_style_score needs at least one image")
    return inception_score_from_probabilities(torch.cat(probabilities), splits=splits)


def _as_bool_tensor(mask: ArrayLike) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    return mask if mask.dtype == torch.bool else mask > 0.5


class GarmentIoU:
    """Accumulates garment / background intersection and union over batches of binary masks.

    IoUs are computed from the counts summed over every pixel seen (the usual segmentation convention),
    and the per-image garment IoU is averaged beside it. An empty union (no garment in either mask)
    counts as full agreement (IoU 1).

    Example:
        >>> metric = GarmentIoU()
        >>> metric.update(torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 0, 0, 0]]))
        >>> {k: round(v, 4) for k, v in metric.compute().items()}
        {'iou_garment': 0.5, 'iou_background': 0.6667, 'miou': 0.5833, 'mean_image_iou_garment': 0.5, 'images': 1}
    """

    def __init__(self) -> None:
        self.intersection = np.zeros(2, dtype=np.int64)  # background, garment
        self.union = np.zeros(2, dtype=np.int64)
        self.image_ious: list = []

    def update(self, predicted: ArrayLike, target: ArrayLike) -> None:
        """Add a batch: boolean (or {0,1} / probability, thresholded at 0.5) masks of the same shape.

        Shape:
            - predicted, target: (B, ...) e.g. (B, 1, H, W) or (B, H, W); a single (H, W) mask is one image.
        """
        predicted, target = _as_bool_tensor(predicted), _as_bool_tensor(target)
        if predicted.shape != target.shape:
            raise ValueError(
                f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} masks differ in shape"
            )
        if predicted.ndim == 2:
            predicted, target = predicted[None], target[None]
        predicted, target = predicted.flatten(1), target.flatten(1)
        garment_inter = (predicted & target).sum(dim=1)
        garment_union = (predicted | target).sum(dim=1)
        background_inter = (~predicted & ~target).sum(dim=1)
        background_union = (~predicted | ~target).sum(dim=1)
        self.intersection += np.array([int(background_inter.sum()), int(garment_inter.sum())])
        self.union += np.array([int(background_union.sum()), int(garment_union.sum())])
        per_image = torch.where(garment_union > 0, garment_inter / garment_union.clamp_min(1), torch.ones(()))
        self.image_ious.extend(per_image.double().tolist())

    def compute(self) -> Dict[str, float]:
        """iou_garment, iou_background, miou (their mean), mean_image_iou_garment, images."""
        iou = np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), 1.0)
        return {
            "iou_garment": float(iou[1]),
            "iou_background": float(iou[0]),
            "miou": float(iou.mean()),
            "mean_image_iou_garment": float(np.mean(self.image_ious)) if self.image_ious else float("nan"),
            "images": len(self.image_ious),
        }


def garment_miou(predicted: ArrayLike, target: ArrayLike) -> Dict[str, float]:
    """Garment-vs-background IoUs of predicted masks against ground truth, in one call (see `GarmentIoU`).

    Shape:
        - predicted, target: (B, 1, H, W), (B, H, W) or (H, W), boolean or {0, 1}.

    Example:
        >>> garment_miou(torch.ones(1, 2, 2), torch.ones(1, 2, 2))["miou"]
        1.0
    """
    metric = GarmentIoU()
    metric.update(predicted, target)
    return metric.compute()
