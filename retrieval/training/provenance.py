"""Which products a checkpoint was trained on, so that no benchmark scores a model on products it has seen.

Every `train_model` run stamps its final.pt with the products of the pairs it trained on
(``payload["trained_on"] = {"dataset": NAME, "products": [ids]}``). A benchmark then checks each
checkpoint of its specs (`held_out_violations`): a checkpoint trained on an evaluated product would
measure memorisation, as a run trained on another random train/validation split does (`--split-seed`).

Example:
    >>> record_training_products("runs/tn/final.pt", dataset)                       # doctest: +SKIP
    >>> held_out_violations(["runs/tn/final.pt"], {"000001_1", "000002_1"})       # doctest: +SKIP
    []
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Set, Tuple

from retrieval.specs import checkpoint_paths
from retrieval.training.run import atomic_torch_save, load_checkpoint


def training_products(dataset: Any) -> Optional[List[str]]:
    """The sorted distinct product ids of `dataset.train`'s pairs, or None without training pairs."""
    pairs = getattr(dataset, "train", None)
    if pairs is None or "product_id" not in getattr(pairs, "columns", ()):
        return None
    return sorted({str(product) for product in pairs["product_id"]})


def record_training_products(final: os.PathLike, dataset: Any) -> None:
    """Stamp final.pt with the products `dataset` trained it on (rewritten atomically); nothing without pairs."""
    products = training_products(dataset)
    if products is None:
        return
    payload = load_checkpoint(final)
    payload["trained_on"] = {"dataset": str(getattr(dataset, "name", "")), "products": products}
    atomic_torch_save(payload, final)


def recorded_products(payload: dict) -> Optional[Tuple[str, Set[str]]]:
    """(training data's name, its product ids) stamped in a checkpoint's payload; None for a run from before
    the stamp (or trained without a data set, e.g. on a pair archive)."""
    stamp = payload.get("trained_on")
    if not isinstance(stamp, dict) or "products" not in stamp:
        return None
    return str(stamp.get("dataset", "")), {str(product) for product in stamp["products"]}


@dataclass(frozen=True)
class Overlap:
    """A checkpoint trained on `shared` of the evaluated products (from the data set `trained_on`)."""

    checkpoint: str
    trained_on: str
    shared: int
    example: str


def held_out_violations(
    checkpoints: Iterable[os.PathLike], evaluated_products: Set[str]
) -> Tuple[List[Overlap], List[str]]:
    """Checkpoints trained on any of `evaluated_products`, and those that carry no record (not checked).

    A trained fusion's branches (its `descriptor_conf["branches"]`) are checked as well.

    Returns:
        (overlaps, unrecorded): an `Overlap` per offending checkpoint; the paths of checkpoints from before
        the stamp.
    """
    overlaps, unrecorded = [], []
    pending, seen = [str(Path(c)) for c in checkpoints], set()
    while pending:
        checkpoint = pending.pop(0)
        if checkpoint in seen:
            continue
        seen.add(checkpoint)
        payload = load_checkpoint(checkpoint)
        branches = (payload.get("descriptor_conf") or {}).get("branches")
        if isinstance(branches, str):  # a trained fusion: its branches are checkpoints of their own
            pending += [str(Path(path)) for path in checkpoint_paths(f"fused[branches={branches}]")]
        record = recorded_products(payload)
        if record is None:
            unrecorded.append(checkpoint)
            continue
        name, products = record
        shared = products & evaluated_products
        if shared:
            overlaps.append(Overlap(checkpoint, name, len(shared), min(shared)))
    return overlaps, unrecorded
