"""The VITON layout: ``viton:ROOT``, a root with ``train/`` and/or ``test/`` halves of person/product pairs
(``../shared/data/viton``, a full VITON download, or a synthetic root)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from retrieval.datasets.base import TRAIN_COLUMNS, PathLike, RetrievalSet, register_dataset_format
from retrieval.datasets.layout import expected_layout

logger = logging.getLogger("retrieval.datasets")

VITON_SPLITS = ("train", "val", "all")
VITON_HALVES = ("train", "test")

VITON_LAYOUT = expected_layout(
    "viton",
    """
ROOT/
  train_pairs.txt                lines 'NNNNNN_0.jpg NNNNNN_1.jpg' (the person column is used)
  train/image/NNNNNN_0.jpg       the person photos
  train/cloth/NNNNNN_1.jpg       the product photos
  train/image-parse/NNNNNN_0.png train/cloth-mask/NNNNNN_1.jpg   optional
  test_pairs.txt, test/...       the same (either half may be absent)
""",
)
expected_layout("viton-street", VITON_LAYOUT + "\n(the street query photos are generated into the cache)")
expected_layout("viton-street-hr", VITON_LAYOUT + "\n(the street query photos are generated into the cache)")
_VITON_LAYOUT_HELP = (
    "expected the VITON layout: <root>/train_pairs.txt with lines 'NNNNNN_0.jpg NNNNNN_1.jpg' and "
    "<root>/train/{image,cloth,image-parse,cloth-mask}/ (and/or the same with 'test')"
)


def _listing(folder: Path) -> Dict[str, Path]:
    """Map file stem -> path for the files of `folder` (one directory read instead of one stat per id)."""
    if not folder.is_dir():
        return {}
    files: Dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda item: item.name):
        if entry.is_file() and not entry.name.startswith("."):
            files.setdefault(Path(entry.name).stem, Path(entry.path))
    return files


def _pair_ids_from_pairs_file(pairs_file: Path) -> List[str]:
    """Ids NNNNNN of the person column of a VITON pairs file, in file order, without repeats.

    Only the first column is used: an original VITON test_pairs.txt pairs each person with *another*
    product (for try-on), so the second column is not the ground truth of retrieval.
    """
    ids: List[str] = []
    for line_number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        stem = Path(fields[0]).stem
        if not stem.endswith("_0"):
            raise ValueError(
                f"{pairs_file}:{line_number}: expected a person image named 'NNNNNN_0.<ext>' first, got {fields[0]!r}"
            )
        ids.append(stem[: -len("_0")])
    return list(dict.fromkeys(ids))


def _read_viton_half(root: Path, half: str) -> Tuple[pd.DataFrame, int]:
    """Pairs of one half (train or test) of a VITON root, paired by id; returns (pairs, dropped count)."""
    folder = root / half
    pairs_file = root / f"{half}_pairs.txt"
    people = _listing(folder / "image")
    products = _listing(folder / "cloth")
    parses = _listing(folder / "image-parse")
    masks = _listing(folder / "cloth-mask")
    if pairs_file.is_file():
        ids = _pair_ids_from_pairs_file(pairs_file)
    else:
        ids = sorted(stem[: -len("_0")] for stem in people if stem.endswith("_0"))
    kept = [pair_id for pair_id in ids if f"{pair_id}_0" in people and f"{pair_id}_1" in products]
    dropped = len(ids) - len(kept)
    if dropped:
        kept_set = set(kept)
        examples = ", ".join([pair_id for pair_id in ids if pair_id not in kept_set][:5])
        logger.warning(
            "%s: dropped %d of %d %s pairs whose person (%s/image/NNNNNN_0.*) or product (%s/cloth/NNNNNN_1.*) "
            "image is missing (e.g. %s)",
            root,
            dropped,
            len(ids),
            half,
            half,
            half,
            examples,
        )

    def optional(listing: Dict[str, Path], stem: str) -> Optional[str]:
        return str(listing[stem]) if stem in listing else None

    def optional_column(listing: Dict[str, Path], suffix: str) -> pd.Series:
        # Object dtype keeps None for an absent file: pandas' string dtype would turn it into NaN,
        # which is truthy and so slips past `if row.parse:`.
        return pd.Series([optional(listing, f"{pair_id}{suffix}") for pair_id in kept], dtype=object)

    table = pd.DataFrame(
        {
            "pair_id": kept,
            "person_image": [str(people[f"{pair_id}_0"]) for pair_id in kept],
            "product_image": [str(products[f"{pair_id}_1"]) for pair_id in kept],
            "parse": optional_column(parses, "_0"),
            "mask": optional_column(masks, "_1"),
        },
        columns=list(TRAIN_COLUMNS[:-1]),
    )
    return table, dropped


def load_viton(root: PathLike, split: str = "val", seed: int = 0, val_fraction: float = 1.0 / 3.0) -> RetrievalSet:
    """Load a VITON-layout root as a model-to-shop retrieval set.

    Person `NNNNNN_0` is paired with product `NNNNNN_1` by their shared id (never by the pairs file's
    second column, which in VITON's test half names another product). Ids whose person or product
    image is missing are dropped with a warning. Whatever halves the root holds (train/, test/) are
    pooled, then split by pair id: a seeded permutation of the sorted ids puts `val_fraction` of them
    in validation, the rest in training.

    Product ids are the pair ids "NNNNNN"; when the root holds both halves they are prefixed with the
    half ("train-NNNNNN", "test-NNNNNN") because the two halves number their files independently.
    Query ids are the person image stems ("NNNNNN_0", prefixed likewise).

    Args:
        root: the VITON root (holding train_pairs.txt and train/, and/or test_pairs.txt and test/).
        split: "val": catalog and queries from the validation pairs, train = the training pairs;
            "train": catalog and queries from the training pairs, train = the training pairs;
            "all": every pair as query and product, train = None.
        seed: seed of the train/validation split.
        val_fraction: share of the pair ids in validation, in (0, 1).

    Returns:
        A validated RetrievalSet with one relevant product per query.

    Raises:
        FileNotFoundError: `root` is missing or holds neither half.
        ValueError: unknown split, val_fraction outside (0, 1), or a malformed pairs file.
    """
    if split not in VITON_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(VITON_SPLITS)}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"VITON root not found: looked for the directory {root}; {_VITON_LAYOUT_HELP}")
    present = [half for half in VITON_HALVES if (root / half).is_dir() or (root / f"{half}_pairs.txt").is_file()]
    if not present:
        raise FileNotFoundError(f"{root} holds neither train/ nor test/ (nor their pairs files); {_VITON_LAYOUT_HELP}")

    tables = []
    for half in present:
        table, _ = _read_viton_half(root, half)
        if len(present) > 1:
            table["pair_id"] = f"{half}-" + table["pair_id"]
        tables.append(table)
    pairs = pd.concat(tables, ignore_index=True).sort_values("pair_id", kind="stable").reset_index(drop=True)
    if pairs.empty:
        raise FileNotFoundError(f"{root} holds no complete pair (person and product image); {_VITON_LAYOUT_HELP}")
    pairs["product_id"] = pairs["pair_id"]

    ordered_ids = pairs["pair_id"].to_numpy()
    permutation = np.random.default_rng(seed).permutation(len(ordered_ids))
    n_val = int(round(len(ordered_ids) * float(val_fraction)))
    in_val = np.zeros(len(ordered_ids), dtype=bool)
    in_val[permutation[:n_val]] = True
    train_pairs = pairs[~in_val].reset_index(drop=True)
    val_pairs = pairs[in_val].reset_index(drop=True)

    if split == "val":
        evaluated, train = val_pairs, train_pairs
    elif split == "train":
        evaluated, train = train_pairs, train_pairs
    else:
        evaluated, train = pairs, None
    if evaluated.empty:
        raise ValueError(
            f"{root}: the {split!r} split is empty ({len(pairs)} pairs, val_fraction={val_fraction}); "
            "use more pairs or another val_fraction"
        )
    catalog = pd.DataFrame({"product_id": evaluated["product_id"], "image": evaluated["product_image"]})
    queries = pd.DataFrame(
        {
            "query_id": evaluated["pair_id"] + "_0",
            "image": evaluated["person_image"],
            "product_id": evaluated["product_id"],
        }
    )
    data = RetrievalSet(
        # a split other than seed 0's says so: checkpoints trained on one split leak into another's validation
        name=f"viton:{root} [{split}]" if seed == 0 else f"viton:{root} [{split}, split seed {seed}]",
        catalog=catalog.reset_index(drop=True),
        queries=queries.reset_index(drop=True),
        train=None if train is None else train[list(TRAIN_COLUMNS)].reset_index(drop=True),
        root=root,
    )
    return data.validate()


@register_dataset_format("viton", "viton:ROOT")
def viton_spec(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
    """``viton:ROOT``: `load_viton` of ROOT."""
    if not argument:
        raise ValueError(f"bad dataset spec {spec!r}: expected viton:ROOT, the directory of a VITON-layout set")
    return load_viton(argument, split=split, seed=seed)
