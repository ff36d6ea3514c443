"""Step 3 of spatial verification (`retrieval.rerank`): `SpatialVerifier` matches, verifies and re-sorts."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from retrieval.rerank.matching import mutual_nearest_neighbours
from retrieval.rerank.ransac import MODELS, ransac
from retrieval.rerank.store import LocalFeatureStore

log = logging.getLogger("street2shop.rerank")


class SpatialVerifier:
    """Re-rank the top candidates of a first stage by RANSAC inliers of mutual-NN matches.

    Config (``default_conf``):
        model: geometric model, "similarity" (default: a garment photographed flat and worn differs
            by far more than a homography explains; fewer degrees of freedom mean fewer chance
            inliers), "affine" or "homography".
        threshold: inlier distance in pixels of the descriptor's input image. Coarse on purpose:
            a stride-16 feature map localises a keypoint only to about +-8 pixels at scale 1.
        backend: "opencv", "torch", or "auto" (torch when the query features are on a GPU).
        max_iterations: cap on OpenCV's adaptive number of hypotheses.
        torch_hypotheses: hypotheses per candidate of the torch back-end (fixed).
        max_scale_change: hypotheses scaling by more than this (or less than its inverse) are discarded.
        min_similarity: matches need at least this descriptor similarity, or None.
        ratio: Lowe's ratio test on top of mutual nearest neighbours, or None. Default 0.95: a
            loose one, which mostly removes matches between repetitive backdrop and fabric.
        min_inliers: fewer inliers count as 0 (not verified): two matches always fit a similarity.
        inlier_weight: weight of log(1 + inliers) added to the first stage's similarity (package doc).
        seed: seeds RANSAC.

    Example:
        >>> verifier = SpatialVerifier(model="affine", threshold=10.0)
        >>> verifier.conf["torch_hypotheses"]
        256
    """

    default_conf: Dict[str, Any] = {
        "model": "similarity",
        "threshold": 20.0,
        "backend": "auto",
        "max_iterations": 2000,
        "torch_hypotheses": 256,
        "max_scale_change": 4.0,
        "min_similarity": None,
        "ratio": 0.95,
        "min_inliers": 4,
        "inlier_weight": 0.05,
        "seed": 0,
    }

    def __init__(self, **conf: Any):
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(
                f"SpatialVerifier got unknown options {sorted(unknown)}; valid options: {sorted(self.default_conf)}"
            )
        self.conf = {**self.default_conf, **conf}
        if self.conf["model"] not in MODELS:
            raise ValueError(f"unknown geometric model {self.conf['model']!r}; valid models: {', '.join(MODELS)}")
        if self.conf["backend"] not in ("auto", "opencv", "torch"):
            raise ValueError(f"unknown RANSAC backend {self.conf['backend']!r}; valid: auto, opencv, torch")

    def count_inliers(
        self,
        query: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        candidates: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Inliers between one query and C candidates.

        Args:
            query: (keypoints (M, 2), desc (M, D), mask (M,)) of the query.
            candidates: (keypoints (C, N, 2), desc (C, N, D), mask (C, N)) of the candidates.

        Returns:
            (C,) int64 inlier counts (before ``min_inliers``).
        """
        query_kp, query_desc, query_mask = query
        cand_kp, cand_desc, cand_mask = candidates
        match, valid = mutual_nearest_neighbours(
            query_desc, query_mask, cand_desc, cand_mask, self.conf["min_similarity"], self.conf["ratio"]
        )
        matched_kp = cand_kp.gather(1, match[..., None].expand(-1, -1, 2))
        query_kp = query_kp[None].expand(len(cand_kp), -1, -1)
        backend = self.conf["backend"]
        on_torch = backend == "torch" or (backend == "auto" and query_desc.is_cuda)
        _, inliers = ransac(
            query_kp,
            matched_kp,
            valid,
            model=self.conf["model"],
            threshold=float(self.conf["threshold"]),
            iterations=int(self.conf["torch_hypotheses" if on_torch else "max_iterations"]),
            max_scale_change=self.conf["max_scale_change"],
            generator=generator,
            backend="torch" if on_torch else "opencv",
        )
        return inliers.sum(dim=1)

    @torch.no_grad()
    def rerank(
        self,
        queries: LocalFeatureStore,
        positions: torch.Tensor,
        global_scores: torch.Tensor,
        gallery: LocalFeatureStore,
        progress: Optional[str] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-sort each query's candidates by ``global_score + inlier_weight * log(1 + inliers)``.

        Args:
            queries: local features of the B queries (row b = query b).
            positions: gallery rows of each query's top candidates, best first (-1 = no candidate).
            global_scores: the first stage's similarities of those candidates.
            gallery: local features of the gallery (row = position).

        Returns:
            (scores, positions, inliers), each (B, C), re-sorted best first; a candidate with
            fewer than ``min_inliers`` inliers has inliers 0 there.
        """
        positions = torch.as_tensor(positions).long()
        global_scores = torch.as_tensor(global_scores).float()
        if positions.shape != global_scores.shape or positions.ndim != 2 or positions.shape[0] != len(queries):
            raise ValueError(
                f"positions {tuple(positions.shape)} and scores {tuple(global_scores.shape)} "
                f"must be (B, C) with B = {len(queries)} queries"
            )
        import cv2

        generator = torch.Generator().manual_seed(int(self.conf["seed"]))
        cv2.setRNGSeed(int(self.conf["seed"]))
        inliers = torch.zeros_like(positions)
        rows: Iterable[int] = range(len(queries))
        if progress:
            from tqdm.auto import tqdm

            rows = tqdm(rows, desc=progress, unit="query", leave=False)
        for b in rows:  # each query verifies all of its candidates in one batch
            present = positions[b] >= 0
            if not present.any():
                continue
            counts = self.count_inliers(
                (queries.keypoints[b], queries.desc[b].float(), queries.mask[b]),
                gallery.gather(positions[b][present]),
                generator,
            )
            inliers[b, present] = counts
        inliers = torch.where(inliers >= int(self.conf["min_inliers"]), inliers, torch.zeros_like(inliers))
        scores = global_scores + float(self.conf["inlier_weight"]) * torch.log1p(inliers.float())
        scores = torch.where(positions >= 0, scores, torch.full_like(scores, float("-inf")))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return scores.gather(1, order), positions.gather(1, order), inliers.gather(1, order)
