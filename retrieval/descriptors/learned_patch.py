"""The shared base of the learned patch descriptors `l2net` and `lfnet`: keypoint frames -> 32x32 patches
-> the L2-Net network (kornia's `HardNet`, ``pretrained=False``) -> VLAD, optionally PCA-whitened.

`LearnedPatchDescriptor` holds everything but the detector (a subclass's `detect`): the patch network,
the description of frames, `extract` and the loading of trained weights; aggregation and fitting come
from `VLADDescriptor`. Training (homography and garment patch pairs, the soft-VLAD objective, the loop)
lives in `retrieval.training.patch`; final.pt holds the networks only, the codebook is fitted afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Tuple

import torch
from kornia.color import rgb_to_grayscale
from kornia.feature import (
    HardNet,
    extract_patches_from_pyramid,
    get_laf_center,
    get_laf_orientation,
    get_laf_scale,
)

from retrieval.descriptors.base import check_images
from retrieval.descriptors.vlad_base import VLAD_CONF, VLADDescriptor
from retrieval.patches import PATCH_SIZE
from retrieval.types import InputSpec, LocalFeatures

PATCH_DESCRIPTOR_DIM = 128
# State-dict keys that `fit` sets (codebook, whitening, the fitted flag): never trained, never in final.pt.
FIT_STATE_PREFIXES = ("centroids", "pca_mean", "pca_projection", "_fitted")

# Settings every learned patch descriptor shares; subclasses add their detector's.
PATCH_DESCRIPTOR_CONF: Dict[str, Any] = {
    "image_size": (256, 192),
    "max_keypoints": 300,
    "upright": False,
    "describe_chunk": 1024,
    "min_patch_contrast": 0.01,
    # Raw VLAD by default, as `sift`: PCA-whitening the 8192-d VLAD from ~1,000 training images
    # amplifies noise, and more so for trained networks. 300-product VITON val subset, mAP@20
    # none/hp: untrained 0.105/0.195 whitened to 256-d vs 0.201/0.299 raw; trained (homographies,
    # 255k pairs) 0.076/0.114 vs 0.198/0.230; trained on garment pairs (InfoNCE) 0.131/0.209 vs
    # 0.249/0.319. `pca_dim` still turns it on.
    **VLAD_CONF,
}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. building networks) under torch's CPU RNG seeded by `seed`, restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class LearnedPatchDescriptor(VLADDescriptor):
    """Keypoint frames -> 32x32 patches -> HardNet/L2-Net network -> VLAD + PCA-whitening.

    Subclasses provide `detect` (frames per image); their trainers (`retrieval.training.patch`) say
    which modules train. The patch network is trained in this project, never downloaded, so its
    weights travel with the state dict (``shipped_state_prefixes = ()``).

    Shape:
        - embed input: (B, 3, H, W) float RGB in [0, 1]
        - embed output: (B, dim), dim = pca_dim or n_clusters * 128

    Example:
        >>> from retrieval.descriptors import create_descriptor
        >>> create_descriptor("l2net", n_clusters=8, pca_dim=None).dim  # as lfnet: n_clusters * 128
        1024
    """

    trainable = True
    local_dim = PATCH_DESCRIPTOR_DIM
    shipped_state_prefixes = ()
    # Training does not fit, and checkpoints written before final.pt left fit state out carry unfitted
    # codebook and whitening buffers of their own pca_dim: dropped on load, so they load under any fit config.
    fit_state_prefixes = FIT_STATE_PREFIXES
    default_conf: Dict[str, Any] = PATCH_DESCRIPTOR_CONF

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        if int(self.conf["n_clusters"]) < 1 or int(self.conf["max_keypoints"]) < 1:
            raise ValueError(f"n_clusters and max_keypoints must be >= 1, got conf {self.conf}")
        # L2-Net architecture (kornia calls it HardNet); random weights, never a download. Seeded, so
        # that the untrained descriptor is the same network in every process.
        with seeded(int(self.conf["seed"])):
            self.net = HardNet(pretrained=False)
        self._register_vlad_buffers()
        self._bfloat16_training = False  # set by the trainer (its `bfloat16` option) while it runs

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
        """The patch network, float32 out; in bfloat16 autocast while training with ``bfloat16``.

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
        # kornia's frame angle turns the other way from OpenCV's keypoint angle (see `l2net.keypoints_to_lafs`).
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
