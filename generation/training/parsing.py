"""Training of the hp proxy's garment parser (`generation.parsing.GarmentParser`), apart from the proxy.

    VITON's training pairs (person photo, LIP parse map; garment = labels 5, 6, 7)
      -> read once at the parser's size (`load_parsing_pairs`), random horizontal flips
      -> BCE + Dice (`garment_segmentation_loss`), AdamW with a smaller rate for the fine-tuned encoder
         blocks, linear warm-up then cosine decay (`train_garment_parser`, through `TrainingRun`)
      -> garment IoUs on the validation queries' parse maps, found beside the photos by VITON's layout
         (`validation_parsing_pairs`, `evaluate_garment_masks`), on the studio photos and on their street
         versions (the `viton-street` draws of the run's seed), into final.pt and val_metrics.json

`train_hp` is the trainer of the "hp" proxy (`street2shop train parsing --out runs/parser`); afterwards
the proxy uses the trained parser, as `create_proxy("hp@runs/parser/final.pt")` does.

Example:
    >>> from generation.proxies import create_proxy
    >>> from retrieval.datasets import load_dataset
    >>> final = create_proxy("hp").train_on(load_dataset("viton:../shared/data/viton"), "runs/parser")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from generation.metrics import GarmentIoU
from generation.parsing import GarmentParser, HumanParsingProxy, garment_masks
from generation.training.pairs import require_parse_maps
from retrieval.datasets.viton_street import STREET_TRAINING_SEED
from retrieval.files import write_text_atomic
from retrieval.garments import garment_mask_from_labels
from retrieval.io import read_image, read_mask, resize_image
from retrieval.street_conditions import street_version
from retrieval.training import TrainingJob, TrainingRun, register_trainer

log = logging.getLogger("street2shop.parsing")


@dataclass(frozen=True)
class ParserTrainConfig:
    """Training options of the hp proxy's parser (`street2shop train parsing`, `--set KEY=VALUE`).

    Attributes:
        epochs, batch_size, lr: passes over the pairs, photos per step, the decoder's peak learning rate.
        image_size: (H, W) the parser works at (multiples of 32); decoder_channels: the FPN's width;
            frozen_blocks: Lite0 blocks left at their ImageNet weights (see `GarmentParser`).
        encoder_lr_scale: the fine-tuned encoder blocks learn at lr * this.
        weight_decay: AdamW's.
        val_images: validation photos scored after training (0: none).
        checkpoint_every_s: seconds between two writes of last.pt.
        street_copies: street-condition versions of each training photo added to the training set
            (`retrieval.street_conditions`; drawn with seeds 1000+, apart from the `viton-street:`
            validation variant's).
    """

    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    image_size: Tuple[int, int] = (128, 96)
    decoder_channels: int = 64
    frozen_blocks: int = 5
    encoder_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    val_images: int = 500
    checkpoint_every_s: float = 120.0
    street_copies: int = 0


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient per image, averaged over the batch.

    Shape:
        - logits, target: (B, 1, H, W); target in [0, 1].
        - Output: ().

    Example:
        >>> round(float(dice_loss(torch.full((1, 1, 2, 2), 20.0), torch.ones(1, 1, 2, 2))), 4)
        0.0
    """
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probabilities * target).sum(dim=1)
    total = probabilities.sum(dim=1) + target.sum(dim=1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def garment_segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """BCE + Dice on the garment mask: {"loss": sum, "bce": ..., "dice": ...}.

    BCE trains every pixel; Dice keeps the garment (a fifth of the photo) from being drowned by the
    background and matches the IoU the parser is judged by.

    Shape:
        - logits, target: (B, 1, H, W); target in [0, 1] (soft at edges after downsampling).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = dice_loss(logits, target)
    return {"loss": bce + dice, "bce": bce, "dice": dice}


# --------------------------------------------------------------------------------------------------
# Data and evaluation
# --------------------------------------------------------------------------------------------------


def viton_parse_path(person_image: str) -> Optional[Path]:
    """The parse map of a VITON person photo: <root>/<half>/image/ID_0.jpg -> <root>/<half>/image-parse/ID_0.png.

    Validation queries of `load_viton(..., split="val")` carry only the photo's path; their parse maps
    sit beside it in VITON's layout. Returns None when the file is not there.
    """
    person = Path(person_image)
    if person.parent.name != "image":
        return None
    candidate = person.parent.parent / "image-parse" / f"{person.stem}.png"
    return candidate if candidate.is_file() else None


def _read_photo_and_labels(
    person_image: str, parse: str, street_seed: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """(photo (H, W, 3) uint8, parse map (h, w) uint8) as stored; with `street_seed`, the photo's street version
    (`retrieval.street_conditions.street_version`, image id = the file's stem, as `viton-street` draws it) and its
    parse map moved along with the person."""
    photo, labels = read_image(person_image), read_mask(parse)
    if street_seed is not None:
        street = street_version(photo, labels, street_seed, Path(person_image).stem)
        photo, labels = street.image, street.labels
    return photo, labels


def _read_pair(
    person_image: str, parse: str, size: Tuple[int, int], street_seed: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """(photo (h, w, 3) uint8, garment mask (h, w) uint8) at `size`, street version with `street_seed`
    (`_read_photo_and_labels`)."""
    photo, labels = _read_photo_and_labels(person_image, parse, street_seed)
    image = resize_image(photo, size)
    garment = garment_mask_from_labels(labels).astype(np.uint8) * 255
    # Area-averaged, the mask keeps its boundary as soft targets instead of a jagged nearest-neighbour edge.
    garment = cv2.resize(garment, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return image, garment


def load_parsing_pairs(
    person_images: Sequence[str],
    parses: Sequence[str],
    size: Tuple[int, int],
    workers: int = 2,
    street_copies: int = 0,
    street_seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read person photos and their garment masks at `size`, as compact uint8 tensors (kept in memory).

    `street_copies` > 0 appends that many street-condition versions of every pair (copy c drawn with seed
    `street_seed + c`), so the parser also learns people on clutter, small and off-centre.

    Returns:
        images (N * (1 + street_copies), 3, h, w) uint8 and masks (same N, 1, h, w) uint8 (255 = garment,
        soft at the edges); the studio pairs first.
    """
    if len(person_images) != len(parses) or not len(parses):
        raise ValueError(
            f"need as many parse maps as photos, and at least one: got {len(person_images)} and {len(parses)}"
        )
    jobs = [(photo, parse, None) for photo, parse in zip(person_images, parses)]
    for copy in range(int(street_copies)):
        jobs += [(photo, parse, int(street_seed) + copy) for photo, parse in zip(person_images, parses)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pairs = list(pool.map(lambda job: _read_pair(job[0], job[1], size, job[2]), jobs))
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].contiguous()
    return images, masks


def parsing_pairs(table) -> Tuple[List[str], List[str]]:
    """(person photos, parse maps) of a training-pairs table, skipping pairs without a parse map."""
    rows = table[table["parse"].map(lambda p: isinstance(p, str) and bool(p))]
    return list(rows["person_image"]), list(rows["parse"])


def validation_parsing_pairs(dataset, limit: Optional[int] = None, seed: int = 0) -> Tuple[List[str], List[str]]:
    """(person photo, parse map) of a RetrievalSet's validation queries, parse maps found by VITON's layout.

    A RetrievalSet's queries carry only the photo; `viton_parse_path` finds the parse map beside it.
    `limit` keeps a seeded sample (in query order).
    """
    from retrieval.batching import sample_paths

    photos = list(dict.fromkeys(dataset.queries["image"]))
    found = [(photo, viton_parse_path(photo)) for photo in photos]
    found = [(photo, str(parse)) for photo, parse in found if parse is not None]
    keep = set(sample_paths([photo for photo, _ in found], limit, seed=seed))
    found = [(photo, parse) for photo, parse in found if photo in keep]
    return [photo for photo, _ in found], [parse for _, parse in found]


@torch.no_grad()
def evaluate_garment_masks(
    person_images: Sequence[str],
    parses: Sequence[str],
    parser: Optional[GarmentParser] = None,
    batch_size: int = 32,
    threshold: float = 0.5,
    progress: bool = False,
    street_seed: Optional[int] = None,
) -> Dict[str, float]:
    """Garment IoUs of the parser (or of GrabCut when `parser` is None) against LIP parse maps.

    Masks are compared at the parse maps' own resolution (the photo is resized to it first). With
    `street_seed`, each photo is replaced by its street version (`street_version` with that seed, the draw
    `viton-street` makes with the same seed) and scored against its parse map carried along with the person.

    Returns:
        `generation.metrics.GarmentIoU.compute()`: iou_garment, iou_background, miou,
        mean_image_iou_garment, images.
    """
    metric = GarmentIoU()
    device = next(parser.parameters()).device if parser is not None else torch.device("cpu")
    chunks = range(0, len(person_images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="parser mIoU", unit="batch", leave=False)
    for start in chunks:
        read = [
            _read_photo_and_labels(photo, parse, street_seed)
            for photo, parse in zip(person_images[start : start + batch_size], parses[start : start + batch_size])
        ]
        labels = [lab for _, lab in read]
        photos = [resize_image(photo, lab.shape[:2]) for photo, lab in read]
        # One batch when the parse maps share a size (VITON's do), else photo by photo.
        groups = (
            [list(range(len(photos)))] if len({lab.shape for lab in labels}) == 1 else [[i] for i in range(len(photos))]
        )
        for group in groups:
            batch = (
                torch.from_numpy(np.stack([photos[i] for i in group])).permute(0, 3, 1, 2).float().div(255).to(device)
            )
            predicted = garment_masks(batch, parser, threshold)[:, 0].bool().cpu()
            metric.update(predicted, torch.from_numpy(np.stack([garment_mask_from_labels(labels[i]) for i in group])))
    return metric.compute()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 50) -> float:
    """Linear warm-up then cosine decay to 1% of `base_lr`; a pure function of the step, so resume is exact."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_garment_parser(
    parser: GarmentParser,
    person_images: Sequence[str],
    parses: Sequence[str],
    out_dir,
    *,
    epochs: int = 6,
    batch_size: int = 16,
    lr: float = 1e-3,
    encoder_lr_scale: float = 0.1,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    time_budget_s: Optional[float] = None,
    checkpoint_every_s: float = 120.0,
    validation: Optional[Tuple[Sequence[str], Sequence[str]]] = None,
    run_config: Optional[Dict[str, Any]] = None,
    street_copies: int = 0,
) -> Path:
    """Train `parser` on (photo, LIP parse map) pairs through `TrainingRun`; return final.pt.

    The pairs are read once into memory at the parser's size (3,600 VITON pairs at 128 x 96 take
    180 MB). Each epoch visits them in a (seed, epoch)-seeded order with random horizontal flips;
    AdamW, `lr` for the decoder and `lr * encoder_lr_scale` for the fine-tuned encoder blocks, linear
    warm-up then cosine decay over all steps. After training, garment IoUs on `validation` (photos,
    parse maps) go into final.pt (`val`) and `<out_dir>/val_metrics.json`; those on the same photos' street
    versions (drawn with `seed`, as `viton-street` draws its queries) under the key ``street``.

    final.pt holds the weights as `parser.*` (what the hp proxy's state dict names them), the parser's
    architecture (`parser_conf`) and `proxy: "hp"`.
    """
    size = tuple(int(s) for s in parser.image_size)
    encoder_params, decoder_params = parser.trainable_parameters()
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr_scale": encoder_lr_scale}, {"params": decoder_params, "lr_scale": 1.0}],
        lr=lr,
        weight_decay=weight_decay,
    )
    steps_per_epoch = -(-len(person_images) * (1 + int(street_copies)) // batch_size)
    config = {
        "proxy": "hp",
        **parser.config(),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "encoder_lr_scale": encoder_lr_scale,
        "weight_decay": weight_decay,
        "seed": seed,
        "train_pairs": len(person_images),
        **dict(run_config or {}),
    }
    if street_copies:  # only then: a studio run's config (and so its resume) stays what it was
        config["street_copies"] = int(street_copies)
    run = TrainingRun(
        out_dir,
        {"parser": parser},
        {"adamw": optimizer},
        config,
        seed=seed,
        time_budget_s=time_budget_s,
        checkpoint_every_s=checkpoint_every_s,
        progress="train parser" if progress else None,
        steps_per_epoch=steps_per_epoch,
    )
    if run.epoch < epochs and not run.out_of_time:
        log.info("reading %d training pairs at %s", len(person_images), size)
        images, masks = load_parsing_pairs(
            person_images, parses, size, street_copies=street_copies, street_seed=STREET_TRAINING_SEED + seed
        )
        device = next(parser.parameters()).device
        total_steps = epochs * steps_per_epoch
        parser.train()
        for epoch in run.epochs(epochs):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(images), generator=generator)
            flips = torch.rand(len(images), generator=generator) < 0.5
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for indices in run.skip_done(batches):
                for group in optimizer.param_groups:
                    group["lr"] = _cosine_lr(run.step, total_steps, lr) * group["lr_scale"]
                batch = images[indices].to(device).float().div_(255)
                target = masks[indices].to(device).float().div_(255)
                flip = flips[indices].to(device)[:, None, None, None]
                batch = torch.where(flip, batch.flip(-1), batch)
                target = torch.where(flip, target.flip(-1), target)
                losses = garment_segmentation_loss(parser(batch), target)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                run.log({k: float(v.detach()) for k, v in losses.items()})
                if run.out_of_time:
                    break
        del images, masks
    parser.eval()
    extra: Dict[str, Any] = {"proxy": "hp", "parser_conf": parser.config()}
    if validation is not None and len(validation[0]):
        metrics: Dict[str, Any] = evaluate_garment_masks(*validation, parser=parser, progress=progress)
        metrics["street"] = evaluate_garment_masks(*validation, parser=parser, progress=progress, street_seed=seed)
        extra["val"] = metrics
        write_text_atomic(Path(out_dir) / "val_metrics.json", json.dumps(metrics, indent=1))
        log.warning(
            "parser on %d validation photos: garment IoU %.4f, mIoU %.4f; on their street versions %.4f, %.4f",
            metrics["images"],
            metrics["iou_garment"],
            metrics["miou"],
            metrics["street"]["iou_garment"],
            metrics["street"]["miou"],
        )
    return run.finish(extra=extra)


@register_trainer("hp", config=ParserTrainConfig)
def train_hp(model: HumanParsingProxy, job: TrainingJob, config: ParserTrainConfig) -> Path:
    """Train the garment parser on `job.dataset.train`'s (photo, parse map) pairs; evaluate on its queries.

    `config.val_images` validation photos are scored at the end (0 for none). Afterwards `model` uses
    the trained parser. Returns final.pt.
    """
    dataset, seed = job.dataset, job.seed
    if dataset.train is None or dataset.train.empty:
        raise ValueError(f"{dataset.name} has no training pairs to train the parser on")
    require_parse_maps(dataset, "hp")
    photos, parses = parsing_pairs(dataset.train)
    validation = (
        validation_parsing_pairs(dataset, limit=int(config.val_images), seed=seed) if config.val_images else None
    )
    if validation is not None and not validation[0]:
        log.warning("%s: no parse map found beside the validation photos; the parser is not evaluated", dataset.name)
    device = next(iter(list(model.parameters()) + list(model.buffers())), torch.empty(0)).device
    parser = GarmentParser(tuple(config.image_size), int(config.decoder_channels), int(config.frozen_blocks)).to(device)
    final = train_garment_parser(
        parser,
        photos,
        parses,
        job.out_dir,
        epochs=int(config.epochs),
        batch_size=int(config.batch_size),
        lr=float(config.lr),
        encoder_lr_scale=float(config.encoder_lr_scale),
        weight_decay=float(config.weight_decay),
        seed=seed,
        progress=job.progress,
        time_budget_s=job.time_budget_s,
        checkpoint_every_s=float(config.checkpoint_every_s),
        validation=validation,
        run_config={"dataset": dataset.name},
        street_copies=int(config.street_copies),
    )
    model.parser = parser.eval()
    return final
