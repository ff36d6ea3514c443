"""Fit a fusion's branch weights on training pairs: `street2shop train descriptor fused`.

Nothing is back-propagated: the branches stay as they are (each trained on its own), and the weights are
chosen by a grid over the simplex (steps of `grid_step`) that maximises mAP@20 of person photos against
their products on `calibration_pairs` training pairs, person photos behind the same proxy the fusion will
serve behind (`proxy=`, a Proxy object; the CLI builds it from `--set proxy=hp@...`). The evaluated queries
are never seen. Ties keep the grid point closest to equal weights.

Example:
    >>> branches = "tn@runs/tn-studio/final.pt|tn@runs/tn-street/final.pt"  # doctest: +SKIP
    >>> fused = create_descriptor(f"fused[branches={branches}]")  # doctest: +SKIP
    >>> fused.train_on(load_dataset("viton:../shared/data/viton"), "runs/fused", proxy=hp)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from retrieval.batching import iter_batches
from retrieval.datasets.viton_street import street_training_pairs
from retrieval.descriptors.fused import FusedDescriptor
from retrieval.metrics import average_precision_at_k
from retrieval.proxy_stage import proxy_input_size
from retrieval.training.run import CHECKPOINT_VERSION, atomic_torch_save
from retrieval.training.trainers import TrainingJob, register_trainer

log = logging.getLogger(__name__)
# Calibration street copies come from seeds STREET_TRAINING_SEED + this + the run's seed: never the draws a
# descriptor trained on (`street_copies` of tn use STREET_TRAINING_SEED + seed + c for small c).
CALIBRATION_STREET_SEED = 500


@dataclass(frozen=True)
class FusedTrainConfig:
    """Options of `train_fused`.

    Attributes:
        proxy: "none" or the Proxy object the person photos go through (the fusion's serving proxy).
        branch_proxies: for a fusion whose branches name their own proxies (`FusedDescriptor.branch_proxies`), one
            Proxy object or None (the serving proxy) per branch; None otherwise.
        calibration_pairs: training pairs the weights are chosen on (a seeded sample; 0 = all).
        street_copies: street-condition versions of the training pairs added to the calibration pool (drawn
            from other seeds than the copies descriptors train on), so that weights for a street pipeline are not
            chosen on studio photos alone.
        grid_step: the simplex grid's step (0.1: 11 points for 2 branches, 66 for 3).
        batch_size: images embedded together.
    """

    proxy: Any = "none"
    branch_proxies: Any = None
    calibration_pairs: int = 1000
    street_copies: int = 0
    grid_step: float = 0.1
    batch_size: int = 32


def simplex_grid(n_branches: int, step: float) -> np.ndarray:
    """Every weight vector of `n_branches` non-negative multiples of `step` summing to 1, (G, n).

    Example:
        >>> simplex_grid(2, 0.5).tolist()
        [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    """
    parts = int(round(1.0 / step))
    if parts < 1 or abs(parts * step - 1.0) > 1e-6:
        raise ValueError(f"grid_step must divide 1 (e.g. 0.1, 0.05), got {step}")
    points = [c for c in itertools.product(range(parts + 1), repeat=n_branches) if sum(c) == parts]
    return np.asarray(points, dtype=np.float64) / parts


def fused_map_at_20(similarities: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mAP@20 of each weight vector: similarities (n, Q, G) per branch, targets (Q,) the true gallery column,
    weights (W, n) -> (W,). One relevant product per query, ties counted against the query."""
    ones = np.ones(len(targets), dtype=np.int64)
    out = np.empty(len(weights))
    for i, w in enumerate(weights):  # one (Q, G) score matrix at a time: W x Q x G would not fit for 3+ branches
        scores = np.tensordot(w, similarities, axes=1)
        true = scores[np.arange(len(targets)), targets][:, None]
        ranks = (scores >= true).sum(axis=1)  # the true product itself counts once: rank >= 1
        out[i] = average_precision_at_k(ranks[:, None] == np.arange(1, 21)[None, :], ones, 20).mean()
    return out


@torch.no_grad()
def _branch_vectors(
    fused: FusedDescriptor,
    paths: Sequence[str],
    proxies: Sequence[Any],
    batch_size: int,
    progress: bool,
    label: str,
    catalog: bool = False,
) -> List[np.ndarray]:
    """Each branch's (N, D_i) vectors of image files, branch i behind ``proxies[i]`` (None: the photos as they
    are; ``catalog``: catalog photos, through each branch's `embed_catalog`). A proxy shared by branches runs once
    per batch."""
    size = tuple(fused.input_spec.size)
    read = max((proxy_input_size(proxy, size) for proxy in proxies), key=lambda hw: hw[0] * hw[1])
    parts: List[List[np.ndarray]] = [[] for _ in fused.branches]
    with tqdm(total=len(paths), desc=f"fused: {label}", unit="img", disable=not progress, leave=False) as bar:
        for batch in iter_batches(list(paths), read, batch_size):
            for i, vectors in enumerate(fused.branch_vectors_behind(batch.to(fused.device), proxies, catalog=catalog)):
                parts[i].append(vectors.float().cpu().numpy())
            bar.update(len(batch))
    return [np.concatenate(p) for p in parts]


def _serving_proxy(proxy: Any, fused: FusedDescriptor) -> Any:
    """A Proxy object on the fusion's device, or None for "none"; a proxy name is refused (layers: see below)."""
    if isinstance(proxy, str):
        if proxy != "none":
            raise ValueError(
                f"fused.train_on takes proxy= as a Proxy object, not the name {proxy!r} (the CLI and `bench "
                "--train` build it)"
            )
        return None
    return None if proxy is None else proxy.to(fused.device).eval()


@register_trainer("fused", config=FusedTrainConfig)
def train_fused(fused: FusedDescriptor, job: TrainingJob, config: FusedTrainConfig) -> Path:
    """Choose the branch weights on `job.dataset.train`'s pairs (see the module docstring); return final.pt.

    Args:
        fused: the fusion, its branches built (trained weights loaded); its weights are set in place.
        job: the data set with training pairs, the run directory, the seed (the calibration sample).
        config: the options.
    """
    started = time.perf_counter()
    train = job.dataset.train
    if train is None or train.empty:
        raise ValueError(f"{job.dataset.name} has no training pairs to fit the fusion's weights on")
    proxy = _serving_proxy(config.proxy, fused)
    proxies = [proxy] * len(fused.branches)
    if fused.has_branch_proxies:
        if config.branch_proxies is None or len(config.branch_proxies) != len(fused.branches):
            raise ValueError(
                "this fusion's branches name proxies of their own: train_on needs branch_proxies=, one Proxy or None "
                "per branch (the CLI and `bench --train` build them with generation.proxies.proxy_training_options)"
            )
        proxies = [proxy if own is None else _serving_proxy(own, fused) for own in config.branch_proxies]
    if config.street_copies:
        # drawn apart from the copies descriptors train on (seeds STREET_TRAINING_SEED + seed + c)
        train = street_training_pairs(job.dataset, int(config.street_copies), seed=CALIBRATION_STREET_SEED + job.seed)
    pairs = train.drop_duplicates("person_image").reset_index(drop=True)
    if config.calibration_pairs and len(pairs) > config.calibration_pairs:
        pairs = pairs.sample(n=int(config.calibration_pairs), random_state=int(job.seed)).reset_index(drop=True)
    products = pairs.drop_duplicates("product_id").reset_index(drop=True)
    targets = pd.Index(products["product_id"].astype(str)).get_indexer(pairs["product_id"].astype(str))
    fused.eval()
    queries = _branch_vectors(fused, pairs["person_image"], proxies, config.batch_size, job.progress, "queries")
    gallery = _branch_vectors(
        fused, products["product_image"], [None] * len(proxies), config.batch_size, job.progress, "products", True
    )
    similarities = np.stack([q @ g.T for q, g in zip(queries, gallery)])  # (n, Q, G)
    grid = simplex_grid(len(fused.branches), float(config.grid_step))
    scores = fused_map_at_20(similarities, targets, grid)
    equal = np.full(grid.shape[1], 1.0 / grid.shape[1])
    best = max(range(len(grid)), key=lambda i: (round(float(scores[i]), 9), -np.abs(grid[i] - equal).sum()))
    fused.fusion_weights.copy_(torch.as_tensor(grid[best], dtype=torch.float32))
    singles = {f"branch {i}": float(scores[int(np.argmax(grid[:, i]))]) for i in range(grid.shape[1])}
    log.info(
        "fused: weights %s, calibration mAP@20 %.4f (equal weights %.4f; %s) on %d pairs",
        grid[best].round(3).tolist(),
        scores[best],
        float(fused_map_at_20(similarities, targets, equal[None])[0]),
        ", ".join(f"{k} {v:.4f}" for k, v in singles.items()),
        len(pairs),
    )
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped = fused.shipped_state_prefixes
    weights = {k: v.cpu() for k, v in fused.state_dict().items() if not (shipped and k.startswith(shipped))}
    options = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("proxy", "branch_proxies")
    }
    final = out_dir / "final.pt"
    atomic_torch_save(
        {
            "version": CHECKPOINT_VERSION,
            "config": {"train": options, "proxy": getattr(proxy, "name", "none"), "dataset": job.dataset.name},
            "state_dict": weights,
            "descriptor": fused.name,
            "descriptor_conf": fused.config(),
            "calibration": {
                "pairs": len(pairs),
                "grid": grid.tolist(),
                "mAP@20": scores.tolist(),
                "chosen": grid[best].tolist(),
                "seconds": time.perf_counter() - started,
            },
        },
        final,
    )
    return final
