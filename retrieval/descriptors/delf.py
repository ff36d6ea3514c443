"""DELF-style attentive local features on a frozen EfficientNet-Lite0 or Lite2 (Noh et al., ICCV 2017).

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
therefore the batch's product photos pooled by the same attention (the paper's loss stays
available; the training is `retrieval.training.delf`). The backbone stays frozen: training runs on
block features cached once per run, which makes it a few minutes on a CPU.

Extraction: an image pyramid (``scales``), block features and attention at every scale, the
``max_keypoints`` locations with the highest attention over all scales; keypoints are the centres
of the receptive fields in input pixels, descriptors the L2-normalised features reduced to
``pca_dim`` (40) by PCA and L2-normalised again (both as in the paper). The global vector for the
FAISS stage is VLAD over the 40-d descriptors (``retrieval.aggregation``), optionally
PCA-whitened; the local features serve spatial re-ranking (``retrieval.rerank``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.aggregation import fit_codebook, vlad
from retrieval.backbones import LITE_MEAN, LITE_STD, EfficientNetLite, block_geometry
from retrieval.descriptors.base import DESCRIPTORS, Descriptor, NotFittedError, check_images
from retrieval.types import InputSpec, LocalFeatures
from retrieval.vlad_fitting import kmeans_options, pad_features
from retrieval.whitening import apply_pca_whitening, fit_pca_whitening, whitened_vlad

# softplus(SOFTPLUS_ONE) == 1: the untrained attention weighs every location 1 (plain mean pooling).
SOFTPLUS_ONE = math.log(math.expm1(1.0))
# The state `train_on` learns (and final.pt holds); the rest is the frozen backbone or comes from `fit`.
TRAINED_PREFIXES = ("attention.",)
# Options that shape the trained attention: a final.pt loads only into the same ones (and records them).
DELF_ARCHITECTURE_KEYS = ("backbone", "endpoint", "attention_hidden")


def endpoint_geometry(endpoint: str, backbone: str = "lite0") -> Tuple[int, int]:
    """Channels and total stride of a block endpoint of an EfficientNet-Lite backbone ("block0" ..).

    Example:
        >>> endpoint_geometry("block10"), endpoint_geometry("block14", "lite2")
        ((112, 16), (120, 16))
    """
    blocks = block_geometry(backbone)
    names = [f"block{i}" for i in range(len(blocks))]
    if endpoint not in names:
        raise ValueError(
            f"DELF needs a block endpoint of EfficientNet-{backbone.capitalize()} "
            f"('block0'..'block{len(blocks) - 1}'), got {endpoint!r}"
        )
    return blocks[names.index(endpoint)]


def default_endpoint(backbone: str) -> str:
    """The last block at stride 16 ("block10" of Lite0, "block14" of Lite2): the paper's conv4 of ResNet-50.

    Example:
        >>> default_endpoint("lite0"), default_endpoint("lite2")
        ('block10', 'block14')
    """
    last = max(i for i, (_, stride) in enumerate(block_geometry(backbone)) if stride == 16)
    return f"block{last}"


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


@DESCRIPTORS.register("delf")
class DELF(Descriptor):
    """DELF-style attentive local features (frozen EfficientNet-Lite block + trained attention), VLAD.

    Config (``default_conf``):
        image_size: (H, W) the loader resizes to (the pyramid scales are relative to it).
        endpoint: backbone block whose output are the dense features; "auto" is `default_endpoint`
            (Lite0's "block10": 112 channels, Lite2's "block14": 120 channels, both stride 16), and the
            config keeps the block it resolved to.
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
        backbone: "lite0" or "lite2" (`retrieval.backbones.LITE_VARIANTS`).

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
        "endpoint": "auto",
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
        "backbone": "lite0",
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        backbone = str(self.conf["backbone"])
        if self.conf["endpoint"] == "auto":
            # Stored resolved: a default Lite0 DELF keeps the config (and fingerprint) it had with "block10".
            self.conf["endpoint"] = default_endpoint(backbone)
        self.channels, self.stride = endpoint_geometry(str(self.conf["endpoint"]), backbone)
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
        self.backbone = EfficientNetLite(backbone, pretrained=bool(self.conf["pretrained"])).eval()
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

    @torch.no_grad()
    def aggregate(self, features: LocalFeatures) -> torch.Tensor:
        """(B, N, pca_dim) reduced descriptors -> (B, dim): VLAD, then the whitening if configured (as sift's)."""
        whitening = (self.vlad_mean, self.vlad_projection) if self.conf["whiten_dim"] is not None else None
        return whitened_vlad(features.desc, features.mask, self.centroids, whitening)

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
        centroids = fit_codebook(reduced, **kmeans_options(self.conf))
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

    @classmethod
    def recorded_architecture(cls, checkpoint) -> Dict[str, Any]:
        from retrieval.training import load_checkpoint

        run_config = load_checkpoint(checkpoint, map_location="cpu").get("config") or {}
        recorded = run_config.get("descriptor_config") or {}
        return {key: recorded[key] for key in DELF_ARCHITECTURE_KEYS if key in recorded}

    def load_trained(self, checkpoint) -> "DELF":
        """Load the attention of a final.pt written by `train_on` (strict for the attention's keys).

        Only the attention is trained, so final.pt holds only it: the fit (PCA, codebook, whitening)
        happens afterwards and may use any ``pca_dim``/``n_clusters``/``whiten_dim``.
        """
        from retrieval.training import load_checkpoint, load_trained_weights

        run_config = load_checkpoint(checkpoint, map_location="cpu").get("config") or {}
        trained_conf = run_config.get("descriptor_config") or {}
        self.refuse_other_architecture(checkpoint, trained_conf, DELF_ARCHITECTURE_KEYS)
        not_trained = tuple(k for k in self.state_dict() if not k.startswith(TRAINED_PREFIXES))
        load_trained_weights(
            self, checkpoint, kind="descriptor", name=self.name, conf=self.conf, shipped_prefixes=not_trained
        )
        return self
