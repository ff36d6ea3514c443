"""L2-Net patch descriptors at DoG keypoints, trained here on synthetic homographies, VLAD-aggregated.

L2-Net (Tian, Fan & Wu, "L2-Net: Deep learning of discriminative patch descriptor in Euclidean
space", CVPR 2017) describes a 32x32 grey patch with seven 3x3/8x8 convolutions (32-32-64-64-128-
128-128 channels, BatchNorm without affine parameters, stride 2 at the third and fifth) and an
L2-normalised 128-d output. kornia has no `L2Net` class; its `HardNet` *is* this architecture
(HardNet, Mishchuk et al. NeurIPS 2017, kept L2-Net's network and changed the loss) plus a 0.3
dropout before the last convolution; L2-Net's optional central-surround second stream and its
final local response normalisation are not included. We build `kornia.feature.HardNet(pretrained=
False)`, so no weights are ever downloaded: the network starts from random initialisation and is
trained by `train_on` with HardNet's hardest-in-batch triplet loss on patch pairs cut from VITON
product photos and random homographies of them (`retrieval.patches`), and by default also with an
InfoNCE loss on product <-> worn-garment patch pairs (`garment_pairs_weight`, `garment_loss`: without
them the network matches patches far better yet retrieves worse than untrained); optionally end to
end through a soft-assignment VLAD of street photo against product (`vlad_weight`,
`retrieval.aggregation.soft_vlad`). The network trains in
bfloat16 autocast (`bfloat16`), about twice as fast on CPUs with AVX512-BF16.

Keypoints come from OpenCV's SIFT detector (difference of Gaussians, no learning), with its
position, size and orientation; each becomes a local affine frame (kornia convention) whose 32x32
patch is sampled from the scale pyramid. Descriptors are aggregated exactly like `sift`: VLAD
over a k-means codebook, raw by default, PCA-whitened with ``pca_dim`` (`retrieval.aggregation`,
`retrieval.whitening`). final.pt holds the networks only; the codebook is fitted afterwards.

`LearnedPatchDescriptor` holds everything but the detector, so `lfnet` (KeyNet + the same patch
network, trained jointly) shares the description, aggregation, fitting and training loop.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.feature import (
    HardNet,
    extract_patches_from_pyramid,
    get_laf_center,
    get_laf_orientation,
    get_laf_scale,
    laf_from_center_scale_ori,
)
from torch import nn

from retrieval.aggregation import fit_codebook, soft_vlad
from retrieval.descriptors.base import DESCRIPTORS, check_images
from retrieval.descriptors.sift import rgb_to_grey_uint8
from retrieval.descriptors.vlad_base import VLADDescriptor
from retrieval.garments import segmented_texture
from retrieval.patches import (
    PATCH_SIZE,
    garment_patch_pairs,
    hardnet_loss,
    homography_patch_pairs,
    info_nce_loss,
    load_garment_pair_batch,
    photometric_jitter,
    random_homographies,
    warp_images,
)
from retrieval.types import InputSpec, LocalFeatures
from retrieval.vlad_fitting import pad_features

PATCH_DESCRIPTOR_DIM = 128
GARMENT_LOSSES = ("hardnet", "infonce", "image")
VLAD_ANCHORS = ("photo", "cutout", "both")
# State-dict keys that `fit` sets (codebook, whitening, the fitted flag): never trained, never in final.pt.
FIT_STATE_PREFIXES = ("centroids", "pca_mean", "pca_projection", "_fitted")

# Settings every learned patch descriptor shares; subclasses add their detector's.
PATCH_DESCRIPTOR_CONF: Dict[str, Any] = {
    "image_size": (256, 192),
    "max_keypoints": 300,
    "upright": False,
    "n_clusters": 64,
    # Raw VLAD by default, as `sift`: PCA-whitening the 8192-d VLAD from ~1,000 training images
    # amplifies noise, and more so for trained networks. 300-product VITON val subset, mAP@20
    # none/hp: untrained 0.105/0.195 whitened to 256-d vs 0.201/0.299 raw; trained (homographies,
    # 255k pairs) 0.076/0.114 vs 0.198/0.230; trained on garment pairs (InfoNCE) 0.131/0.209 vs
    # 0.249/0.319. `pca_dim` still turns it on.
    "pca_dim": None,
    "fit_descriptors_per_image": 300,
    "max_fit_descriptors": 200_000,
    "kmeans_iterations": 20,
    "describe_chunk": 1024,
    "min_patch_contrast": 0.01,
    "seed": 0,
}


def choose_random_subset(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most `k` of the True entries of each row, chosen uniformly at random.

    Shape:
        - mask: (B, N) bool
        - output: (B, N) bool, each row a subset of the input row with min(k, row count) entries
    """
    if mask.shape[1] <= k:
        return mask.clone()
    keys = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(~mask, -1.0)
    chosen = torch.zeros_like(mask)
    chosen.scatter_(1, keys.topk(k, dim=1).indices, True)
    return chosen & mask


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. building networks) under torch's CPU RNG seeded by `seed`, restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, step): a resumed run draws the same homographies."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class SoftVLADHead(nn.Module):
    """Training-only NetVLAD layer: learnable centroids, a fixed assignment sharpness `alpha`.

    It exists only while training through the aggregation (``vlad_weight > 0``) and is checkpointed
    with the run; the descriptor's own codebook is refitted with hard k-means after training (`fit`).
    """

    def __init__(self, centroids: torch.Tensor, alpha: float):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @classmethod
    def from_descriptors(cls, desc: np.ndarray, n_clusters: int, seed: int) -> "SoftVLADHead":
        """k-means centroids of sampled descriptors; `alpha` makes the nearest centroid weigh 100 times
        the second nearest for the median descriptor (NetVLAD's initialisation, Sec. 3.1 of the paper).

        Shape:
            - desc: (M, D) unit rows, M >= n_clusters
        """
        centroids = torch.from_numpy(fit_codebook(desc, n_clusters, seed=seed))
        squared = torch.cdist(torch.from_numpy(np.ascontiguousarray(desc, np.float32)), centroids) ** 2
        nearest_two = squared.topk(2, dim=1, largest=False).values
        gap = float((nearest_two[:, 1] - nearest_two[:, 0]).median().clamp(min=1e-4))
        return cls(centroids, math.log(100.0) / gap)

    def forward(self, desc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_vlad(desc, mask, self.centroids, self.alpha)


class LearnedPatchDescriptor(VLADDescriptor):
    """Keypoint frames -> 32x32 patches -> HardNet/L2-Net network -> VLAD + PCA-whitening.

    Subclasses provide `detect` (frames per image) and may add detector training through
    `_training_modules` and `_training_loss`. The patch network is trained here, never downloaded,
    so its weights travel with the state dict (``shipped_state_prefixes = ()``).

    Shape:
        - embed input: (B, 3, H, W) float RGB in [0, 1]
        - embed output: (B, dim), dim = pca_dim or n_clusters * 128
    """

    trainable = True
    local_dim = PATCH_DESCRIPTOR_DIM
    shipped_state_prefixes = ()
    default_conf: Dict[str, Any] = PATCH_DESCRIPTOR_CONF
    # train_on options (not part of the model's conf or fingerprint); CLI flags override. On the
    # project's 2-core CPU a step of 8 photos (~150 pairs, 300 patches through the network forward
    # and backward, in bfloat16) took 1.3 s with another job running, so the default two epochs over
    # VITON's 3,639 training photos (910 steps) take about 20 minutes.
    train_defaults: Dict[str, Any] = {
        "epochs": 2,
        "batch_size": 8,
        "pairs_per_image": 24,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "margin": 1.0,
        "max_images": 4000,
        # Cross-domain pairs (`retrieval.patches.garment_patch_pairs`): each step also matches patches of
        # the product photos with the garment worn in their street photos; that loss (`garment_loss`) is
        # added with this weight (0: homographies of product photos only). On by default: trained on
        # homographies alone the network matches patches far better (held-out FPR95 0.070 -> 0.0004)
        # yet retrieves worse than untrained (300-product val subset, raw VLAD, mAP@20 none/hp
        # 0.198/0.230 against 0.201/0.299); with these defaults it retrieves better (full val split,
        # 0.157/0.191 against 0.120/0.180) and matches patches as the untrained one does (FPR95 0.066).
        "garment_pairs_weight": 1.0,
        "garment_pairs_per_image": 24,
        # "hardnet"/"infonce": patch to patch at the same box position; "image": the worn garment's patches,
        # averaged, against the product's, averaged (InfoNCE over the batch's garments; no positions needed)
        "garment_loss": "infonce",
        "garment_temperature": 0.1,
        # Weight of the homography patch loss (`_training_loss`); 0 leaves it out (and its cost).
        "homography_weight": 1.0,
        # End to end through the aggregation (`_vlad_loss`): the street photo's soft-assignment VLAD must pick
        # its own product's VLAD among the batch's products (InfoNCE), the objective retrieval is scored on.
        "vlad_weight": 0.0,
        "vlad_keypoints": 64,  # random subset of each image's keypoints per step (cost is linear in it)
        "vlad_anchors": "both",  # street side: "photo" (raw), "cutout" (garment on white, as hp), "both" (coin flip)
        "vlad_temperature": 0.1,
        "vlad_init_images": 64,  # training photos whose descriptors seed the codebook (k-means)
        # Forward and backward in bfloat16 (torch.autocast): about 2x faster on CPUs with AVX512-BF16 or AMX
        # (1.24 s against 2.34 s for 1,024 patches here), and on GPUs; the aggregation and losses stay float32.
        "bfloat16": True,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        if int(self.conf["n_clusters"]) < 1 or int(self.conf["max_keypoints"]) < 1:
            raise ValueError(f"n_clusters and max_keypoints must be >= 1, got conf {self.conf}")
        # L2-Net architecture (kornia calls it HardNet); random weights, never a download. Seeded, so
        # that the untrained descriptor is the same network in every process.
        with seeded(int(self.conf["seed"])):
            self.net = HardNet(pretrained=False)
        self._register_vlad_buffers()
        self._bfloat16_training = False  # set by train_on (its `bfloat16` option) while it runs

    # ---- contract -------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), grey=True)

    def detect(self, images: torch.Tensor, grey: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keypoint frames of every image: (lafs (B, N, 2, 3), scores (B, N), mask (B, N) bool)."""
        raise NotImplementedError

    def describe(self, grey: torch.Tensor, lafs: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """128-d patch descriptors at the real frames whose patch is not flat; zero rows elsewhere.

        A patch whose standard deviation is below ``min_patch_contrast`` (white backdrop) is
        dropped from the mask, as in training: the network standardises every patch, so a flat
        one would get a descriptor of amplified JPEG noise. Only the kept frames go through the
        network, in chunks of ``describe_chunk`` patches.

        Returns:
            (desc, mask): the descriptors and the input mask without the flat patches.

        Shape:
            - grey: (B, 1, H, W) in [0, 1]
            - lafs: (B, N, 2, 3), mask: (B, N)
            - output: ((B, N, 128), (B, N) bool)
        """
        batch, n_frames = mask.shape
        desc = grey.new_zeros(batch, n_frames, PATCH_DESCRIPTOR_DIM)
        if not bool(mask.any()):
            return desc, mask
        zero = torch.zeros((), dtype=lafs.dtype, device=lafs.device)
        patches = extract_patches_from_pyramid(grey, torch.where(mask[..., None, None], lafs, zero), PATCH_SIZE)
        mask = mask & (patches.flatten(2).std(dim=-1) >= float(self.conf["min_patch_contrast"]))
        if not bool(mask.any()):
            return desc, mask
        chunks = patches[mask].split(int(self.conf["describe_chunk"]))
        desc[mask] = torch.cat([self._net(chunk) for chunk in chunks])
        return desc, mask

    def _net(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch network, float32 out; in bfloat16 autocast while `train_on` runs with ``bfloat16``.

        Only the network: the losses, the aggregation and lfnet's detector geometry stay float32.

        Shape:
            - patches: (M, 1, 32, 32)
            - output: (M, 128)
        """
        with torch.autocast(device_type=patches.device.type, dtype=torch.bfloat16, enabled=self._bfloat16_training):
            return self.net(patches).float()

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> LocalFeatures:
        """Detect keypoint frames and describe their patches.

        Returns:
            LocalFeatures padded to the batch's largest keypoint count: keypoints xy in pixels,
            scales = half side of the described square in pixels, orientations in degrees [0, 360)
            in OpenCV's convention (as `sift`), scores = detector response, desc with unit L2 rows.
            An image without keypoints has an all-False mask row.

        Shape:
            - images: (B, 3, H, W) float RGB in [0, 1]
            - desc: (B, N, 128), keypoints (B, N, 2), scores/scales/orientations/mask (B, N)
        """
        check_images(images)
        grey = rgb_to_grayscale(images.clamp(0.0, 1.0))
        lafs, scores, mask = self.detect(images, grey)
        desc, mask = self.describe(grey, lafs, mask)
        # kornia's frame angle turns the other way from OpenCV's keypoint angle (see keypoints_to_lafs).
        kornia_degrees = get_laf_orientation(lafs)[..., 0]
        return LocalFeatures(
            keypoints=get_laf_center(lafs).contiguous(),
            desc=desc,
            scores=scores,
            mask=mask,
            scales=get_laf_scale(lafs)[..., 0, 0],
            orientations=torch.remainder(-kornia_degrees, 360.0).masked_fill(~mask, 0.0),
            image_size=(int(images.shape[2]), int(images.shape[3])),
        )

    # ---- training -------------------------------------------------------------------------
    def _training_modules(self) -> Dict[str, nn.Module]:
        """The modules `train_on` optimises and checkpoints."""
        return {"net": self.net}

    def _training_loss(
        self,
        grey_a: torch.Tensor,
        grey_b: torch.Tensor,
        homographies: torch.Tensor,
        generator: torch.Generator,
        options: Dict[str, Any],
    ) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """Loss of one batch of synthetic pairs; None when the batch holds fewer than 2 pairs."""
        raise NotImplementedError

    def _patch_pair_loss(
        self, pairs, options: Dict[str, Any], kind: str = "hardnet"
    ) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """Loss of a `PatchPairs` batch (kind: one of GARMENT_LOSSES, see train_defaults); None below 2 pairs."""
        if kind not in GARMENT_LOSSES:
            raise ValueError(f"garment_loss must be one of {GARMENT_LOSSES}, got {kind!r}")
        n_pairs = len(pairs.anchors)
        if n_pairs < 2 or (kind == "image" and len(pairs.image_index.unique()) < 2):
            return None, {"pairs": float(n_pairs)}
        # One forward pass for both views: one set of BatchNorm statistics, one large GEMM per layer.
        desc = self._net(torch.cat([pairs.anchors, pairs.positives]))
        if kind == "image":
            images, which = pairs.image_index.unique(return_inverse=True)
            pooled = [
                F.normalize(desc.new_zeros(len(images), desc.shape[1]).index_add_(0, which, half), dim=1)
                for half in (desc[:n_pairs], desc[n_pairs:])
            ]
            loss = info_nce_loss(pooled[0], pooled[1], float(options["garment_temperature"]))
        elif kind == "infonce":
            loss = info_nce_loss(desc[:n_pairs], desc[n_pairs:], float(options["garment_temperature"]), pairs.exclude)
        else:
            loss = hardnet_loss(desc[:n_pairs], desc[n_pairs:], float(options["margin"]), pairs.exclude)
        return loss, {"desc_loss": float(loss.detach()), "pairs": float(n_pairs)}

    def _vlad_anchors(self, worn: Dict[str, torch.Tensor], generator: torch.Generator, which: str) -> torch.Tensor:
        """The street side of each pair: the raw photo, its garment cut out on white (what the hp proxy
        serves, here from the ground-truth parse), or a seeded coin flip between the two per pair.

        Shape:
            - worn["person"], worn["garment_mask"]: (B, 1, H, W)
            - output: (B, 1, H, W) grey in [0, 1]
        """
        photos = worn["person"]
        if which == "photo":
            return photos
        size = tuple(photos.shape[-2:])
        cutouts = segmented_texture(photos.expand(-1, 3, -1, -1), worn["garment_mask"].to(photos.dtype), size=size)[
            :, :1
        ]
        if which == "cutout":
            return cutouts
        flips = (torch.rand(len(photos), generator=generator) < 0.5).to(photos.device)
        return torch.where(flips[:, None, None, None], cutouts, photos)

    def _keypoint_subset(
        self, grey: torch.Tensor, k: int, generator: torch.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The test-time detector's frames on `grey`, at most `k` per image (seeded random subset)."""
        with torch.no_grad():
            lafs, _, mask = self.detect(grey.expand(-1, 3, -1, -1), grey)
        return lafs, choose_random_subset(mask, k, generator)

    def _vlad_loss(
        self, worn: Dict[str, torch.Tensor], head: SoftVLADHead, generator: torch.Generator, options: Dict[str, Any]
    ) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """InfoNCE between the soft VLADs of the street side and of the products of a batch of pairs.

        Patches come from the test-time detector on whole images (background, face and all, as at
        query time), a random ``vlad_keypoints`` of each image's; both sides go through the network
        in one pass. None below two pairs.
        """
        anchors = self._vlad_anchors(worn, generator, str(options["vlad_anchors"]))
        n_pairs = len(anchors)
        if n_pairs < 2:
            return None, {}
        grey = torch.cat([anchors, worn["product"]])
        lafs, mask = self._keypoint_subset(grey, int(options["vlad_keypoints"]), generator)
        desc, mask = self.describe(grey, lafs, mask)
        vectors = head(desc, mask)
        loss = info_nce_loss(vectors[:n_pairs], vectors[n_pairs:], float(options["vlad_temperature"]))
        with torch.no_grad():
            similarity = vectors[:n_pairs] @ vectors[n_pairs:].T
            top1 = float((similarity.argmax(dim=1) == torch.arange(n_pairs, device=similarity.device)).float().mean())
        return loss, {"vlad_loss": float(loss.detach()), "vlad_top1": top1, "vlad_patches": float(mask.sum())}

    @torch.no_grad()
    def _initial_vlad_head(self, rows, size: Tuple[int, int], options: Dict[str, Any], seed: int) -> SoftVLADHead:
        """A `SoftVLADHead` seeded by k-means of the current network's descriptors on the first
        ``vlad_init_images`` training pairs (street photos and products alike)."""
        was_training = self.training
        self.eval()
        rows = list(rows)[: max(1, int(options["vlad_init_images"]))]
        sampled = []
        for start in range(0, len(rows), 16):
            worn = load_garment_pair_batch(rows[start : start + 16], size)
            for grey in (worn["person"], worn["product"]):
                grey = grey.to(self.device)
                lafs, mask = self._keypoint_subset(
                    grey, int(self.conf["max_keypoints"]), torch.Generator().manual_seed(seed)
                )
                desc, mask = self.describe(grey, lafs, mask)
                sampled.append(desc[mask].float().cpu().numpy())
        self.train(was_training)
        desc = np.concatenate(sampled)
        n_clusters = int(self.conf["n_clusters"])
        if len(desc) < n_clusters:
            raise ValueError(
                f"vlad_weight > 0: the first {len(rows)} training pairs gave {len(desc)} descriptors, fewer "
                f"than n_clusters={n_clusters}: raise vlad_init_images"
            )
        return SoftVLADHead.from_descriptors(desc, n_clusters, seed).to(self.device)

    def _step_terms(
        self,
        batch,
        worn_pairs: bool,
        head: Optional[SoftVLADHead],
        generator: torch.Generator,
        settings: Dict[str, Any],
    ) -> Tuple[list, Dict[str, float]]:
        """The weighted loss terms of one training step, [(weight, loss or None)], and what to log.

        `batch` holds training-pair rows when the garment or VLAD objectives need the street photos
        (`worn_pairs`), else product photo paths.
        """
        from retrieval.batching import load_batch

        size, device = tuple(self.conf["image_size"]), self.device
        terms, logs = [], {}
        if worn_pairs:
            worn = {k: v.to(device) for k, v in load_garment_pair_batch(batch, size).items()}
            grey_a = worn["product"]
        else:
            grey_a = rgb_to_grayscale(load_batch(batch, size)).to(device)
        if float(settings["homography_weight"]) > 0:
            homographies = random_homographies(len(batch), size[0], size[1], generator).to(device)
            grey_b = photometric_jitter(warp_images(grey_a, homographies), generator)
            loss, logs = self._training_loss(grey_a, grey_b, homographies, generator, settings)
            terms.append((float(settings["homography_weight"]), loss))
        if float(settings["garment_pairs_weight"]) > 0:
            pairs = garment_patch_pairs(
                worn["product"],
                worn["product_mask"],
                worn["person"],
                worn["garment_mask"],
                int(settings["garment_pairs_per_image"]),
                generator,
                min_contrast=float(self.conf["min_patch_contrast"]),
            )
            worn_loss, worn_logs = self._patch_pair_loss(pairs, settings, settings["garment_loss"])
            logs.update({f"garment_{k}": v for k, v in worn_logs.items()})
            terms.append((float(settings["garment_pairs_weight"]), worn_loss))
        if float(settings["vlad_weight"]) > 0:
            aggregate_loss, aggregate_logs = self._vlad_loss(worn, head, generator, settings)
            logs.update(aggregate_logs)
            terms.append((float(settings["vlad_weight"]), aggregate_loss))
        return terms, logs

    def train_on(self, dataset, out_dir, **options: Any):
        """Train the patch network; return final.pt. Three objectives, each with its weight:

        - ``homography_weight`` (default 1): `_training_loss` on product photos and random homographies of
          them (with a photometric change), patch to patch;
        - ``garment_pairs_weight``: product patches against the garment worn in the pair's street photo
          (`garment_patch_pairs`, form ``garment_loss``);
        - ``vlad_weight``: end to end through a soft-assignment VLAD of whole images, street side against
          product (`_vlad_loss`), the aggregate the engine searches with.

        Each step reads ``batch_size`` training pairs (grey, ``image_size``) and optimises the weighted
        sum (Adam). An epoch is one pass over at most ``max_images`` pairs in a seeded order; every random
        draw comes from (seed, epoch, step), so a resumed run repeats exactly what it would have done.
        Writes ``out_dir``/{last.pt, final.pt, losses.csv, losses.png, config.json} via `TrainingRun`.
        The codebook and whitening are not learned here: `fit` after training (the engine does).

        Args:
            dataset: a RetrievalSet with training pairs (and parse maps for the garment and VLAD objectives).
            out_dir: run directory (resumes from its last.pt).
            **options: seed, progress, time_budget_s, checkpoint_every_s, and overrides of `train_defaults`.
        """
        from retrieval.batching import sample_paths
        from retrieval.training import TrainingRun, train_options

        seed, progress, time_budget_s, checkpoint_every_s, settings = train_options(
            self.name, options, self.train_defaults
        )
        if dataset.train is None or dataset.train.empty:
            raise ValueError(f"{dataset.name} has no training pairs to train {self.name} on")
        homography_weight = float(settings["homography_weight"])
        garment_weight = float(settings["garment_pairs_weight"])
        vlad_weight = float(settings["vlad_weight"])
        if settings["garment_loss"] not in GARMENT_LOSSES:
            raise ValueError(f"garment_loss must be one of {GARMENT_LOSSES}, got {settings['garment_loss']!r}")
        if settings["vlad_anchors"] not in VLAD_ANCHORS:
            raise ValueError(f"vlad_anchors must be one of {VLAD_ANCHORS}, got {settings['vlad_anchors']!r}")
        if max(homography_weight, garment_weight, vlad_weight) <= 0:
            raise ValueError("nothing to train: homography_weight, garment_pairs_weight and vlad_weight are all 0")
        worn_pairs = garment_weight > 0 or vlad_weight > 0
        rows_by_product: Dict[str, Any] = {}
        if worn_pairs:
            usable = dataset.train.dropna(subset=["parse"]) if "parse" in dataset.train else dataset.train.iloc[:0]
            if usable.empty:
                raise ValueError(
                    f"garment_pairs_weight > 0 and vlad_weight > 0 need person parse maps, and {dataset.name}'s "
                    "training pairs have none: train with both at 0 (homographies only)"
                )
            rows_by_product = {str(r.product_image): r for r in usable.itertuples(index=False)}
            paths = sorted(rows_by_product)
        else:
            paths = sorted(dict.fromkeys(str(p) for p in dataset.train["product_image"]))
        if settings["max_images"] is not None:
            paths = sample_paths(paths, int(settings["max_images"]), seed)
        batch_size = int(settings["batch_size"])
        steps_per_epoch = -(-len(paths) // batch_size)
        size = tuple(self.conf["image_size"])

        modules = dict(self._training_modules())
        if vlad_weight > 0:
            # Seeded from the first pairs of the training order; a resumed run overwrites it from last.pt.
            init_rows = [rows_by_product[paths[i]] for i in np.random.default_rng([seed, 0]).permutation(len(paths))]
            modules["vlad_head"] = self._initial_vlad_head(init_rows, size, settings, seed)
        parameters = [p for module in modules.values() for p in module.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]))
        run = TrainingRun(
            out_dir,
            modules,
            {"adam": optimizer},
            config={"descriptor": self.name, "conf": self.config(), "n_images": len(paths), **settings},
            seed=seed,
            time_budget_s=time_budget_s,
            checkpoint_every_s=checkpoint_every_s,
            progress=f"train {self.name}" if progress else None,
            steps_per_epoch=steps_per_epoch,
        )
        self._bfloat16_training = bool(settings["bfloat16"])
        try:
            self._train_epochs(run, paths, rows_by_product, worn_pairs, modules, optimizer, settings, seed)
        finally:
            self._bfloat16_training = False
        self.eval()
        # Whatever codebook this instance held describes the old network: it must be fitted again.
        self._fitted.fill_(False)
        # final.pt holds no fit state: the codebook and whitening are fitted afterwards, with any
        # n_clusters / pca_dim.
        weights = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith(FIT_STATE_PREFIXES)}
        return run.finish(weights=weights, extra={"descriptor": self.name})

    def load_trained(self, checkpoint) -> "LearnedPatchDescriptor":
        """Load the networks of a final.pt written by `train_on` (strict for them).

        Fit state is never taken from a checkpoint: training does not fit, and checkpoints written
        before final.pt left it out carry unfitted codebook and whitening buffers of their own
        ``pca_dim``, which are dropped here so that they load under any fit config.
        """
        from retrieval.training import load_trained_weights

        load_trained_weights(
            self,
            checkpoint,
            kind="descriptor",
            name=self.name,
            conf=self.conf,
            shipped_prefixes=FIT_STATE_PREFIXES,
            ignored_prefixes=FIT_STATE_PREFIXES,
        )
        return self

    def _train_epochs(self, run, paths, rows_by_product, worn_pairs, modules, optimizer, settings, seed) -> None:
        """`train_on`'s loop: seeded epochs of ``batch_size`` pairs, resumable step by step."""
        batch_size = int(settings["batch_size"])
        for epoch in run.epochs(int(settings["epochs"])):
            order = np.random.default_rng([seed, epoch]).permutation(len(paths))
            chunks = [
                [paths[i] for i in order[start : start + batch_size]] for start in range(0, len(paths), batch_size)
            ]
            for step, chunk in run.skip_done(enumerate(chunks)):
                generator = step_generator(seed, epoch, step)
                for module in modules.values():
                    module.train()
                batch = [rows_by_product[p] for p in chunk] if worn_pairs else chunk
                terms, logs = self._step_terms(batch, worn_pairs, modules.get("vlad_head"), generator, settings)
                terms = [weight * term for weight, term in terms if term is not None]
                if terms:
                    optimizer.zero_grad(set_to_none=True)
                    torch.stack(terms).sum().backward()
                    optimizer.step()
                run.log(logs)
                if run.out_of_time:
                    return


# --------------------------------------------------------------------------------------------------
# L2-Net at OpenCV DoG keypoints
# --------------------------------------------------------------------------------------------------


def dog_keypoints(detector: "cv2.SIFT", grey: np.ndarray, max_keypoints: int, upright: bool) -> np.ndarray:
    """OpenCV SIFT (DoG) keypoints of one image, strongest first: (N, 5) x, y, size, angle, response.

    With `upright`, SIFT's extra orientations at one position are dropped (they would all give the
    same upright patch and count it several times in VLAD), keeping the strongest.

    Shape:
        - grey: (H, W) uint8
        - output: (N, 5) float32, N <= max_keypoints
    """
    keypoints = detector.detect(grey, None)
    if not keypoints:
        return np.zeros((0, 5), np.float32)
    # OpenCV hands keypoints back only as Python objects: unpacking their fields is the one per-keypoint step.
    attributes = np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in keypoints], dtype=np.float32)
    attributes = attributes[np.argsort(-attributes[:, 4], kind="stable")]
    if upright:
        _, first = np.unique(np.round(attributes[:, :3], 2), axis=0, return_index=True)
        attributes = attributes[np.sort(first)]
    return attributes[:max_keypoints]


def keypoints_to_lafs(
    attributes: torch.Tensor, patch_scale: float, min_radius: float, max_radius: float, upright: bool
) -> torch.Tensor:
    """SIFT keypoint attributes -> kornia LAFs of half side ``clamp(patch_scale * size)``.

    OpenCV's ``size`` is twice the keypoint's sigma, so ``patch_scale = 3`` gives the half side
    ``6 sigma`` that kornia's DoG + HardNet pipeline uses. OpenCV's angle turns clockwise in image
    coordinates where kornia's turns the other way, hence the sign flip (checked on rotated images).

    Shape:
        - attributes: (B, N, 5) x, y, size, angle, response
        - output: (B, N, 2, 3)
    """
    radius = (patch_scale * attributes[..., 2]).clamp(min_radius, max_radius)
    angle = torch.zeros_like(attributes[..., 3]) if upright else -attributes[..., 3]
    return laf_from_center_scale_ori(attributes[..., :2].contiguous(), radius[..., None, None], angle[..., None])


@DESCRIPTORS.register("l2net")
class L2Net(LearnedPatchDescriptor):
    """L2-Net descriptors of 32x32 patches at OpenCV DoG keypoints, VLAD + PCA-whitened.

    The network is kornia's `HardNet(pretrained=False)`, which is the L2-Net architecture (see the
    module docstring); `train_on` trains it with the HardNet loss on homography patch pairs of the
    training product photos, keypoints from the same DoG detector. Untrained, it is a random
    network, still a valid (weak) descriptor.

    Config (``default_conf``), beyond the shared ones (image_size, max_keypoints, upright,
    n_clusters, pca_dim, fit_descriptors_per_image, max_fit_descriptors, kmeans_iterations,
    describe_chunk: patches per network call, min_patch_contrast: flatter patches are not described, seed):
        n_octave_layers, contrast_threshold, edge_threshold, sigma: cv2.SIFT_create detector settings
            (contrast threshold 0.02 as `sift`, for small low-contrast garments).
        patch_scale: half side of the patch in units of OpenCV's keypoint size (3 = 6 sigma).
        min_patch_radius, max_patch_radius: clamp of that half side, in pixels.

    Example:
        >>> l2net = L2Net(n_clusters=8, pca_dim=None)
        >>> l2net.dim
        1024
    """

    default_conf: Dict[str, Any] = {
        **PATCH_DESCRIPTOR_CONF,
        "n_octave_layers": 3,
        "contrast_threshold": 0.02,
        "edge_threshold": 10.0,
        "sigma": 1.6,
        "patch_scale": 3.0,
        "min_patch_radius": 4.0,
        "max_patch_radius": 32.0,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.eval()

    def _detector(self) -> "cv2.SIFT":
        # A fresh detector per batch (microseconds): no cv2 object on the module (not picklable).
        return cv2.SIFT_create(
            nfeatures=int(self.conf["max_keypoints"]) * (1 if self.conf["upright"] else 2),
            nOctaveLayers=int(self.conf["n_octave_layers"]),
            contrastThreshold=float(self.conf["contrast_threshold"]),
            edgeThreshold=float(self.conf["edge_threshold"]),
            sigma=float(self.conf["sigma"]),
        )

    def detect(self, images: torch.Tensor, grey: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DoG keypoints of each image (OpenCV takes one image per call) as LAFs.

        Shape:
            - images: (B, 3, H, W); grey: (B, 1, H, W)
            - output: lafs (B, N, 2, 3), scores (B, N) DoG response, mask (B, N) bool
        """
        detector = self._detector()
        per_image = [
            dog_keypoints(detector, g, int(self.conf["max_keypoints"]), bool(self.conf["upright"]))
            for g in rgb_to_grey_uint8(images)
        ]
        attributes, mask = pad_features(per_image, 5)
        attributes = torch.from_numpy(attributes).to(grey.device)
        lafs = keypoints_to_lafs(
            attributes,
            float(self.conf["patch_scale"]),
            float(self.conf["min_patch_radius"]),
            float(self.conf["max_patch_radius"]),
            bool(self.conf["upright"]),
        )
        return lafs.to(grey.dtype), attributes[..., 4], torch.from_numpy(mask).to(grey.device)

    def _training_loss(self, grey_a, grey_b, homographies, generator, options):
        """HardNet loss on patches at DoG keypoints of A and their homography images in B.

        The training frames come from the same detector as at test time (a random subset of
        ``pairs_per_image`` per image), so the network learns the patches it will see.
        """
        with torch.no_grad():
            images_a = grey_a.expand(-1, 3, -1, -1)
            lafs, _, mask = self.detect(images_a, grey_a)
            mask = choose_random_subset(mask, int(options["pairs_per_image"]), generator)
        pairs = homography_patch_pairs(
            grey_a, grey_b, lafs, mask, homographies, min_contrast=float(self.conf["min_patch_contrast"])
        )
        return self._patch_pair_loss(pairs, options)
