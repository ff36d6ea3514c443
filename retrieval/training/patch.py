"""Training of the learned patch descriptors `l2net` and `lfnet` (`retrieval.descriptors.learned_patch`).

Three objectives, each with its weight (`L2NetTrainConfig`):

- ``homography_weight`` (default 1): a homography loss on product photos and random homographies of them
  (with a photometric change), patch to patch: `l2net_homography_loss` (HardNet loss at DoG keypoints)
  or `lfnet_homography_loss` (LF-Net's score-map loss + HardNet loss at refined KeyNet peaks);
- ``garment_pairs_weight``: product patches against the garment worn in the pair's street photo
  (`retrieval.patches.garment_patch_pairs`, form ``garment_loss``);
- ``vlad_weight``: end to end through a soft-assignment VLAD of whole images, street side against
  product (`vlad_loss`), the aggregate the engine searches with.

One registered trainer, `train_patch_descriptor`, runs both; lfnet adds its KeyNet to the trained modules,
its own homography loss (`MODEL_TRAINING`) and its options (`LFNetTrainConfig`).

The losses, and the patch-pair and VLAD glue they need, are in `retrieval.training.patch_losses`;
this module holds the options, the step and the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from kornia.color import rgb_to_grayscale

from retrieval.batching import load_batch, sample_paths
from retrieval.descriptors.learned_patch import FIT_STATE_PREFIXES, LearnedPatchDescriptor
from retrieval.patches import (
    garment_patch_pairs,
    load_garment_pair_batch,
    photometric_jitter,
    random_homographies,
    warp_images,
)
from retrieval.training.patch_losses import (
    GARMENT_LOSSES,
    VLAD_ANCHORS,
    SoftVLADHead,
    initial_vlad_head,
    l2net_homography_loss,
    lfnet_homography_loss,
    patch_pair_loss,
    vlad_loss,
)
from retrieval.training.run import TrainingRun
from retrieval.training.trainers import TrainingJob, register_trainer


@dataclass(frozen=True)
class L2NetTrainConfig:
    """Training options of `l2net` (not part of the model's conf or fingerprint); CLI flags override.

    On the project's 2-core CPU a step of 8 photos (~150 pairs, 300 patches through the network forward
    and backward, in bfloat16) took 1.3 s with another job running, so the default two epochs over
    VITON's 3,639 training photos (910 steps) take about 20 minutes.
    """

    epochs: int = 2
    batch_size: int = 8
    pairs_per_image: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    margin: float = 1.0
    max_images: Optional[int] = 4000
    # Cross-domain pairs (`retrieval.patches.garment_patch_pairs`): each step also matches patches of
    # the product photos with the garment worn in their street photos; that loss (`garment_loss`) is
    # added with this weight (0: homographies of product photos only). On by default: trained on
    # homographies alone the network matches patches far better (held-out FPR95 0.070 -> 0.0004)
    # yet retrieves worse than untrained (300-product val subset, raw VLAD, mAP@20 none/hp
    # 0.198/0.230 against 0.201/0.299); with these defaults it retrieves better (full val split,
    # 0.157/0.191 against 0.120/0.180) and matches patches as the untrained one does (FPR95 0.066).
    garment_pairs_weight: float = 1.0
    garment_pairs_per_image: int = 24
    # "hardnet"/"infonce": patch to patch at the same box position; "image": the worn garment's patches,
    # averaged, against the product's, averaged (InfoNCE over the batch's garments; no positions needed)
    garment_loss: str = "infonce"
    garment_temperature: float = 0.1
    # Weight of the homography patch loss; 0 leaves it out (and its cost).
    homography_weight: float = 1.0
    # End to end through the aggregation (`vlad_loss`): the street photo's soft-assignment VLAD must pick
    # its own product's VLAD among the batch's products (InfoNCE), the objective retrieval is scored on.
    vlad_weight: float = 0.0
    vlad_keypoints: int = 64  # random subset of each image's keypoints per step (cost is linear in it)
    vlad_anchors: str = "both"  # street side: "photo" (raw), "cutout" (garment on white, as hp), "both" (coin flip)
    vlad_temperature: float = 0.1
    vlad_init_images: int = 64  # training photos whose descriptors seed the codebook (k-means)
    # Forward and backward in bfloat16 (torch.autocast): about 2x faster on CPUs with AVX512-BF16 or AMX
    # (1.24 s against 2.34 s for 1,024 patches here), and on GPUs; the aggregation and losses stay float32.
    bfloat16: bool = True
    checkpoint_every_s: float = 120.0  # how often last.pt is written (not in the run's config)


@dataclass(frozen=True)
class LFNetTrainConfig(L2NetTrainConfig):
    """`l2net`'s options with other defaults, plus LF-Net's detector training.

    KeyNet's forward and backward over both full views of 4 photos cost about as much as the patch
    network on their ~120 homography and ~85 garment pairs: a step took 1.75 s on the project's
    2-core CPU (bfloat16, another job running), so the default epoch over 640 photos (160 steps)
    takes about 5 minutes.
    """

    epochs: int = 1
    batch_size: int = 4
    pairs_per_image: int = 32
    max_images: Optional[int] = 640
    peaks_per_image: int = 64  # keypoints of LF-Net's clean target map g(w(S)) per view
    target_sigma: float = 1.0
    refine_window: int = 5
    image_loss_weight: float = 1.0


# A homography loss: (model, grey_a, grey_b, homographies, generator, config) -> (loss or None, logs).
HomographyLoss = Callable[..., Tuple[Optional[torch.Tensor], Dict[str, float]]]


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, step): a resumed run draws the same homographies."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


# ---- the loop ----------------------------------------------------------------------------------
def step_terms(
    model: LearnedPatchDescriptor,
    batch,
    worn_pairs: bool,
    head: Optional[SoftVLADHead],
    generator: torch.Generator,
    config: L2NetTrainConfig,
    homography_loss: HomographyLoss,
) -> Tuple[list, Dict[str, float]]:
    """The weighted loss terms of one training step, [(weight, loss or None)], and what to log.

    `batch` holds training-pair rows when the garment or VLAD objectives need the street photos
    (`worn_pairs`), else product photo paths.
    """
    size, device = tuple(model.conf["image_size"]), model.device
    terms, logs = [], {}
    if worn_pairs:
        worn = {k: v.to(device) for k, v in load_garment_pair_batch(batch, size).items()}
        grey_a = worn["product"]
    else:
        grey_a = rgb_to_grayscale(load_batch(batch, size)).to(device)
    if float(config.homography_weight) > 0:
        homographies = random_homographies(len(batch), size[0], size[1], generator).to(device)
        grey_b = photometric_jitter(warp_images(grey_a, homographies), generator)
        loss, logs = homography_loss(model, grey_a, grey_b, homographies, generator, config)
        terms.append((float(config.homography_weight), loss))
    if float(config.garment_pairs_weight) > 0:
        pairs = garment_patch_pairs(
            worn["product"],
            worn["product_mask"],
            worn["person"],
            worn["garment_mask"],
            int(config.garment_pairs_per_image),
            generator,
            min_contrast=float(model.conf["min_patch_contrast"]),
        )
        worn_loss, worn_logs = patch_pair_loss(model, pairs, config, config.garment_loss)
        logs.update({f"garment_{k}": v for k, v in worn_logs.items()})
        terms.append((float(config.garment_pairs_weight), worn_loss))
    if float(config.vlad_weight) > 0:
        aggregate_loss, aggregate_logs = vlad_loss(model, worn, head, generator, config)
        logs.update(aggregate_logs)
        terms.append((float(config.vlad_weight), aggregate_loss))
    return terms, logs


# What each model trains beside the shared objectives: the modules it optimises (checkpoint names, attributes
# of the model) and its homography loss. lfnet adds its KeyNet and LF-Net's score-map loss.
MODEL_TRAINING: Dict[str, Tuple[Tuple[str, ...], HomographyLoss]] = {
    "l2net": (("net",), l2net_homography_loss),
    "lfnet": (("net", "keynet"), lfnet_homography_loss),
}


@register_trainer("l2net", config=L2NetTrainConfig)
@register_trainer("lfnet", config=LFNetTrainConfig)
def train_patch_descriptor(model: LearnedPatchDescriptor, job: TrainingJob, config: L2NetTrainConfig) -> Path:
    """Train a learned patch descriptor's networks (`MODEL_TRAINING`) with the three objectives; return final.pt.

    Each step reads ``batch_size`` training pairs (grey, ``image_size``) and optimises the weighted
    sum (Adam). An epoch is one pass over at most ``max_images`` pairs in a seeded order; every random
    draw comes from (seed, epoch, step), so a resumed run repeats exactly what it would have done.
    Writes ``job.out_dir``/{last.pt, final.pt, losses.csv, losses.png, config.json} via `TrainingRun`
    (it resumes from its last.pt). The codebook and whitening are not learned here: `fit` after training
    (the engine does).

    Args:
        job: its dataset is a RetrievalSet with training pairs (and parse maps for the garment and VLAD
            objectives).
        config: `L2NetTrainConfig`, or `LFNetTrainConfig` for lfnet.
    """
    dataset, seed = job.dataset, job.seed
    module_names, homography_loss = MODEL_TRAINING[model.name]
    if dataset.train is None or dataset.train.empty:
        raise ValueError(f"{dataset.name} has no training pairs to train {model.name} on")
    homography_weight = float(config.homography_weight)
    garment_weight = float(config.garment_pairs_weight)
    vlad_weight = float(config.vlad_weight)
    if config.garment_loss not in GARMENT_LOSSES:
        raise ValueError(f"garment_loss must be one of {GARMENT_LOSSES}, got {config.garment_loss!r}")
    if config.vlad_anchors not in VLAD_ANCHORS:
        raise ValueError(f"vlad_anchors must be one of {VLAD_ANCHORS}, got {config.vlad_anchors!r}")
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
    if config.max_images is not None:
        paths = sample_paths(paths, int(config.max_images), seed)
    steps_per_epoch = -(-len(paths) // int(config.batch_size))
    size = tuple(model.conf["image_size"])

    modules = {name: getattr(model, name) for name in module_names}
    if vlad_weight > 0:
        # Seeded from the first pairs of the training order; a resumed run overwrites it from last.pt.
        init_rows = [rows_by_product[paths[i]] for i in np.random.default_rng([seed, 0]).permutation(len(paths))]
        modules["vlad_head"] = initial_vlad_head(model, init_rows, size, config, seed)
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=float(config.lr), weight_decay=float(config.weight_decay))
    # The run's config (a resume must match it) holds the options, as it always has, but not how often it checkpoints.
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every_s"}
    run = TrainingRun(
        job.out_dir,
        modules,
        {"adam": optimizer},
        config={"descriptor": model.name, "conf": model.config(), "n_images": len(paths), **settings},
        checkpoint_every_s=float(config.checkpoint_every_s),
        steps_per_epoch=steps_per_epoch,
        **job.run_options(f"train {model.name}"),
    )
    model._bfloat16_training = bool(config.bfloat16)
    try:
        _train_epochs(model, run, paths, rows_by_product, worn_pairs, modules, optimizer, config, seed, homography_loss)
    finally:
        model._bfloat16_training = False
    model.eval()
    # Whatever codebook this instance held describes the old network: it must be fitted again.
    model._fitted.fill_(False)
    # final.pt holds no fit state: the codebook and whitening are fitted afterwards, with any
    # n_clusters / pca_dim.
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(FIT_STATE_PREFIXES)}
    return run.finish(weights=weights, extra={"descriptor": model.name})


def _train_epochs(
    model, run, paths, rows_by_product, worn_pairs, modules, optimizer, config, seed, homography_loss
) -> None:
    """`train_patch_descriptor`'s loop: seeded epochs of ``batch_size`` pairs, resumable step by step."""
    batch_size = int(config.batch_size)
    for epoch in run.epochs(int(config.epochs)):
        order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        chunks = [[paths[i] for i in order[start : start + batch_size]] for start in range(0, len(paths), batch_size)]
        for step, chunk in run.skip_done(enumerate(chunks)):
            generator = step_generator(seed, epoch, step)
            for module in modules.values():
                module.train()
            batch = [rows_by_product[p] for p in chunk] if worn_pairs else chunk
            head = modules.get("vlad_head")
            terms, logs = step_terms(model, batch, worn_pairs, head, generator, config, homography_loss)
            terms = [weight * term for weight, term in terms if term is not None]
            if terms:
                optimizer.zero_grad(set_to_none=True)
                torch.stack(terms).sum().backward()
                optimizer.step()
            run.log(logs)
            if run.out_of_time:
                return
