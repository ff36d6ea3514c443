"""DELF-style attentive local features on a frozen EfficientNet-Lite0 (Noh et al., ICCV 2017).

Noh, Araujo, Sim, Weyand & Han, "Large-Scale Image Retrieval with Attentive Deep Local Features":
dense features of an intermediate CNN block are the local descriptors; a small attention network
scores every location, and only the highest-scoring locations become keypoints. The attention is
learned from image labels alone: the attention-weighted mean of the (L2-normalised) features feeds
a classifier trained with cross-entropy, so locations that help to recognise the label get high
scores and clutter gets low ones.

Here the labels are the product ids of the training pairs, and both photos of a pair (the flat
product photo and the person wearing it) carry the same label, so the attention learns which
locations identify a garment *across* the two domains (the garment, not the face, hair, trousers
or background of the person photo). With only two photos per label, the paper's free linear
classifier memorises the labels and stops teaching the attention; by default its weights are
therefore the batch's product photos pooled by the same attention (`paired_attention_loss`; the
paper's loss stays available, see `DELF.train_on`). The backbone stays frozen: training runs on
block features cached once per run, which makes it a few minutes on a CPU.

Extraction: an image pyramid (``scales``), block features and attention at every scale, the
``max_keypoints`` locations with the highest attention over all scales; keypoints are the centres
of the receptive fields in input pixels, descriptors the L2-normalised features reduced to
``pca_dim`` (40) by PCA and L2-normalised again (both as in the paper). The global vector for the
FAISS stage is VLAD over the 40-d descriptors (``retrieval.aggregation``), optionally
PCA-whitened; the local features serve spatial re-ranking (``retrieval.rerank``).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.aggregation import fit_codebook, vlad
from retrieval.backbones import LITE0_STAGES, LITE_MEAN, LITE_STD, EfficientNetLite0
from retrieval.descriptors.base import DESCRIPTORS, Descriptor, NotFittedError, check_images
from retrieval.io import read_checked_bytes, write_checked_bytes
from retrieval.types import InputSpec, LocalFeatures
from retrieval.vlad_fitting import pad_features
from retrieval.whitening import apply_pca_whitening, fit_pca_whitening

log = logging.getLogger("street2shop.retrieval")

# softplus(SOFTPLUS_ONE) == 1: the untrained attention weighs every location 1 (plain mean pooling).
SOFTPLUS_ONE = math.log(math.expm1(1.0))
# Training defaults (loss "paired"). A run over the VITON training split (~3,600 pairs, ~7,300
# images) is mostly the one-off caching of the frozen block features (~5-10 minutes on 2 CPU
# cores); an epoch over the cached features then takes seconds. On a VITON validation subset the
# paired loss reached its retrieval quality within 1-3 epochs and stayed there (10 epochs: same
# within noise); 5 is a margin, not a tuned optimum.
DEFAULT_LOSS = "paired"
DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32  # pairs, i.e. 64 images
DEFAULT_LR = 1e-3
# Inverse temperature of the paired loss's cosine logits.
PAIRED_LOGIT_SCALE = 16.0
TRAINING_LOSSES = ("paired", "classifier")
CACHE_PAIRS_PER_CHUNK = 64
# With a time budget, caching stops after this share of it so that training gets the rest.
CACHE_BUDGET_SHARE = 0.5
# The state `train_on` learns (and final.pt holds); the rest is the frozen backbone or comes from `fit`.
TRAINED_PREFIXES = ("attention.",)


def endpoint_geometry(endpoint: str) -> Tuple[int, int]:
    """Channels and total stride of an EfficientNet-Lite0 block endpoint ("block0" .. "block15").

    Example:
        >>> endpoint_geometry("block10")
        (112, 16)
    """
    blocks = []
    stride = 2  # the stem convolution
    for _, _, stage_stride, _, out_channels, repeats in LITE0_STAGES:
        for repeat in range(repeats):
            stride *= stage_stride if repeat == 0 else 1
            blocks.append((out_channels, stride))
    names = [f"block{i}" for i in range(len(blocks))]
    if endpoint not in names:
        raise ValueError(
            f"DELF needs a block endpoint of EfficientNet-Lite0 ('block0'..'block{len(blocks) - 1}'), got {endpoint!r}"
        )
    return blocks[names.index(endpoint)]


def receptive_field_centres(
    feature_size: Tuple[int, int], stride: int, scaled_size: Tuple[int, int], image_size: Tuple[int, int]
) -> torch.Tensor:
    """Receptive-field centres of a feature map's cells, in pixels of the unscaled input image.

    Every strided convolution of EfficientNet pads by kernel // 2, so output cell ``i`` is centred
    on input pixel ``stride * i`` of the (rescaled) image the network saw. That pixel is mapped back
    to the original image with the half-pixel convention of ``F.interpolate(align_corners=False)``
    (pixel centres at integer coordinates, as OpenCV keypoints), then clamped into the image.

    Args:
        feature_size: (h, w) of the feature map.
        stride: total stride of the endpoint (16 for block10).
        scaled_size: (H_s, W_s) of the rescaled image fed to the network.
        image_size: (H, W) of the original image.

    Returns:
        xy coordinates in raster order of the feature cells.

    Shape:
        - output: (h * w, 2)

    Example:
        >>> receptive_field_centres((2, 2), 16, (32, 32), (32, 32))
        tensor([[ 0.,  0.],
                [16.,  0.],
                [ 0., 16.],
                [16., 16.]])
    """
    (h, w), (scaled_h, scaled_w), (image_h, image_w) = feature_size, scaled_size, image_size
    ys = (torch.arange(h, dtype=torch.float32) * stride + 0.5) * (image_h / scaled_h) - 0.5
    xs = (torch.arange(w, dtype=torch.float32) * stride + 0.5) * (image_w / scaled_w) - 0.5
    grid_y, grid_x = torch.meshgrid(ys.clamp(0, image_h - 1), xs.clamp(0, image_w - 1), indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def attention_pool(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """DELF's training pooling: mean over locations of attention times the L2-normalised feature.

    Shape:
        - features: (B, C, h, w)
        - attention: (B, 1, h, w), non-negative
        - output: (B, C)

    Example:
        >>> features = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])  # two locations, C = 2
        >>> attention_pool(features, torch.tensor([[[[1.0, 2.0]]]]))
        tensor([[1.3000, 0.4000]])
    """
    return (F.normalize(features, dim=1) * attention).mean(dim=(2, 3))


class AttentionNetwork(nn.Module):
    """Two 1x1 convolutions with a ReLU between and a softplus on top: one score >= 0 per location.

    The last convolution starts at zero weight and a bias with softplus(bias) = 1, so an untrained
    network weighs every location equally (mean pooling, all keypoints tied) rather than by noise.

    Shape:
        - Input: (B, C, h, w) block features
        - Output: (B, 1, h, w) attention scores

    Example:
        >>> net = AttentionNetwork(112, 32)
        >>> torch.allclose(net(torch.rand(2, 112, 4, 3)), torch.ones(2, 1, 4, 3))
        True
    """

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.constant_(self.conv2.bias, SOFTPLUS_ONE)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.conv1(features))))


def paired_attention_loss(
    attention: nn.Module,
    product_features: torch.Tensor,
    person_features: torch.Tensor,
    scale: float = PAIRED_LOGIT_SCALE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DELF's image-level loss with the classifier's weights tied to the batch's product photos.

    Each person photo is classified over the B product ids of the batch, the weight vector of
    product j being the attention-pooled feature of its own photo (and symmetrically each product
    photo over the B persons); logits are scaled cosines, the loss the mean cross-entropy of both
    directions. It is `attention_classification_loss` with a classifier that cannot memorise: with
    two images per product id, a free linear classifier learns each id from those two images alone
    and then no longer needs the attention to find the garment (see `DELF.train_on`).

    Shape:
        - product_features, person_features: (B, C, h, w), row i of both = pair i
        - output: (scalar loss, scalar accuracy of the person -> product direction)
    """
    products = F.normalize(attention_pool(product_features, attention(product_features)), dim=1)
    persons = F.normalize(attention_pool(person_features, attention(person_features)), dim=1)
    logits = scale * persons @ products.T  # (B persons, B products)
    targets = torch.arange(len(logits), device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy


def attention_classification_loss(
    attention: nn.Module, classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the classifier on attention-pooled features; also the batch accuracy.

    Shape:
        - features: (B, C, h, w) frozen block features
        - labels: (B,) class indices
        - output: (scalar loss, scalar accuracy)
    """
    logits = classifier(attention_pool(features, attention(features)))
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


@DESCRIPTORS.register("delf")
class DELF(Descriptor):
    """DELF-style attentive local features (frozen EfficientNet-Lite0 block + trained attention), VLAD.

    Config (``default_conf``):
        image_size: (H, W) the loader resizes to (the pyramid scales are relative to it).
        endpoint: backbone block whose output are the dense features ("block10": 112 channels, stride 16).
        scales: image pyramid; each scale runs the backbone once (cost grows with the sum of squares).
        max_keypoints: keypoints kept per image, the highest attention over all scales.
        attention_hidden: channels of the attention network's hidden layer (512 in the paper, whose
            features have 1024 channels; 128 for our 112 keeps the CPU training a few minutes).
        pca_dim: dimension of the local descriptors after PCA (40 in the paper).
        n_clusters: VLAD codebook size; the raw VLAD has n_clusters * pca_dim dimensions.
        whiten_dim: PCA-whitening of the VLAD vector to this many dimensions, or None.
        fit_descriptors_per_image: descriptors per training image that train PCA and k-means.
        max_fit_descriptors: at most this many descriptors train PCA and the k-means.
        kmeans_iterations, seed: of the codebook (and the fit subsampling).
        pretrained: load the ImageNet weights of the backbone (False only for tests of shapes).

    `fit` learns the PCA of the local descriptors, the codebook (and the whitening). The attention
    comes from `train_on`; untrained, every location scores 1 and the keypoints are the
    ``max_keypoints`` locations with the largest feature norm.

    Shape:
        - extract: (B, 3, H, W) -> LocalFeatures with desc (B, N, pca_dim), N <= max_keypoints
        - embed: (B, 3, H, W) -> (B, dim), dim = whiten_dim or n_clusters * pca_dim

    Example:
        >>> delf = DELF(pretrained=False, n_clusters=8, whiten_dim=None)
        >>> delf.dim
        320
    """

    kind = "local"
    trainable = True
    needs_fit = True
    default_conf: Dict[str, Any] = {
        "image_size": (256, 192),
        "endpoint": "block10",
        "scales": (0.7, 1.0, 1.4),
        "max_keypoints": 200,
        "attention_hidden": 128,
        "pca_dim": 40,
        "n_clusters": 128,
        "whiten_dim": None,
        "fit_descriptors_per_image": 100,
        "max_fit_descriptors": 200_000,
        "kmeans_iterations": 20,
        "seed": 0,
        "pretrained": True,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.channels, self.stride = endpoint_geometry(str(self.conf["endpoint"]))
        scales = tuple(float(s) for s in self.conf["scales"])
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive factors, got {self.conf['scales']}")
        pca_dim, n_clusters = int(self.conf["pca_dim"]), int(self.conf["n_clusters"])
        if not 1 <= pca_dim <= self.channels:
            raise ValueError(
                f"pca_dim must be in [1, {self.channels}] (channels of {self.conf['endpoint']}), got {pca_dim}"
            )
        if n_clusters < 1 or int(self.conf["max_keypoints"]) < 1:
            raise ValueError(f"n_clusters and max_keypoints must be >= 1, got conf {self.conf}")
        whiten_dim = self.conf["whiten_dim"]
        if whiten_dim is not None and not 1 <= int(whiten_dim) <= n_clusters * pca_dim:
            raise ValueError(f"whiten_dim must be None or in [1, {n_clusters * pca_dim}], got {whiten_dim}")
        self.backbone = EfficientNetLite0(pretrained=bool(self.conf["pretrained"])).eval()
        self.attention = AttentionNetwork(self.channels, int(self.conf["attention_hidden"]))
        self.register_buffer("pca_mean", torch.zeros(self.channels))
        self.register_buffer("pca_projection", torch.zeros(self.channels, pca_dim))
        self.register_buffer("centroids", torch.zeros(n_clusters, pca_dim))
        if whiten_dim is not None:
            self.register_buffer("vlad_mean", torch.zeros(n_clusters * pca_dim))
            self.register_buffer("vlad_projection", torch.zeros(n_clusters * pca_dim, int(whiten_dim)))

    # ---- contract -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        whiten_dim = self.conf["whiten_dim"]
        return int(whiten_dim) if whiten_dim is not None else int(self.conf["n_clusters"]) * int(self.conf["pca_dim"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), mean=LITE_MEAN, std=LITE_STD)

    def block_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/stride, W/stride) frozen backbone features of the endpoint."""
        endpoint = str(self.conf["endpoint"])
        with torch.no_grad():
            return self.backbone.features(images, (endpoint,))[endpoint].contiguous()

    @torch.no_grad()
    def detect_and_describe(self, images: torch.Tensor) -> LocalFeatures:
        """Pyramid features and attention -> the top ``max_keypoints`` locations, raw descriptors.

        The descriptors are the L2-normalised block features (C dims, before PCA); `extract` adds
        the PCA. Ties in attention (the untrained network) go to the larger feature norm.

        Returns:
            LocalFeatures: keypoints xy in pixels of ``images``, scores = attention, scales = the
            size of a feature cell in input pixels (stride / pyramid scale), desc (B, N, C).
        """
        check_images(images)
        batch, _, height, width = images.shape
        keypoints, desc, scores, norms, cell_sizes = [], [], [], [], []
        for scale in self.conf["scales"]:
            scaled = (max(1, round(height * float(scale))), max(1, round(width * float(scale))))
            pyramid_level = (
                images
                if scaled == (height, width)
                else F.interpolate(
                    images, size=scaled, mode="bilinear", align_corners=False, antialias=float(scale) < 1.0
                )
            )
            features = self.block_features(pyramid_level)
            attention = self.attention(features)
            h, w = features.shape[-2:]
            centres = receptive_field_centres((h, w), self.stride, scaled, (height, width)).to(images.device)
            keypoints.append(centres.expand(batch, -1, -1))
            desc.append(F.normalize(features, dim=1).flatten(2).transpose(1, 2))
            scores.append(attention.flatten(1))
            norms.append(features.norm(dim=1).flatten(1))
            cell_sizes.append(torch.full((batch, h * w), self.stride / float(scale), device=images.device))
        keypoints, desc = torch.cat(keypoints, dim=1), torch.cat(desc, dim=1)
        scores, cell_sizes = torch.cat(scores, dim=1), torch.cat(cell_sizes, dim=1)
        # Highest attention first; ties (every location of the untrained, uniform attention) go to
        # the larger feature norm, the usual unsupervised saliency, rather than to pyramid order.
        by_norm = torch.sort(torch.cat(norms, dim=1), dim=1, descending=True, stable=True).indices
        by_attention = torch.sort(scores.gather(1, by_norm), dim=1, descending=True, stable=True).indices
        keep = by_norm.gather(1, by_attention)[:, : int(self.conf["max_keypoints"])]
        return LocalFeatures(
            keypoints=keypoints.gather(1, keep[..., None].expand(-1, -1, 2)),
            desc=desc.gather(1, keep[..., None].expand(-1, -1, desc.shape[-1])).float(),
            scores=scores.gather(1, keep),
            mask=torch.ones_like(keep, dtype=torch.bool),
            scales=cell_sizes.gather(1, keep),
            image_size=(int(height), int(width)),
        )

    def reduce(self, desc: torch.Tensor) -> torch.Tensor:
        """Raw L2-normalised descriptors -> PCA to ``pca_dim`` -> L2 (what `extract` returns).

        Shape:
            - desc: (..., C)
            - output: (..., pca_dim)
        """
        flat = desc.reshape(-1, desc.shape[-1])
        reduced = apply_pca_whitening(flat, self.pca_mean, self.pca_projection, power_norm=False)
        return reduced.reshape(*desc.shape[:-1], -1)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> LocalFeatures:
        """Attentive keypoints with ``pca_dim``-d unit descriptors (needs `fit`, which learns the PCA).

        Shape:
            - images: (B, 3, H, W) float RGB in [0, 1]
            - desc: (B, N, pca_dim), keypoints (B, N, 2), scores/scales/mask (B, N), N <= max_keypoints
        """
        if not self.fitted:
            raise NotFittedError(
                f"descriptor {self.name!r} must be fitted first: `fit` learns the PCA of its local descriptors"
            )
        raw = self.detect_and_describe(images)
        raw.desc = self.reduce(raw.desc)
        return raw

    def _vlad(self, desc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vectors = vlad(desc.float(), mask, self.centroids)
        if self.conf["whiten_dim"] is not None:
            vectors = apply_pca_whitening(vectors, self.vlad_mean, self.vlad_projection)
        return vectors

    @torch.no_grad()
    def aggregate(self, features: LocalFeatures) -> torch.Tensor:
        """VLAD of the reduced descriptors (intra-norm, signed sqrt, L2), then the whitening if configured.

        Shape:
            - features.desc: (B, N, pca_dim)
            - output: (B, dim)
        """
        return self._vlad(features.desc, features.mask)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> "DELF":
        """Learn the descriptor PCA, the VLAD codebook (and whitening) from training images, in one pass.

        The PCA and the k-means see a seeded subset of ``fit_descriptors_per_image`` keypoints per
        image; the VLAD whitening is learned from the VLADs of all kept keypoints, which are held in
        memory as float16 (about n_images * max_keypoints * C * 2 bytes: 67 MB for 1,000 images).

        Raises:
            ValueError: no images, or fewer descriptors than PCA or k-means need.
        """
        rng = np.random.default_rng(int(self.conf["seed"]))
        per_image_cap = int(self.conf["fit_descriptors_per_image"])
        whiten = self.conf["whiten_dim"] is not None
        sampled: List[np.ndarray] = []
        every_keypoint: List[np.ndarray] = []
        for images in batches:
            raw = self.detect_and_describe(images)
            for image_desc, image_mask in zip(raw.desc.cpu().numpy(), raw.mask.cpu().numpy()):
                real = image_desc[image_mask]
                if whiten:
                    every_keypoint.append(real.astype(np.float16))
                if len(real) > per_image_cap:
                    real = real[rng.choice(len(real), size=per_image_cap, replace=False)]
                sampled.append(real)
        if not sampled:
            raise ValueError(f"{self.name}.fit got no training images")
        training = np.concatenate(sampled)
        if len(training) > int(self.conf["max_fit_descriptors"]):
            training = training[rng.choice(len(training), size=int(self.conf["max_fit_descriptors"]), replace=False)]
        if len(training) <= int(self.conf["pca_dim"]):
            raise ValueError(
                f"{self.name}.fit needs more than pca_dim={self.conf['pca_dim']} descriptors, got {len(training)}"
            )
        # Plain PCA (power 0: rotation, no whitening), as DELF: it keeps the descriptors' geometry.
        mean, projection = fit_pca_whitening(training, int(self.conf["pca_dim"]), power=0.0)
        self.pca_mean.copy_(torch.from_numpy(mean))
        self.pca_projection.copy_(torch.from_numpy(projection))
        reduced = self.reduce(torch.from_numpy(training).to(self.pca_mean)).cpu().numpy()
        centroids = fit_codebook(
            reduced,
            n_clusters=int(self.conf["n_clusters"]),
            seed=int(self.conf["seed"]),
            max_points=int(self.conf["max_fit_descriptors"]),
            n_iterations=int(self.conf["kmeans_iterations"]),
        )
        self.centroids.copy_(torch.from_numpy(centroids))
        if whiten:
            vectors = []
            for start in range(0, len(every_keypoint), 256):
                desc, mask = pad_features(every_keypoint[start : start + 256], self.channels)
                reduced = self.reduce(torch.from_numpy(desc).to(self.pca_mean))
                vectors.append(
                    vlad(reduced, torch.from_numpy(mask).to(self.pca_mean.device), self.centroids).cpu().numpy()
                )
            mean, projection = fit_pca_whitening(np.concatenate(vectors), int(self.conf["whiten_dim"]))
            self.vlad_mean.copy_(torch.from_numpy(mean))
            self.vlad_projection.copy_(torch.from_numpy(projection))
        self._fitted.fill_(True)
        return self

    # ---- training ---------------------------------------------------------------------------
    def train_on(
        self,
        dataset,
        out_dir,
        *,
        seed: int = 0,
        progress: bool = True,
        time_budget_s: Optional[float] = None,
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        lr: Optional[float] = None,
        loss: str = DEFAULT_LOSS,
        weight_decay: float = 1e-4,
        cache_batch_size: int = 32,
    ) -> Path:
        """Train the attention on the training pairs' product ids; return final.pt.

        Both photos of a pair share the label of its product. Two image-level losses, both
        attention-pooled features -> classifier over product ids -> cross-entropy:

        - "paired" (default, `paired_attention_loss`): the classifier's weights are the batch's
          product photos, pooled by the same attention.
        - "classifier" (the paper's, `attention_classification_loss`): a free linear classifier
          over all training product ids. Measured on the first 300 products of the VITON
          validation split (VLAD, mAP@20): it peaked after 1-2 epochs (0.58-0.60) and then fell
          to 0.27-0.35 as the classifier memorised the two images of each id (loss 8.2 -> 0.5 at
          lr 1e-2), and wandered between 0.46 and 0.62 at lr 1e-3; "paired" stayed at 0.64-0.69
          over 1-10 epochs. Untrained: 0.16.

        ``batch_size`` counts pairs (both photos of each go into the batch). The frozen block features of every
        training image (at scale 1) are cached once under ``out_dir/block-features/`` (float16,
        about 43 KB per 256x192 image), in chunks of pairs in a seeded order, so an interrupted run
        resumes its caching as well as its training. With a time budget, caching stops after
        half of it and training uses the pairs cached so far (a warning says how many).

        final.pt holds the attention only: use it as ``delf@OUT/final.pt``, which is then fitted
        (PCA, codebook) like the untrained one.
        """
        from retrieval.training import TrainingRun

        if dataset.train is None or dataset.train.empty:
            raise ValueError(f"{dataset.name} has no training pairs to train {self.name} on")
        pairs = dataset.train.sort_values("pair_id").reset_index(drop=True)
        products = sorted(pairs["product_id"].astype(str).unique())
        labels = pairs["product_id"].astype(str).map({p: i for i, p in enumerate(products)}).to_numpy()
        if loss not in TRAINING_LOSSES:
            raise ValueError(f"unknown DELF training loss {loss!r}; valid: {', '.join(TRAINING_LOSSES)}")
        epochs = int(epochs if epochs is not None else DEFAULT_EPOCHS)
        batch_size = int(batch_size if batch_size is not None else DEFAULT_BATCH_SIZE)
        lr = float(lr if lr is not None else DEFAULT_LR)
        modules: Dict[str, nn.Module] = {"attention": self.attention}
        if loss == "classifier":
            modules["classifier"] = nn.Linear(self.channels, len(products)).to(self.device)
        parameters = [p for module in modules.values() for p in module.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
        config = {
            "descriptor": self.name,
            "descriptor_config": self.config(),
            "dataset": dataset.name,
            "pairs": len(pairs),
            "products": len(products),
            "loss": loss,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
        }
        run = TrainingRun(
            out_dir,
            modules,
            {"adam": optimiser},
            config,
            seed=seed,
            time_budget_s=time_budget_s,
            progress=f"train {self.name}" if progress else None,
        )
        self.backbone.eval()
        product_maps, person_maps, targets = self._cached_training_features(
            pairs, labels, Path(out_dir) / "block-features", run, seed, cache_batch_size, progress
        )
        n_pairs = len(targets)
        for epoch in run.epochs(epochs):
            order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            for batch in run.skip_done(order[i : i + batch_size] for i in range(0, n_pairs, batch_size)):
                products_batch = product_maps[batch].to(self.device, torch.float32)
                persons_batch = person_maps[batch].to(self.device, torch.float32)
                if loss == "paired":
                    value, accuracy = paired_attention_loss(self.attention, products_batch, persons_batch)
                else:
                    value, accuracy = attention_classification_loss(
                        self.attention,
                        modules["classifier"],
                        torch.cat([products_batch, persons_batch]),
                        targets[batch].repeat(2).to(self.device),
                    )
                optimiser.zero_grad(set_to_none=True)
                value.backward()
                optimiser.step()
                run.log({"loss": value.item(), "accuracy": accuracy.item()})
                if run.out_of_time:
                    break
        weights = {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
        return run.finish(weights=weights, extra={"descriptor": self.name})

    def load_trained(self, checkpoint) -> "DELF":
        """Load the attention of a final.pt written by `train_on` (strict for the attention's keys).

        Only the attention is trained, so final.pt holds only it: the fit (PCA, codebook, whitening)
        happens afterwards and may use any ``pca_dim``/``n_clusters``/``whiten_dim``.
        """
        from retrieval.training import load_trained_weights

        not_trained = tuple(k for k in self.state_dict() if not k.startswith(TRAINED_PREFIXES))
        load_trained_weights(
            self, checkpoint, kind="descriptor", name=self.name, conf=self.conf, shipped_prefixes=not_trained
        )
        return self

    def _cached_training_features(
        self, pairs, labels: np.ndarray, cache_dir: Path, run, seed: int, batch_size: int, progress: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block features (float16) of the training pairs' two photos, cached in chunks of pairs.

        A chunk file holds the product photos of its pairs, then their person photos, in the same
        order, and the labels likewise (twice).

        Returns:
            (product maps (P, C, h, w), person maps (P, C, h, w), labels (P,) int64) for the P
            pairs cached so far; row i of all three is pair i.
        """
        from retrieval.batching import iter_batches

        cache_dir.mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng(seed).permutation(len(pairs))
        chunks = [order[i : i + CACHE_PAIRS_PER_CHUNK] for i in range(0, len(order), CACHE_PAIRS_PER_CHUNK)]
        size = tuple(self.conf["image_size"])
        budget = run.time_budget_s
        product_maps: List[np.ndarray] = []
        person_maps: List[np.ndarray] = []
        targets: List[np.ndarray] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(chunks), desc=f"cache {self.conf['endpoint']} features", unit="chunk", leave=False)

        def compute(chunk) -> Tuple[np.ndarray, np.ndarray]:
            """Block maps (2n, C, h, w) float16 of the chunk's products then persons, and their labels."""
            paths = list(pairs["product_image"].iloc[chunk]) + list(pairs["person_image"].iloc[chunk])
            maps = [
                self.block_features(images.to(self.device)).cpu().half()
                for images in iter_batches(paths, size, batch_size)
            ]
            return torch.cat(maps).numpy(), np.concatenate([labels[chunk], labels[chunk]])

        for number, chunk in enumerate(chunks):
            path = cache_dir / f"chunk-{number:05d}.npz"
            maps = None
            if path.exists():
                try:
                    with np.load(io.BytesIO(read_checked_bytes(path))) as stored:
                        maps, chunk_labels = stored["features"], stored["labels"]
                except (ValueError, OSError) as error:  # damaged, or written before checksums: recompute
                    log.warning("training maps %s are unusable (%s): recomputing them", path, error)
            elif targets and budget is not None and run.elapsed > CACHE_BUDGET_SHARE * budget:
                log.warning(
                    "time budget: training %s on the %d of %d pairs cached so far",
                    self.name,
                    sum(len(t) for t in targets),
                    len(pairs),
                )
                break
            if maps is None:
                maps, chunk_labels = compute(chunk)
                _save_npz_atomic(path, features=maps, labels=chunk_labels)
            n = len(chunk_labels) // 2
            product_maps.append(maps[:n])
            person_maps.append(maps[n:])
            targets.append(chunk_labels[:n])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return (
            torch.from_numpy(np.concatenate(product_maps)),
            torch.from_numpy(np.concatenate(person_maps)),
            torch.from_numpy(np.concatenate(targets)).long(),
        )


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_checked_bytes(path, buffer.getvalue())
