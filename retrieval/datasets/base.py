"""Retrieval data sets: a catalog, queries with their ground truth, and optional training pairs.

Every loader returns a `RetrievalSet` of plain pandas tables holding absolute image paths; images are
read later, by `retrieval.io.read_image`, by whoever needs the pixels.

Specs understood by `load_dataset`:

- ``synthetic`` or ``synthetic:N``: the embedded synthetic set (N products, default 120), generated once
  into the cache directory.
- ``viton:ROOT``: a VITON-layout root (``../shared/data/viton``, a full VITON download, or a synthetic
  root).
- ``csv:CATALOG.csv`` or ``csv:CATALOG.csv,QUERIES.csv``: plain tables.

Example:
    >>> from retrieval.datasets import load_dataset
    >>> data = load_dataset("synthetic:60", split="val")  # doctest: +SKIP
    >>> print(data.describe())  # doctest: +SKIP
    viton:/home/me/.cache/street2shop/synthetic-60-seed0 [val]: 20 products, 20 queries, 40 training pairs
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from retrieval.io import open_regular_file

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CATALOG_COLUMNS = ("product_id", "image")
ID_COLUMNS = ("product_id", "query_id")
QUERY_COLUMNS = ("query_id", "image", "product_id")
TRAIN_COLUMNS = ("pair_id", "person_image", "product_image", "parse", "mask", "product_id")
VITON_SPLITS = ("train", "val", "all")
VITON_HALVES = ("train", "test")
DATASET_SPEC_FORMS = ("synthetic", "synthetic:N", "viton:ROOT", "csv:CATALOG.csv", "csv:CATALOG.csv,QUERIES.csv")
DEFAULT_SYNTHETIC_PRODUCTS = 120
CACHE_ENV_VARIABLE = "STREET2SHOP_CACHE"

_VITON_LAYOUT_HELP = (
    "expected the VITON layout: <root>/train_pairs.txt with lines 'NNNNNN_0.jpg NNNNNN_1.jpg' and "
    "<root>/train/{image,cloth,image-parse,cloth-mask}/ (and/or the same with 'test')"
)


@dataclass
class RetrievalSet:
    """A catalog to index, street queries with ground truth, and optional training pairs.

    Attributes:
        name: where the set came from, for logs and reports (e.g. "viton:/data/viton [val]").
        catalog: one row per product: product_id (str), image (absolute path str).
        queries: query_id (str), image (absolute path str), product_id (str, a relevant product); a query
            with several relevant products has several rows. May be empty (index-only sets).
        train: pairs for fitting descriptors and training proxies: pair_id, person_image, product_image,
            parse, mask (paths or None when absent), product_id; None when the set has none.
        root: the directory the set was read from, if any.
    """

    name: str
    catalog: pd.DataFrame
    queries: pd.DataFrame
    train: Optional[pd.DataFrame] = None
    root: Optional[Path] = None

    def describe(self) -> str:
        """One line with the sizes, e.g. "csv:shop.csv: 500 products, 120 queries (130 rows), no training pairs"."""
        n_queries = self.queries["query_id"].nunique() if "query_id" in self.queries else len(self.queries)
        rows = f" ({len(self.queries)} rows)" if len(self.queries) != n_queries else ""
        train = f"{len(self.train)} training pairs" if self.train is not None else "no training pairs"
        return f"{self.name}: {len(self.catalog)} products, {n_queries} queries{rows}, {train}"

    def validate(self) -> "RetrievalSet":
        """Check the tables; return self so loaders can `return data.validate()`.

        Raises:
            ValueError: a missing column, an empty catalog, an empty or whitespace-padded id, duplicate
                product ids in the catalog, or queries whose product_id is not in the catalog (a query
                with no relevant product cannot be scored; see DESIGN.md, "mAP@k, stated once").
        """
        _require_columns(self.catalog, CATALOG_COLUMNS, f"{self.name}: catalog")
        _require_columns(self.queries, QUERY_COLUMNS, f"{self.name}: queries")
        if self.train is not None:
            _require_columns(self.train, TRAIN_COLUMNS, f"{self.name}: train")
        if self.catalog.empty:
            raise ValueError(f"{self.name}: the catalog is empty; there is nothing to index")
        for table, what in ((self.catalog, "catalog"), (self.queries, "queries")):
            for column in ID_COLUMNS:
                if column in table.columns:
                    _check_ids(table[column], f"{self.name}: {what}", lambda row: f"row {row}")
        duplicated = self.catalog["product_id"][self.catalog["product_id"].duplicated()]
        if not duplicated.empty:
            examples = ", ".join(map(repr, duplicated.unique()[:5]))
            raise ValueError(
                f"{self.name}: {duplicated.nunique()} product ids appear more than once in the catalog "
                f"(e.g. {examples}); product ids must be unique"
            )
        unknown = ~self.queries["product_id"].isin(self.catalog["product_id"])
        if unknown.any():
            missing = self.queries.loc[unknown, "product_id"].unique()
            examples = ", ".join(map(repr, missing[:5]))
            raise ValueError(
                f"{self.name}: {int(unknown.sum())} query rows name {len(missing)} products that are not in "
                f"the catalog (e.g. {examples}); every relevant product must be in the gallery"
            )
        return self


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {', '.join(map(repr, missing))}; found {list(map(str, table.columns))}, "
            f"need {list(columns)}"
        )


def _bad_id(value: object) -> Optional[str]:
    """What is wrong with an id, or None: ids are compared as text, so "a " and "a" would be two products."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "is missing"
    if not isinstance(value, str):
        return None  # ids built in code (ints...) are compared as str(id) later
    if value.strip() == "":
        return "is empty" if value == "" else f"is only whitespace ({value!r})"
    if value != value.strip():
        return f"{value!r} has leading or trailing whitespace"
    return None


def _check_ids(ids: pd.Series, what: str, where) -> None:
    """ValueError naming the first bad id of `ids` (empty, blank, padded); `where(position)` says where it is."""
    problems = [_bad_id(value) for value in ids]
    bad = [position for position, problem in enumerate(problems) if problem]
    if bad:
        first = bad[0]
        raise ValueError(
            f"{what}: {where(first)}: {ids.name} {problems[first]} ({len(bad)} such rows); give every row a "
            f"non-empty {ids.name} without surrounding spaces"
        )


def default_cache_dir() -> Path:
    """Where generated data and caches go: $STREET2SHOP_CACHE, else ~/.cache/street2shop."""
    configured = os.environ.get(CACHE_ENV_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "street2shop"


# --------------------------------------------------------------------------------------------------
# VITON layout
# --------------------------------------------------------------------------------------------------


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
        name=f"viton:{root} [{split}]",
        catalog=catalog.reset_index(drop=True),
        queries=queries.reset_index(drop=True),
        train=None if train is None else train[list(TRAIN_COLUMNS)].reset_index(drop=True),
        root=root,
    )
    return data.validate()


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


def _read_table(csv_path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """Read one CSV table; every refusal names the file, the row (or line) and the fix."""
    if not os.path.lexists(csv_path):
        raise FileNotFoundError(f"{what} CSV not found: {csv_path}")
    # Ids are strings ("000123" must not become 123); empty cells stay empty strings, not NaN.
    try:
        with open_regular_file(csv_path, expected=f"a {what} CSV file") as handle:  # a FIFO must not block
            table = pd.read_csv(handle, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{what} CSV {csv_path} cannot be parsed ({reason}); save it as UTF-8, comma-separated, with a header row"
        ) from None
    # Rows with fewer fields than the header get NaN even with keep_default_na=False: treat as empty cells.
    table = table.fillna("")
    table.columns = [str(column).strip() for column in table.columns]
    duplicated = sorted(set(table.columns[table.columns.duplicated()]))
    if duplicated:
        raise ValueError(f"{what} CSV {csv_path} has the column(s) {duplicated} more than once; keep one of each")
    _require_columns(table, columns, f"{what} CSV {csv_path}")
    for column in ID_COLUMNS:
        if column in columns:
            # Rows, not lines: pandas skips blank lines and a quoted cell may span several.
            _check_ids(table[column], f"{what} CSV {csv_path}", lambda row: f"row {row + 1} after the header")
    empty_images = table["image"].str.strip() == ""
    if empty_images.any():
        first_row = int(np.flatnonzero(empty_images.to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise ValueError(
            f"{what} CSV {csv_path}: {int(empty_images.sum())} rows have no image (first at line {first_row})"
        )
    base = csv_path.parent
    images = []
    for row, value in enumerate(table["image"]):
        try:
            path = Path(value.strip()).expanduser()
            images.append(str(path if path.is_absolute() else (base / path).resolve()))
        except (ValueError, RuntimeError, OSError) as error:  # NUL bytes, "~nobody/x", symlink loops
            raise ValueError(
                f"{what} CSV {csv_path}: row {row + 1} after the header: image {value!r} is not a usable path "
                f"({error}); fix the path"
            ) from None
    table["image"] = images
    return table


def load_csv(catalog_csv: PathLike, queries_csv: Optional[PathLike] = None) -> RetrievalSet:
    """Load a catalog (and optional queries) from CSV files.

    Image paths may be absolute or relative to the CSV file's own directory. Extra columns (category,
    attributes...) are kept.

    Args:
        catalog_csv: columns product_id, image.
        queries_csv: columns query_id, image, product_id (one row per relevant product); without it the
            set has no queries (enough to build an index).

    Returns:
        A validated RetrievalSet with train = None.

    Raises:
        FileNotFoundError: a CSV file is missing.
        ValueError: a file that is not CSV text (or not a regular file), a missing or repeated column (named,
            with the file), an empty or whitespace-padded id or an empty image cell (with the line), or a
            failed validation.
    """
    catalog_path = Path(catalog_csv).expanduser().resolve()
    catalog = _read_table(catalog_path, CATALOG_COLUMNS, "catalog")
    name = f"csv:{catalog_path}"
    if queries_csv is not None:
        queries_path = Path(queries_csv).expanduser().resolve()
        queries = _read_table(queries_path, QUERY_COLUMNS, "queries")
        name += f",{queries_path}"
    else:
        queries = pd.DataFrame({column: pd.Series(dtype=str) for column in QUERY_COLUMNS})
    return RetrievalSet(name=name, catalog=catalog, queries=queries, train=None, root=catalog_path.parent).validate()


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


def subset_products(data: RetrievalSet, limit: Optional[int], seed: int = 0) -> RetrievalSet:
    """A seeded sample of `limit` catalog products and their queries (training pairs unchanged).

    For quick benchmarks of slow descriptors; the name says "[N products]" so a report cannot pass
    it off as the full split.
    """
    if not limit or limit >= len(data.catalog):
        return data
    keep = data.catalog.sample(int(limit), random_state=seed).sort_index()
    ids = set(keep["product_id"].astype(str))
    queries = data.queries[data.queries["product_id"].astype(str).isin(ids)]
    return RetrievalSet(
        f"{data.name} [{len(keep)} products]",
        keep.reset_index(drop=True),
        queries.reset_index(drop=True),
        data.train,
        data.root,
    ).validate()


def load_dataset(spec: str, split: str = "val", seed: int = 0, cache_dir: Optional[PathLike] = None) -> RetrievalSet:
    """Load a data set from a spec string.

    Args:
        spec: "synthetic", "synthetic:N", "viton:ROOT", "csv:CATALOG.csv" or "csv:CATALOG.csv,QUERIES.csv".
        split: "train", "val" or "all" for the VITON-layout sets (synthetic included); CSV sets carry
            their own queries and ignore it.
        seed: seed of the synthetic generation and of the train/validation split.
        cache_dir: where synthetic sets are generated; default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet.

    Raises:
        ValueError: unknown scheme or malformed spec (the message lists the valid forms).
    """
    scheme, _, argument = str(spec).partition(":")
    scheme = scheme.strip().lower()
    argument = argument.strip()
    if scheme == "synthetic":
        # Imported here: the generator pulls in cv2 drawing code that VITON/CSV users never need.
        from retrieval.synthetic import SYNTHETIC_MARKER, make_synthetic_dataset

        try:
            n_products = int(argument) if argument else DEFAULT_SYNTHETIC_PRODUCTS
        except ValueError:
            n_products = -1
        if n_products <= 0:
            raise ValueError(f"bad dataset spec {spec!r}: N in 'synthetic:N' must be a positive integer")
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        target = root / f"synthetic-{n_products}-seed{seed}"
        if not (target / SYNTHETIC_MARKER).is_file():
            logger.info("generating the synthetic set (%d products, seed %d) into %s", n_products, seed, target)
        # Returns at once when the marker (written last) says the set is complete.
        make_synthetic_dataset(target, n_products=n_products, seed=seed)
        return load_viton(target, split=split, seed=seed)
    if scheme == "viton" and argument:
        return load_viton(argument, split=split, seed=seed)
    if scheme == "csv" and argument:
        files = [part.strip() for part in argument.split(",")]
        if len(files) > 2 or not all(files):
            raise ValueError(f"bad dataset spec {spec!r}: expected csv:CATALOG.csv or csv:CATALOG.csv,QUERIES.csv")
        return load_csv(files[0], files[1] if len(files) == 2 else None)
    raise ValueError(f"unknown dataset spec {spec!r}; valid forms: {', '.join(DATASET_SPEC_FORMS)}")
