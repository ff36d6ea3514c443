"""Training of the TN descriptor (`retrieval.descriptors.tn`), through `retrieval.training.TrainingRun`.

    - anchors: person photos of the training pairs, optionally passed through a proxy first
      (`proxy=` a Proxy instance: the descriptor can be trained on the outputs of any proxy, and
      should then be queried behind the same proxy; the caller builds it, e.g. with
      `generation.proxies.proxy_training_options`, since retrieval/ cannot look proxies up);
      positives: their products; negatives: the other products of the batch, mined by `retrieval.triplet`
      (batch-hard by default), in both
      directions (street -> shop and shop -> street) when `symmetric`. `loss="infonce"` replaces the
      mined triplets by a contrastive loss over the whole batch (`retrieval.triplet.InfoNCELoss`).
    - the frozen part of the backbone runs once per run: its maps (block 15, or the block before the
      fine-tuned ones) are cached as float16 chunks under `<out_dir>/features/` (about 0.23 GB for
      VITON's 3,600 training pairs), so an interrupted run resumes without recomputing them; with a
      frozen backbone the head maps are then computed once into memory (about 0.9 GB), and an
      epoch of the head costs seconds.
    - augmentation on the cached maps: random location dropout before pooling.
    - validation: every `1 / val_fraction`-th pair of a seeded order (by pair id) is held out; recall@1
      and mAP@20 of person -> product retrieval among the held-out products are logged per epoch in
      losses.csv (columns val_recall@1 and val_mAP@20, the latest evaluation on every row; the first
      is the untrained form) and the best epoch by val mAP@20 is what final.pt holds.
    - time budget: the job's `time_budget_s` is wall-clock for the whole call. Caching the maps is most
      of the cost, so at most `extract_budget_share` of the budget goes to it: when that share runs out
      the run trains on the pairs cached so far (a seeded sample of whole chunks), says so, and keeps to
      that set when resumed.

Example:
    >>> tn = create_descriptor("tn")                                   # doctest: +SKIP
    >>> final = tn.train_on(load_dataset("viton:../shared/data/viton"), "runs/tn")  # doctest: +SKIP
    >>> create_descriptor(f"tn@{final}").embed(images).shape           # doctest: +SKIP
    torch.Size([B, 512])
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrieval.batching import load_batch
from retrieval.datasets.viton_street import street_training_pairs
from retrieval.descriptors.tn import TripletNet
from retrieval.metrics import rank_of_truth, single_relevant_metrics
from retrieval.proxy_stage import to_descriptor_input, training_proxy
from retrieval.training.map_cache import cache_chunks, float16_maps
from retrieval.training.run import TrainingRun, atomic_torch_save, load_checkpoint
from retrieval.training.trainers import TrainingJob, register_trainer
from retrieval.triplet import InfoNCELoss, TripletMarginLoss, create_miner, seeded_batches

log = logging.getLogger("street2shop.tn")
LOSSES = ("triplet", "infonce")


@dataclass(frozen=True)
class TNTrainConfig:
    """The training options of `tn` (`street2shop train descriptor tn --set KEY=VALUE`).

    epochs; batch_size (pairs per batch); lr; weight_decay; backbone_lr_scale (of the fine-tuned
    blocks' learning rate); loss ("triplet": margin and miner apply; "infonce": temperature applies);
    margin (cosine distance); miner ("batch_hard", "semi_hard", "all"); temperature (of "infonce");
    symmetric (also shop -> street triplets); location_dropout; val_fraction; proxy ("none" or a
    Proxy object); chunk_pairs and extract_batch_size (the map cache); extract_budget_share (the
    share of the time budget the map cache may use; see the module docstring); street_copies (street-condition
    versions of every training pair added to the pairs, `retrieval.datasets.viton_street.street_training_pairs`).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 0.1
    loss: str = "triplet"
    margin: float = 0.2
    miner: str = "batch_hard"
    temperature: float = 0.05
    symmetric: bool = True
    location_dropout: float = 0.2
    val_fraction: float = 0.1
    proxy: Any = "none"
    chunk_pairs: int = 64
    extract_batch_size: int = 32
    extract_budget_share: float = 0.5
    street_copies: int = 0


# ---- pure functions ----------------------------------------------------------------------------------


def location_keep_mask(
    batch: int, height: int, width: int, drop_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Random location dropout: (B, H, W) bool, True = keep; an image that would lose every location keeps all.

    Example:
        >>> location_keep_mask(2, 3, 2, 0.0, torch.Generator().manual_seed(0)).all().item()
        True
    """
    keep = torch.rand(batch, height, width, generator=generator) >= drop_rate
    empty = ~keep.flatten(1).any(dim=1)
    keep[empty] = True
    return keep


class _BestSnapshot(nn.Module):
    """The best weights so far and the latest validation scores; saved in last.pt so resume keeps them."""

    def __init__(self, trainable: nn.Module):
        super().__init__()
        self.weights = copy.deepcopy(trainable).requires_grad_(False)
        self.register_buffer("score", torch.tensor(float("-inf"), dtype=torch.float64))
        self.register_buffer("epoch", torch.tensor(-2))  # -2: nothing evaluated yet; -1: the untrained form
        self.register_buffer("latest", torch.full((2,), float("nan"), dtype=torch.float64))  # recall@1, mAP@20
        self.register_buffer("best", torch.full((2,), float("nan"), dtype=torch.float64))  # of the kept weights

    @property
    def evaluated(self) -> bool:
        return int(self.epoch) > -2

    def offer(self, trainable: nn.Module, epoch: int, metrics: Optional[Dict[str, float]]) -> bool:
        """Record `metrics` of the weights after `epoch`; keep them when they beat the best (or without validation)."""
        if metrics is None:
            better = True
        else:
            self.latest.copy_(torch.tensor([metrics["recall@1"], metrics["mAP@20"]], dtype=torch.float64))
            better = metrics["mAP@20"] > float(self.score)
            if better:
                self.score.fill_(metrics["mAP@20"])
                self.best.copy_(self.latest)
        if better:
            self.weights.load_state_dict(trainable.state_dict())
            self.epoch.fill_(epoch)
        elif int(self.epoch) == -2:
            self.epoch.fill_(epoch)
        return better


# ---- the network's training side ---------------------------------------------------------------------


def trainable_modules(tn: TripletNet) -> nn.ModuleDict:
    """The modules training optimises (views of the descriptor's own modules, not copies)."""
    parts: Dict[str, nn.Module] = {"head": tn.head}
    k = int(tn.conf["finetune_last_blocks"])
    if k > 0:
        parts["blocks"] = tn.fine_tuned_blocks
        parts["conv_head"] = tn.backbone._conv_head
        parts["bn_head"] = tn.backbone._bn1
    return nn.ModuleDict(parts)


@torch.no_grad()
def training_inputs(tn: TripletNet, trunk_maps: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """What the training steps read, computed once from the cached frozen-trunk maps.

    With a frozen backbone (finetune_last_blocks = 0) that is the 1280-channel head maps in float16:
    the head convolution then runs once per run instead of once per step (4x the memory of the
    trunk maps: about 0.9 GB for VITON's 3,600 training pairs at 256 x 192). With fine-tuned blocks
    it is the trunk maps themselves.
    """
    if int(tn.conf["finetune_last_blocks"]) > 0:
        return trunk_maps
    outs = [
        tn.head_maps(trunk_maps[i : i + batch_size].to(tn.device, torch.float32)).to("cpu", torch.float16)
        for i in range(0, len(trunk_maps), batch_size)
    ]
    return torch.cat(outs).contiguous()


def embed_training_inputs(tn: TripletNet, inputs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`training_inputs` rows (any float dtype) -> (B, dim) embeddings, with gradients for what trains."""
    inputs = inputs.to(tn.device, torch.float32)
    if int(tn.conf["finetune_last_blocks"]) > 0:
        inputs = tn.head_maps(inputs)
    return tn.head(inputs, mask)


def pair_batch_loss(
    tn: TripletNet,
    street: torch.Tensor,
    shop: torch.Tensor,
    labels: torch.Tensor,
    criterion: Union[TripletMarginLoss, InfoNCELoss],
    symmetric: bool = True,
    masks: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The training loss of one batch of pairs (street i wears product i; `labels` are product ids).

    Shape:
        - street, shop: (B, C, h, w) `training_inputs` rows; labels: (B,) long.
        - masks: location-dropout masks (B, H/32, W/32) for each side, or None.
        - Output: scalar loss, and a dict of floats for the log.
    """
    street = embed_training_inputs(tn, street, masks[0])
    shop = embed_training_inputs(tn, shop, masks[1])
    labels = labels.to(tn.device)
    to_shop = criterion(street, labels, shop, labels)
    # triplets log the share of active triplets; InfoNCE the share of anchors whose nearest candidate is wrong
    key = "active" if "active" in criterion.last_stats else "batch_miss"
    stats = {"loss_street2shop": float(to_shop.detach()), key: criterion.last_stats[key]}
    loss = to_shop
    if symmetric:
        to_street = criterion(shop, labels, street, labels)
        stats["loss_shop2street"] = float(to_street.detach())
        loss = 0.5 * (to_shop + to_street)
    stats = {"loss": float(loss.detach()), **stats}
    return loss, stats


@torch.no_grad()
def validate(
    tn: TripletNet, street: torch.Tensor, shop: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> Dict[str, float]:
    """recall@1 and mAP@20 of street -> shop retrieval among the distinct products of a held-out slice.

    street, shop: `training_inputs` rows of the held-out pairs; labels: their product ids (B,).
    """
    street = torch.cat(
        [embed_training_inputs(tn, street[i : i + batch_size]) for i in range(0, len(street), batch_size)]
    )
    shop = torch.cat([embed_training_inputs(tn, shop[i : i + batch_size]) for i in range(0, len(shop), batch_size)])
    labels = labels.to(street.device)
    unique_labels, first = _first_occurrences(labels)
    gallery = shop[first]
    truth = torch.searchsorted(unique_labels, labels)
    return single_relevant_metrics(rank_of_truth(street @ gallery.T, truth), k=20)


# ---- the trainer -------------------------------------------------------------------------------------


@register_trainer("tn", config=TNTrainConfig)
def train_tn(tn: TripletNet, job: TrainingJob, config: TNTrainConfig) -> Path:
    """Train on `job.dataset.train`'s pairs (see the module docstring); return `<job.out_dir>/final.pt`.

    Args:
        tn: the descriptor, trained in place; it then holds the weights of the best epoch.
        job: the data set (a RetrievalSet with training pairs: pair_id, person_image, product_image,
            product_id), the run directory (last.pt resumes; features/ holds the map cache), the seed (the
            held-out slice, the batch order and the augmentation), the time budget (wall-clock seconds for
            the whole call; stops cleanly, checkpointed, when spent) and progress bars.
        config: the training options.
    """
    dataset, out_dir, seed, progress = job.dataset, job.out_dir, job.seed, job.progress
    # Not dataclasses.asdict: that would deep-copy a proxy network.
    tconf = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    pairs = _training_pairs(dataset)
    if tconf["street_copies"]:
        pairs = street_training_pairs(dataset, int(tconf["street_copies"]), seed=seed)
    proxy, proxy_label = training_proxy(tconf["proxy"], tn.name, tn.device)
    tconf["proxy"] = proxy_label["name"]
    if not 0.0 <= float(tconf["val_fraction"]) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {tconf['val_fraction']}")
    if tconf["miner"] not in ("batch_hard", "semi_hard", "all"):
        raise ValueError(f"miner must be batch_hard, semi_hard or all, got {tconf['miner']!r}")
    if tconf["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {tconf['loss']!r}")
    tn.eval()  # BatchNorm statistics stay frozen, also in fine-tuned blocks
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).numpy()
    trainable = trainable_modules(tn)
    best = _BestSnapshot(trainable)
    head_params = list(tn.head.parameters())
    groups = [{"params": head_params, "lr": float(tconf["lr"])}]
    backbone_params = [p for name, module in trainable.items() if name != "head" for p in module.parameters()]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": float(tconf["lr"]) * float(tconf["backbone_lr_scale"])})
    optimizer = torch.optim.AdamW(groups, weight_decay=float(tconf["weight_decay"]))
    run_config = {
        "descriptor": tn.name,
        "descriptor_conf": tn.config(),
        # more epochs may extend a run; street_copies and the InfoNCE options only when used, so older runs'
        # configs still match
        "train": {k: v for k, v in tconf.items() if k != "epochs" and not _unused_option(k, tconf)},
        "proxy": proxy_label,
        "dataset": dataset.name,
        "pairs": len(pairs),
        "pairs_sha1": _pairs_digest(pairs),
        "seed": seed,
    }
    run = TrainingRun(
        out_dir,
        {"trainable": trainable, "best": best},
        {"adamw": optimizer},
        run_config,
        **job.run_options(f"train {tn.name}"),
    )
    cached = _cached_maps(tn, pairs, order, proxy, out_dir / "features", run, tconf, progress)
    positions = cached["positions"]
    is_val = _held_out(positions, float(tconf["val_fraction"]))
    labels = torch.as_tensor(pd.factorize(pairs["product_id"].astype(str))[0])[
        torch.as_tensor(order[positions.numpy()])
    ]
    train_idx, val_idx = torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)
    if len(train_idx) < 2:
        raise ValueError(
            f"tn needs at least 2 training pairs, got {len(train_idx)} "
            f"(of {len(pairs)}, with val_fraction {tconf['val_fraction']})"
        )
    street, shop = training_inputs(tn, cached.pop("street")), training_inputs(tn, cached.pop("shop"))
    has_val = len(val_idx) > 0

    def evaluate() -> Optional[Dict[str, float]]:
        return validate(tn, street[val_idx], shop[val_idx], labels[val_idx]) if has_val else None

    if not best.evaluated:
        best.offer(trainable, -1, evaluate())
        _log_validation(-1, best)
    criterion = (
        InfoNCELoss(float(tconf["temperature"]))
        if tconf["loss"] == "infonce"
        else TripletMarginLoss(float(tconf["margin"]), "cosine", create_miner(tconf["miner"]))
    )
    batch_size = min(int(tconf["batch_size"]), len(train_idx))
    with torch.no_grad():  # the location-dropout masks have the head maps' size
        probe = street[:1].to(tn.device, torch.float32)
        h, w = (probe if int(tn.conf["finetune_last_blocks"]) == 0 else tn.head_maps(probe)).shape[-2:]
    optimizer_steps = run.step
    try:
        for epoch in run.epochs(int(tconf["epochs"])):
            batches = seeded_batches(len(train_idx), batch_size, seed, epoch)
            for i, batch in enumerate(run.skip_done(batches), start=run.step_in_epoch):
                rows = train_idx[batch]
                generator = torch.Generator().manual_seed(_step_seed(seed, epoch, i))
                rate = float(tconf["location_dropout"])
                masks = tuple(location_keep_mask(len(rows), h, w, rate, generator).to(tn.device) for _ in range(2))
                loss, stats = pair_batch_loss(
                    tn, street[rows], shop[rows], labels[rows], criterion, bool(tconf["symmetric"]), masks
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                optimizer_steps += 1
                latest = best.latest.tolist()
                run.log({**stats, "val_recall@1": latest[0], "val_mAP@20": latest[1]})
                if run.out_of_time:
                    break
            if run.step_in_epoch >= len(batches):  # only whole epochs are judged, so resuming changes nothing
                best.offer(trainable, epoch, evaluate())
                _log_validation(epoch, best)
    except KeyboardInterrupt:
        if run.step == optimizer_steps:  # not in the middle of a step: this state resumes exactly
            run.save()
        log.warning(
            "interrupted at step %d; run the same command again to resume from %s", run.step, out_dir / "last.pt"
        )
        raise
    return _finish(
        tn,
        run,
        trainable,
        best,
        extra={
            "best_epoch": int(best.epoch),
            "val_recall@1": float(best.best[0]) if has_val else None,
            "val_mAP@20": float(best.best[1]) if has_val else None,
            "train_pairs": len(train_idx),
            "val_pairs": len(val_idx),
            "proxy": proxy_label,
        },
    )


def _finish(
    tn: TripletNet, run: TrainingRun, trainable: nn.ModuleDict, best: _BestSnapshot, extra: Dict[str, Any]
) -> Path:
    """final.pt = the best epoch's weights; last.pt keeps the latest ones (so a longer rerun continues them)."""
    latest = {k: v.clone() for k, v in trainable.state_dict().items()}
    trainable.load_state_dict(best.weights.state_dict())
    shipped = tn.shipped_state_prefixes
    weights = {k: v.clone() for k, v in tn.state_dict().items() if not (shipped and k.startswith(shipped))}
    trainable.load_state_dict(latest)
    final = run.finish(weights=weights, extra={"descriptor": tn.name, "descriptor_conf": tn.config(), **extra})
    trainable.load_state_dict(best.weights.state_dict())
    log.info("tn: best epoch %d (val mAP@20 %.4f) -> %s", int(best.epoch), float(best.score), final)
    return final


# ---- the map cache -----------------------------------------------------------------------------------


@torch.no_grad()  # also the proxy
def _cached_maps(
    tn: TripletNet,
    pairs: pd.DataFrame,
    order: np.ndarray,
    proxy: Optional[Callable],
    folder: Path,
    run: TrainingRun,
    tconf: Dict[str, Any],
    progress: bool,
) -> Dict[str, torch.Tensor]:
    """Frozen-trunk maps of the pairs in `order`, chunk by chunk, cached under `folder` (`cache_chunks`).

    A chunk file `chunk-NNNNN.pt` holds {"street", "shop"}: (n, C, h, w) float16 maps of its pairs.
    `complete.json` records how many chunks the first run cached, so that a resumed run keeps to them.

    Returns street (N, C, h, w) float16 (after the proxy), shop likewise, and positions (N,) long:
    indices into `order` of the cached pairs (all of them unless the time budget cut the cache).
    """
    folder.mkdir(parents=True, exist_ok=True)
    size = int(tconf["chunk_pairs"])
    image_size = tuple(tn.conf["image_size"])
    extract_batch_size = int(tconf["extract_batch_size"])
    n_chunks = math.ceil(len(order) / size)
    complete = folder / "complete.json"
    n_use = int(json.loads(complete.read_text())["chunks"]) if complete.exists() else None

    def loaders(c: int) -> Tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        rows = pairs.iloc[order[c * size : (c + 1) * size]]
        street_paths, shop_paths = list(rows["person_image"]), list(rows["product_image"])
        return (lambda: load_batch(street_paths, image_size)), (lambda: load_batch(shop_paths, image_size))

    def compute(c: int, inputs: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, torch.Tensor]:
        street_images, shop_images = inputs
        if proxy is not None:
            street_images = to_descriptor_input(proxy(street_images.to(tn.device)), image_size)

        def batches(images: torch.Tensor):
            return (images[i : i + extract_batch_size] for i in range(0, len(images), extract_batch_size))

        return {
            "street": float16_maps(tn.frozen_maps, batches(street_images), tn.device),
            "shop": float16_maps(tn.frozen_maps, batches(shop_images), tn.device),
        }

    parts = cache_chunks(
        n_chunks if n_use is None else n_use,
        lambda c: folder / f"chunk-{c:05d}.pt",
        compute,
        save=atomic_torch_save,
        load=lambda path: load_checkpoint(path, map_location="cpu"),
        run=run,
        budget_share=float(tconf["extract_budget_share"]) if n_use is None else None,
        prefetch=loaders,
        label="tn: caching backbone maps",
        progress=progress,
    )
    if n_use is None:
        n_use = len(parts)
        complete.write_text(json.dumps({"chunks": n_use, "of": n_chunks}))
        if n_use < n_chunks:
            log.warning(
                "tn: the time budget allowed caching %d of %d chunks (%d of %d pairs); training on those, "
                "and a resumed run keeps to them",
                n_use,
                n_chunks,
                min(n_use * size, len(order)),
                len(order),
            )
    return {
        "street": torch.cat([p["street"] for p in parts]),
        "shop": torch.cat([p["shop"] for p in parts]),
        "positions": torch.arange(min(n_use * size, len(order))),
    }


# ---- helpers -----------------------------------------------------------------------------------------


def _unused_option(key: str, tconf: Dict[str, Any]) -> bool:
    """Whether option `key` is left out of the run config: newer options at their off value, so that runs
    from before them keep matching their checkpoints on resume."""
    if key == "street_copies":
        return not tconf[key]
    if key in ("loss", "temperature"):
        return tconf["loss"] == "triplet"
    return False


def _training_pairs(dataset) -> pd.DataFrame:
    pairs = getattr(dataset, "train", None)
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"{getattr(dataset, 'name', dataset)} has no training pairs to train tn on")
    missing = [c for c in ("person_image", "product_image", "product_id") if c not in pairs.columns]
    if missing:
        raise ValueError(f"training pairs lack column(s) {missing}; found {list(pairs.columns)}")
    return pairs.reset_index(drop=True)


def _pairs_digest(pairs: pd.DataFrame) -> str:
    digest = hashlib.sha1()
    for row in pairs[["person_image", "product_image", "product_id"]].astype(str).itertuples(index=False):
        digest.update("\t".join(row).encode() + b"\n")
    return digest.hexdigest()[:16]


def _held_out(positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """Position i of the seeded order is held out when floor((i + 1) f) > floor(i f): a share f of any prefix."""
    i = positions.double()
    return torch.floor((i + 1) * fraction) > torch.floor(i * fraction)


def _first_occurrences(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct labels and, for each, the index of its first occurrence."""
    unique, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    positions = torch.arange(len(labels), device=labels.device)
    first = torch.full((len(unique),), len(labels), dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(step)) % (2**63)


def _log_validation(epoch: int, best: _BestSnapshot) -> None:
    recall, map20 = best.latest.tolist()
    if not math.isnan(map20):
        what = "untrained" if epoch < 0 else f"epoch {epoch}"
        log.info(
            "tn: %s: val recall@1 %.4f, mAP@20 %.4f%s",
            what,
            recall,
            map20,
            " (best)" if int(best.epoch) == epoch else "",
        )
