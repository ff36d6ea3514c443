"""Training of PaintNet's shape predictor (Sec. 3.2.1, Algorithm 1): triplets of person photos ranked by
their products, on cached frozen backbone maps; the trained embeddings and shape maps become its memory.

Why "shape_iou" ranks by default rather than the paper's product features is told, with the numbers,
in `generation.paintnet`'s docstring.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from generation.paintnet import SP_RANKINGS
from generation.paintnet_networks import ShapePredictor
from retrieval.backbones import EfficientNetLite0
from retrieval.training import TrainingRun, atomic_torch_save, load_checkpoint

log = logging.getLogger("street2shop.paintnet")


# --------------------------------------------------------------------------------------------------
# Triplets
# --------------------------------------------------------------------------------------------------


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 5.0
) -> torch.Tensor:
    """Eq. 5: mean over triplets of max(0, ||a - p||^2 - ||a - n||^2 + margin) (squared euclidean).

    The paper sums over triplets; the mean makes the learning rate independent of the batch size.

    Example:
        >>> triplet_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), margin=5.0)
        tensor(0.)
    """
    positive_distance = ((anchor - positive) ** 2).sum(dim=1)
    negative_distance = ((anchor - negative) ** 2).sum(dim=1)
    return F.relu(positive_distance - negative_distance + margin).mean()


def rank_triplet_candidates(similarity: torch.Tensor, k: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k (positives) and bottom-k (negatives) of each row of a similarity matrix, itself excluded.

    Shape:
        - similarity: (N, N). Output: positives (N, k), negatives (N, k) int64 (k capped at (N - 1) // 2).

    Example:
        >>> s = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> rank_triplet_candidates(s, k=1)
        (tensor([[1],
                [0],
                [1]]), tensor([[2],
                [2],
                [0]]))
    """
    n = similarity.shape[0]
    if n < 3:
        raise ValueError(f"triplets need at least 3 training pairs, got {n}")
    k = max(1, min(int(k), (n - 1) // 2))
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    positives = similarity.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    negatives = similarity.masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    return positives, negatives


def shape_iou_matrix(shapes: torch.Tensor, size: int = 32, chunk: int = 1024) -> torch.Tensor:
    """IoU of every pair of binary shape maps, at size x size.

    Shape:
        - shapes: (N, 1, H, W) uint8 (0/255) or bool. Output: (N, N) float in [0, 1].
    """
    masks = (
        F.interpolate(shapes.float(), size=(size, size), mode="area")
        .flatten(1)
        .ge(0.5 * shapes.float().max().clamp_min(1))
    )
    masks = masks.float()
    areas = masks.sum(1)
    rows = []
    for start in range(0, len(masks), chunk):
        inter = masks[start : start + chunk] @ masks.T
        union = areas[start : start + chunk, None] + areas[None, :] - inter
        rows.append(inter / union.clamp_min(1.0))
    return torch.cat(rows)


def mean_iou(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean IoU between two batches of binary masks (B, 1, H, W) (> 0.5 of the max is foreground)."""
    p = predicted.float() > 0.5 * float(predicted.float().max().clamp_min(1e-6))
    t = target.float() > 0.5 * float(target.float().max().clamp_min(1e-6))
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return float((inter / union.clamp_min(1)).mean())


# --------------------------------------------------------------------------------------------------
# Shape predictor training (Algorithm 1)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _backbone_maps(
    predictor: ShapePredictor, paths: Sequence[str], cache: Path, progress: bool, batch_size: int = 32
) -> torch.Tensor:
    """Frozen feature maps of the person photos, (N, C, h, w) float16, cached in `cache`."""
    from retrieval.batching import iter_batches

    key = {"paths": list(map(str, paths)), "size": list(predictor.image_size), "layer": predictor.layer}
    if cache.exists():
        stored = load_checkpoint(cache)
        if stored.get("key") == key:
            return stored["maps"]
    device = predictor.memory_embeddings.device
    batches = iter_batches(list(map(str, paths)), predictor.image_size, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(
            batches,
            total=math.ceil(len(paths) / batch_size),
            desc="shape predictor features",
            unit="batch",
            leave=False,
        )
    maps = torch.cat([predictor.feature_maps(batch.to(device)).half().cpu() for batch in batches])
    atomic_torch_save({"key": key, "maps": maps}, cache)
    return maps


@torch.no_grad()
def _product_gem_similarity(backbone: EfficientNetLite0, paths: Sequence[str], size: Tuple[int, int]) -> torch.Tensor:
    from retrieval.batching import iter_batches
    from retrieval.descriptors.gem import gem_pool

    device = next(backbone.parameters()).device
    vectors = torch.cat(
        [
            F.normalize(gem_pool(backbone(batch.to(device))), dim=1).cpu()
            for batch in iter_batches(list(map(str, paths)), size, 32)
        ]
    )
    return vectors @ vectors.T


def train_shape_predictor(
    predictor: ShapePredictor,
    train_pairs,
    shapes: torch.Tensor,
    out_dir: Path,
    ranking: str = "shape_iou",
    k: int = 20,
    margin: float = 5.0,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: Optional[float] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Algorithm 1 on cached frozen maps, then store the training embeddings and shape maps in `predictor`.

    Args:
        predictor: the ShapePredictor to train (its attention and embedding layers).
        train_pairs: the training table (person_image, product_image), in the order of `shapes`.
        shapes: (N, 1, S, S) uint8 product shape maps of the pairs (the memory; "shape_iou" ranks by them).
        out_dir: the stage's run directory (TrainingRun files + maps.pt, the cached backbone maps).
        ranking: "shape_iou" or "product_gem" (see the module docstring).
        k, margin: top/bottom K candidates and the triplet margin alpha.

    Returns:
        A summary: steps, seconds, the leave-one-out shape IoU of the nearest neighbour on the training
        set before (raw average-pooled features) and after training, and "loo_index" (N,) the
        leave-one-out nearest neighbour of every training photo.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = predictor.memory_embeddings.device
    maps = _backbone_maps(predictor, train_pairs["person_image"].tolist(), out_dir / "maps.pt", progress)
    n = maps.shape[0]
    if ranking == "shape_iou":
        similarity = shape_iou_matrix(shapes)
    elif ranking == "product_gem":
        similarity = _product_gem_similarity(
            predictor.backbone, train_pairs["product_image"].tolist(), predictor.image_size
        )
    else:
        raise ValueError(f"unknown ranking {ranking!r}; valid: {SP_RANKINGS}")
    positives, negatives = rank_triplet_candidates(similarity, k)
    k = positives.shape[1]

    optimizer = torch.optim.SGD(
        list(predictor.attention.parameters()) + list(predictor.embedding.parameters()), lr=lr, momentum=0.9
    )
    run = TrainingRun(
        out_dir,
        {"shape_predictor": predictor},
        {"sgd": optimizer},
        config={
            "ranking": ranking,
            "k": k,
            "margin": margin,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "n": n,
            "layer": predictor.layer,
            "dim": predictor.dim,
        },
        seed=seed,
        time_budget_s=time_budget_s,
        progress="train shape predictor" if progress else None,
    )
    predictor.train()
    for epoch in run.epochs(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        anchors = torch.randperm(n, generator=generator)
        pick_positive = positives[anchors, torch.randint(0, k, (n,), generator=generator)]
        pick_negative = negatives[anchors, torch.randint(0, k, (n,), generator=generator)]
        chunks = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
        for part in run.skip_done(chunks):
            index = torch.cat([anchors[part], pick_positive[part], pick_negative[part]])
            embeddings = predictor.embed_maps(maps[index].to(device).float())
            a, p, q = embeddings.chunk(3)
            loss = triplet_loss(a, p, q, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log({"triplet": float(loss.detach())})
            if run.out_of_time:
                break
    predictor.eval()
    with torch.no_grad():
        embeddings = torch.cat([predictor.embed_maps(maps[i : i + 256].to(device).float()) for i in range(0, n, 256)])
        predictor.set_memory(embeddings, shapes)
        loo_index = predictor.nearest(embeddings, exclude_self=True).cpu()
        pooled = maps.float().mean(dim=(2, 3))
        raw = torch.cdist(pooled, pooled).fill_diagonal_(float("inf")).argmin(1)
    run.finish(weights={k_: v for k_, v in predictor.state_dict().items() if not k_.startswith("backbone.")})
    summary = {
        "steps": run.step,
        "seconds": round(time.perf_counter() - started, 1),
        "loo_shape_iou": round(mean_iou(shapes[loo_index], shapes), 4),
        "loo_shape_iou_untrained_avgpool": round(mean_iou(shapes[raw], shapes), 4),
        "loo_index": loo_index,
    }
    log.info("shape predictor: %s", {k_: v for k_, v in summary.items() if k_ != "loo_index"})
    return summary
