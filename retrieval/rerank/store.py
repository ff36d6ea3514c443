"""The gallery's local features for spatial verification (`retrieval.rerank`): padded tensors, saved as bytes."""

from __future__ import annotations

import io
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.types import LocalFeatures


class LocalFeatureStore:
    """Local features of many images as padded tensors: row i = image i (e.g. catalog position i).

    Descriptors are stored as float16 (half the memory; matching converts back to float32).

    Shape:
        - keypoints: (G, N, 2) float32, desc: (G, N, D) float16, mask: (G, N) bool
    """

    def __init__(self, keypoints: torch.Tensor, desc: torch.Tensor, mask: torch.Tensor):
        if (
            keypoints.ndim != 3
            or desc.ndim != 3
            or keypoints.shape[:2] != desc.shape[:2]
            or mask.shape != desc.shape[:2]
        ):
            raise ValueError(
                f"store shapes disagree: keypoints {tuple(keypoints.shape)}, desc {tuple(desc.shape)}, "
                f"mask {tuple(mask.shape)}"
            )
        self.keypoints = keypoints.float()
        self.desc = desc.half()
        self.mask = mask.bool()

    def __len__(self) -> int:
        return self.desc.shape[0]

    @classmethod
    def from_features(cls, batches: Iterable[LocalFeatures]) -> "LocalFeatureStore":
        """Concatenate LocalFeatures batches (each padded to its own length) into one store."""
        parts = [(f.keypoints.cpu(), f.desc.cpu().half(), f.mask.cpu()) for f in batches]
        if not parts:
            raise ValueError("a LocalFeatureStore needs at least one batch of features")
        width = max(p[1].shape[1] for p in parts)

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            return F.pad(tensor, (0, 0) * (tensor.ndim - 2) + (0, width - tensor.shape[1]))

        return cls(
            torch.cat([pad(k) for k, _, _ in parts]),
            torch.cat([pad(d) for _, d, _ in parts]),
            torch.cat([pad(m) for _, _, m in parts]),
        )

    @classmethod
    def build(
        cls,
        extract: Callable[[torch.Tensor], LocalFeatures],
        paths: Sequence[str],
        size: Tuple[int, int],
        *,
        batch_size: int = 32,
        device: torch.device = torch.device("cpu"),
        progress: Optional[str] = None,
    ) -> "LocalFeatureStore":
        """Run ``extract`` (a local descriptor's, maybe behind a proxy) over image files, in order."""
        from retrieval.batching import iter_batches

        batches = iter_batches(list(paths), size, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(paths) // batch_size), desc=progress, unit="batch", leave=False)
        with torch.no_grad():
            return cls.from_features(extract(images.to(device)) for images in batches)

    def gather(
        self, positions: torch.Tensor, device: Optional[torch.device] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``positions`` (C,) -> keypoints (C, N, 2), desc (C, N, D) float32, mask (C, N)."""
        positions = positions.cpu().long()
        out = self.keypoints[positions], self.desc[positions].float(), self.mask[positions]
        return tuple(t.to(device) for t in out) if device is not None else out

    def to_bytes(self) -> bytes:
        """An .npz payload (e.g. an index attachment); read back with `from_bytes`."""
        buffer = io.BytesIO()
        np.savez(buffer, keypoints=self.keypoints.numpy(), desc=self.desc.numpy(), mask=self.mask.numpy())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "LocalFeatureStore":
        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            return cls(*(torch.from_numpy(arrays[k]) for k in ("keypoints", "desc", "mask")))
