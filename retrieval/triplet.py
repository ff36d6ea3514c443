"""Triplet learning as small composable parts: distances, miners, the margin loss and a seeded batch sampler,
and its contrastive alternative, the InfoNCE loss over the same (anchors, candidates, labels) batches.

The parts follow pytorch-metric-learning's shape (`TripletMarginLoss(margin, miner=BatchHardMiner())`)
but are written for the *cross-domain* case as well: anchors come from one set of embeddings (street
photos) and positives/negatives from another (product photos), matched by labels (product ids).
With `candidates=None` both roles are played by the same embeddings, the usual single-domain case.

Conventions:
    - A triplet is (anchor row a, positive candidate p, negative candidate n) with
      label(a) == label(p) and label(a) != label(n); its loss is max(0, d(a, p) - d(a, n) + margin).
    - Miners see a (detached) distance matrix and the labels and return index triplets; the loss
      owns the distances and their gradients. So a miner is testable on a hand-made matrix.

Example:
    >>> loss_fn = TripletMarginLoss(margin=0.2, miner=BatchHardMiner())
    >>> street, shop = torch.randn(8, 16), torch.randn(8, 16)
    >>> labels = torch.arange(8)
    >>> loss = loss_fn(street, labels, shop, labels)  # person i <-> product i, others are negatives
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

Triplets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
DISTANCES = ("cosine", "euclidean")
REDUCTIONS = ("mean", "mean_active", "sum", "none")


# ---- distances -------------------------------------------------------------------------------------


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """All distances between the rows of `x` and the rows of `y`.

    "cosine" is 1 - cos(x_i, y_j) (rows are L2-normalised here, so any scale is accepted), in [0, 2];
    "euclidean" is ||x_i - y_j||_2.

    Shape:
        - x: (N, D), y: (M, D)
        - Output: (N, M)

    Example:
        >>> pairwise_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        tensor([[1., 0.]])
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) embeddings, got {tuple(x.shape)} and {tuple(y.shape)}")
    if distance == "cosine":
        x = nn.functional.normalize(x, dim=1)
        y = nn.functional.normalize(y, dim=1)
        return 1.0 - x @ y.T
    if distance == "euclidean":
        return torch.cdist(x, y)
    raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")


# ---- miners (pure functions on a distance matrix) ----------------------------------------------------


def _label_masks(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if anchor_labels.ndim != 1 or candidate_labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got {tuple(anchor_labels.shape)} and {tuple(candidate_labels.shape)}")
    same = anchor_labels[:, None] == candidate_labels[None, :]
    return same, ~same


def _check_distances(distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> None:
    if distances.shape != (len(anchor_labels), len(candidate_labels)):
        raise ValueError(
            f"distances must be (len(anchor_labels), len(candidate_labels)) = "
            f"({len(anchor_labels)}, {len(candidate_labels)}), got {tuple(distances.shape)}"
        )


def batch_hard_triplets(
    distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor
) -> Triplets:
    """For each anchor: its farthest positive and its closest negative (Hermans et al., 2017).

    Anchors without a positive or without a negative among the candidates are left out.

    Shape:
        - distances: (N, M) anchor-to-candidate distances.
        - anchor_labels: (N,), candidate_labels: (M,)
        - Output: three (T,) long tensors (anchor, positive, negative indices), T <= N.

    Example:
        >>> d = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]])
        >>> batch_hard_triplets(d, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
        (tensor([0, 1]), tensor([0, 1]), tensor([2, 2]))
    """
    _check_distances(distances, anchor_labels, candidate_labels)
    same, different = _label_masks(anchor_labels, candidate_labels)
    valid = same.any(dim=1) & different.any(dim=1)
    inf = torch.finfo(distances.dtype).max
    positive = distances.masked_fill(~same, -inf).argmax(dim=1)
    negative = distances.masked_fill(~different, inf).argmin(dim=1)
    anchors = torch.nonzero(valid).squeeze(1)
    return anchors, positive[anchors], negative[anchors]


def semi_hard_triplets(
    distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor
) -> Triplets:
    """For each (anchor, positive) pair: the closest negative that is farther than the positive.

    FaceNet's semi-hard negatives (Schroff et al., 2015), with TensorFlow Addons' fallback: when every
    negative is closer than the positive, the farthest of them (the least hard hard negative) is used,
    so no pair is dropped for lack of a semi-hard negative.

    Shape:
        - distances: (N, M); anchor_labels: (N,); candidate_labels: (M,)
        - Output: three (T,) long tensors, T = number of (anchor, positive) pairs whose anchor has a negative.

    Example:
        >>> d = torch.tensor([[0.3, 0.1, 0.5, 0.9]])
        >>> semi_hard_triplets(d, torch.tensor([0]), torch.tensor([0, 1, 2, 3]))
        (tensor([0]), tensor([0]), tensor([2]))
    """
    _check_distances(distances, anchor_labels, candidate_labels)
    same, different = _label_masks(anchor_labels, candidate_labels)
    anchors, positives = torch.nonzero(same & different.any(dim=1, keepdim=True), as_tuple=True)
    rows = distances[anchors]  # (T, M)
    positive_distance = distances[anchors, positives][:, None]
    negatives_mask = different[anchors]
    inf = torch.finfo(distances.dtype).max
    outside = negatives_mask & (rows > positive_distance)
    closest_outside = rows.masked_fill(~outside, inf).argmin(dim=1)
    farthest_inside = rows.masked_fill(~negatives_mask, -inf).argmax(dim=1)
    negatives = torch.where(outside.any(dim=1), closest_outside, farthest_inside)
    return anchors, positives, negatives


def all_triplets(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> Triplets:
    """Every valid (anchor, positive, negative) combination ("batch all").

    Shape:
        - anchor_labels: (N,), candidate_labels: (M,)
        - Output: three (T,) long tensors, T = sum over anchors of (#positives x #negatives).

    Example:
        >>> all_triplets(torch.tensor([0]), torch.tensor([0, 1, 2]))
        (tensor([0, 0]), tensor([0, 0]), tensor([1, 2]))
    """
    same, different = _label_masks(anchor_labels, candidate_labels)
    valid = same[:, :, None] & different[:, None, :]
    anchors, positives, negatives = torch.nonzero(valid, as_tuple=True)
    return anchors, positives, negatives


# ---- miners (thin modules) ---------------------------------------------------------------------------


class BatchHardMiner(nn.Module):
    """Module form of `batch_hard_triplets`: forward(distances, anchor_labels, candidate_labels)."""

    def forward(self, distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> Triplets:
        return batch_hard_triplets(distances, anchor_labels, candidate_labels)


class SemiHardMiner(nn.Module):
    """Module form of `semi_hard_triplets`."""

    def forward(self, distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> Triplets:
        return semi_hard_triplets(distances, anchor_labels, candidate_labels)


class AllTripletsMiner(nn.Module):
    """Module form of `all_triplets` (what `TripletMarginLoss` uses without a miner)."""

    def forward(self, distances: torch.Tensor, anchor_labels: torch.Tensor, candidate_labels: torch.Tensor) -> Triplets:
        _check_distances(distances, anchor_labels, candidate_labels)
        return all_triplets(anchor_labels, candidate_labels)


MINERS = {"batch_hard": BatchHardMiner, "semi_hard": SemiHardMiner, "all": AllTripletsMiner}


def create_miner(name: str) -> nn.Module:
    """'batch_hard' | 'semi_hard' | 'all' -> a miner module; unknown names raise ValueError."""
    try:
        return MINERS[name]()
    except KeyError:
        raise ValueError(f"unknown miner {name!r}; valid: {', '.join(MINERS)}") from None


# ---- the loss ----------------------------------------------------------------------------------------


def _candidates_or_self(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    candidates: Optional[torch.Tensor],
    candidate_labels: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A loss's candidates and their labels: the anchors themselves when none are given (the single-domain case)."""
    if candidates is None:
        return embeddings, labels
    if candidate_labels is None:
        raise ValueError("candidate_labels are required with candidates")
    return candidates, candidate_labels


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.2,
    distance: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """max(0, d(a, p) - d(a, n) + margin) for explicit triplets.

    Args:
        reduction: "mean" over triplets, "mean_active" over triplets with a non-zero loss (the usual
            reduction of batch-all mining; 0 when none is active), "sum", or "none".

    Shape:
        - anchor, positive, negative: (T, D)
        - Output: () or (T,) with reduction "none".

    Example:
        >>> a = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[0.6, 0.8]]); n = torch.tensor([[0.8, 0.6]])
        >>> triplet_margin_loss(a, p, n, margin=0.2)  # cosine: 0.4 - 0.2 + 0.2
        tensor(0.4000)
    """
    if not (anchor.shape == positive.shape == negative.shape) or anchor.ndim != 2:
        raise ValueError(
            f"anchor, positive and negative must all be (T, D), got {tuple(anchor.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if distance == "cosine":
        a, p, n = (nn.functional.normalize(t, dim=1) for t in (anchor, positive, negative))
        d_ap, d_an = 1.0 - (a * p).sum(dim=1), 1.0 - (a * n).sum(dim=1)
    elif distance == "euclidean":
        d_ap, d_an = (anchor - positive).norm(dim=1), (anchor - negative).norm(dim=1)
    else:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    return reduce_losses(torch.relu(d_ap - d_an + margin), reduction)


def reduce_losses(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-triplet losses (see `triplet_margin_loss`); an empty set reduces to a 0 that keeps the graph."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean() if losses.numel() else losses.sum()
    if reduction == "mean_active":
        active = losses > 0
        return losses.sum() / active.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


class TripletMarginLoss(nn.Module):
    """Margin loss over the triplets a miner picks from a batch.

    Args:
        margin: required gap between the positive and the negative distance.
        distance: "cosine" (1 - cos) or "euclidean".
        miner: a module mapping (distances, anchor_labels, candidate_labels) to index triplets; None
            means every valid triplet (`AllTripletsMiner`).
        reduction: see `triplet_margin_loss`.

    Shape:
        - embeddings: (N, D) anchors; labels: (N,)
        - candidates: (M, D) positives/negatives (default: `embeddings` themselves); candidate_labels: (M,)
        - Output: ()

    After each call, `last_stats` holds the number of triplets and the share with a non-zero loss.
    """

    def __init__(
        self, margin: float = 0.2, distance: str = "cosine", miner: Optional[nn.Module] = None, reduction: str = "mean"
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if reduction not in REDUCTIONS or reduction == "none":
            raise ValueError(f"reduction must be one of mean, mean_active, sum; got {reduction!r}")
        self.margin = float(margin)
        self.distance = distance
        self.miner = miner if miner is not None else AllTripletsMiner()
        self.reduction = reduction
        self.last_stats = {"triplets": 0.0, "active": 0.0}

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        candidates: Optional[torch.Tensor] = None,
        candidate_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        candidates, candidate_labels = _candidates_or_self(embeddings, labels, candidates, candidate_labels)
        distances = pairwise_distance(embeddings, candidates, self.distance)
        anchors, positives, negatives = self.miner(distances.detach(), labels, candidate_labels)
        losses = torch.relu(distances[anchors, positives] - distances[anchors, negatives] + self.margin)
        self.last_stats = {
            "triplets": float(losses.numel()),
            "active": float((losses > 0).float().mean()) if losses.numel() else 0.0,
        }
        return reduce_losses(losses, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, reduction={self.reduction!r}"


class InfoNCELoss(nn.Module):
    """Contrastive (InfoNCE) loss: each anchor classifies its positives among all the batch's candidates.

    loss(a) = logsumexp_{c in batch} s(a, c) / t - logsumexp_{c with label(a)} s(a, c) / t, s the cosine.
    Every candidate of another label is a negative, every one of the anchor's label a positive (with
    street copies, one product can sit in a batch twice); an anchor without a positive is skipped.
    Unlike batch-hard triplets, every negative pulls with a weight that grows with its similarity, so a
    batch never gives a zero gradient while the embedding is still collapsed.

    Args:
        temperature: t; smaller sharpens the softmax onto the hardest negatives.

    Shape:
        - embeddings: (N, D) anchors; labels: (N,)
        - candidates: (M, D) (default: `embeddings` themselves, the diagonal then left out); candidate_labels: (M,)
        - Output: () mean over the anchors with a positive (0, keeping the graph, when none has one).

    After each call, `last_stats` holds "batch_miss": the share of anchors whose most similar candidate is a
    negative (falls as training learns the batch).

    Example:
        >>> a = torch.tensor([[1.0, 0.0]]); c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(float(InfoNCELoss(1.0)(a, torch.tensor([0]), c, torch.tensor([0, 1]))), 4)  # log(1 + e^-1)
        0.3133
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.last_stats = {"batch_miss": 0.0}

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        candidates: Optional[torch.Tensor] = None,
        candidate_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        same_set = candidates is None
        candidates, candidate_labels = _candidates_or_self(embeddings, labels, candidates, candidate_labels)
        logits = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(candidates, dim=1).T
        logits = logits / self.temperature
        positive, _ = _label_masks(labels, candidate_labels)
        # A finite stand-in for -inf: a row with nothing left would give NaN gradients, even when unused.
        excluded = torch.finfo(logits.dtype).min / 2
        if same_set:  # an embedding is not its own positive, nor a candidate at all
            eye = torch.eye(len(labels), dtype=torch.bool, device=logits.device)
            positive = positive & ~eye
            logits = logits.masked_fill(eye, excluded)
        has_positive = positive.any(dim=1)
        every = torch.logsumexp(logits, dim=1)
        positives = torch.logsumexp(logits.masked_fill(~positive, excluded), dim=1)
        losses = (every - positives)[has_positive]
        with torch.no_grad():
            top = logits.argmax(dim=1)
            missed = ~positive[torch.arange(len(top), device=top.device), top]
            self.last_stats = {"batch_miss": float(missed[has_positive].float().mean()) if losses.numel() else 0.0}
        return losses.mean() if losses.numel() else embeddings.sum() * 0.0

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# ---- sampling ----------------------------------------------------------------------------------------


def seeded_batches(n_items: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> List[torch.Tensor]:
    """One epoch of shuffled index batches, a pure function of (seed, epoch) so a resumed run sees the same ones.

    With `drop_last`, a last batch smaller than `batch_size` is dropped (mined batches want a full
    set of negatives), except when it would be the only one.

    Example:
        >>> first = [b.tolist() for b in seeded_batches(5, 2, seed=0, epoch=0)]
        >>> first == [b.tolist() for b in seeded_batches(5, 2, 0, 0)]
        True
    """
    if n_items < 1 or batch_size < 1:
        raise ValueError(f"need n_items >= 1 and batch_size >= 1, got {n_items} and {batch_size}")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(n_items, generator=generator)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
