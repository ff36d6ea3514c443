"""Plain tables: ``csv:CATALOG.csv[,QUERIES.csv[,PAIRS.csv]]``: a user's own shop, street photos and pairs.

Several images per product (repeated product_id rows), several relevant products per query (repeated
query_id rows), optional boxes on catalog and query rows (cropped once into the cache, `crops.py`), and
optional training pairs, so that `street2shop train` and `bench --train` work on a user's own data. The
pairs file is named in the spec (never picked up from beside the catalog), so a spec says everything read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from retrieval.datasets.base import (
    CATALOG_COLUMNS,
    ID_COLUMNS,
    QUERY_COLUMNS,
    TRAIN_COLUMNS,
    PathLike,
    RetrievalSet,
    _check_ids,
    _require_columns,
    default_cache_dir,
    register_dataset_format,
)
from retrieval.datasets.layout import BOX_COLUMNS, expected_layout, with_crops
from retrieval.io import open_regular_file

PAIR_COLUMNS = ("person_image", "product_image", "product_id")

CSV_LAYOUT = expected_layout(
    "csv",
    """
CATALOG.csv  product_id,image[,x0,y0,x1,y1][,...]  one row per product image (a product may repeat);
                                                   paths absolute or relative to the CSV; the box crops
QUERIES.csv  query_id,image,product_id[,x0,y0,x1,y1]  one row per relevant product of a query (optional)
PAIRS.csv    person_image,product_image,product_id[,pair_id][,mask][,parse][,x0,y0,x1,y1]
                                                   training pairs (optional; the box is in the person photo)
""",
)


def _read_table(csv_path: Path, columns: Sequence[str], what: str, image_column: str = "image") -> pd.DataFrame:
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
    empty_images = table[image_column].str.strip() == ""
    if empty_images.any():
        first_row = int(np.flatnonzero(empty_images.to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise ValueError(
            f"{what} CSV {csv_path}: {int(empty_images.sum())} rows have no image (first at line {first_row})"
        )
    table[image_column] = _resolved_paths(table, image_column, csv_path, what, optional=False)
    return table


def _boxed(table: pd.DataFrame, csv_path: Path, what: str, image_column: str = "image") -> pd.DataFrame:
    """`table` with its optional x0,y0,x1,y1 columns checked (all four or none; a row's four cells all empty
    = no box) and parsed to floats (NaN for no box); ``source_image`` keeps the photo the box is in."""
    present = [column for column in BOX_COLUMNS if column in table.columns]
    table = table.assign(source_image=table[image_column])
    if not present:
        return table
    if len(present) != len(BOX_COLUMNS):
        missing = [column for column in BOX_COLUMNS if column not in present]
        raise ValueError(
            f"{what} CSV {csv_path} has box column(s) {present} but not {missing}; give all of x0,y0,x1,y1 "
            "(pixels, x1/y1 exclusive) or none"
        )
    cells = table[list(BOX_COLUMNS)].apply(lambda column: column.str.strip())
    empty = (cells == "").to_numpy()
    partial = np.flatnonzero(empty.any(axis=1) & ~empty.all(axis=1))
    if len(partial):
        raise ValueError(
            f"{what} CSV {csv_path}: row {partial[0] + 1} after the header has only some of x0,y0,x1,y1; fill all "
            "four, or leave all four empty for the whole image"
        )
    values = cells.replace("", "nan")
    try:
        boxes = values.astype(float)
    except ValueError as error:
        raise ValueError(f"{what} CSV {csv_path}: a box cell is not a number ({error}); boxes are pixels") from None
    return table.assign(**{column: boxes[column] for column in BOX_COLUMNS})


def _cropped(table: pd.DataFrame, csv_path: Path, what: str, cache_dir: Optional[PathLike]) -> pd.DataFrame:
    """The table with its boxed rows' ``image`` replaced by their crops (made once into the cache); a table
    without box columns comes back as it was."""
    return _crop(_boxed(table, csv_path, what), csv_path, what, cache_dir)


def _crop(table: pd.DataFrame, csv_path: Path, what: str, cache_dir: Optional[PathLike]) -> pd.DataFrame:
    """`_boxed`'s table -> its boxed rows cropped (`layout.with_crops`)."""
    if "x0" not in table.columns:
        return table.drop(columns="source_image")
    try:
        return with_crops(table, cache_dir)
    except ValueError as error:  # an empty box: crops.py names the image and the box
        raise ValueError(f"{what} CSV {csv_path}: {error}") from None


def _resolved_paths(table: pd.DataFrame, column: str, csv_path: Path, what: str, optional: bool) -> List:
    """The column's paths made absolute against the CSV's folder; empty cells None when `optional`."""
    paths = []
    for row, value in enumerate(table[column]):
        if value.strip() == "":
            if optional:
                paths.append(None)
                continue
            raise ValueError(f"{what} CSV {csv_path}: row {row + 1} after the header has no {column}; fill it in")
        try:
            path = Path(value.strip()).expanduser()
            paths.append(str(path if path.is_absolute() else (csv_path.parent / path).resolve()))
        except (ValueError, RuntimeError, OSError) as error:  # NUL bytes, "~nobody/x", symlink loops
            raise ValueError(
                f"{what} CSV {csv_path}: row {row + 1} after the header: {column} {value!r} is not a usable path "
                f"({error}); fix the path"
            ) from None
    return paths


def load_pairs_csv(pairs_csv: PathLike, cache_dir: Optional[PathLike] = None) -> pd.DataFrame:
    """Training pairs from a CSV: the TRAIN_COLUMNS table (`RetrievalSet.train`).

    Columns: person_image (a street photo), product_image (the product's shop photo), product_id; optional
    pair_id (default ``pair-<row>``), mask (the product's mask), parse (the person photo's parse map, LIP
    labels; lets `hp` train) and x0,y0,x1,y1 (the garment's box in the person photo: the person side is then
    its crop). Paths are absolute or relative to the CSV's folder.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a missing column, an empty id or image cell, a bad box, or a parse map on a boxed row (a
            crop of the photo would no longer match its parse map).
    """
    path = Path(pairs_csv).expanduser().resolve()
    table = _read_table(path, PAIR_COLUMNS, "pairs", image_column="person_image")
    table["product_image"] = _resolved_paths(table, "product_image", path, "pairs", optional=False)
    for column in ("mask", "parse"):
        table[column] = _resolved_paths(table, column, path, "pairs", True) if column in table else None
    table = _boxed(table.rename(columns={"person_image": "image"}), path, "pairs")
    if "x0" in table.columns:
        both = np.flatnonzero(table["x0"].notna().to_numpy() & table["parse"].notna().to_numpy())
        if len(both):
            raise ValueError(
                f"pairs CSV {path}: row {both[0] + 1} after the header has both a box and a parse map; give the "
                "parse map of the cropped photo as a whole photo without a box, or drop the box"
            )
    table = _crop(table, path, "pairs", cache_dir)
    pair_ids = table["pair_id"] if "pair_id" in table else [f"pair-{row + 1}" for row in range(len(table))]
    return pd.DataFrame(
        {
            "pair_id": list(pair_ids),
            "person_image": table["image"].tolist(),
            "product_image": table["product_image"].tolist(),
            "parse": pd.Series(table["parse"].tolist(), dtype=object),
            "mask": pd.Series(table["mask"].tolist(), dtype=object),
            "product_id": table["product_id"].astype(str).tolist(),
        },
        columns=list(TRAIN_COLUMNS),
    )


def load_csv(
    catalog_csv: PathLike,
    queries_csv: Optional[PathLike] = None,
    pairs_csv: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
) -> RetrievalSet:
    """Load a catalog (and optional queries and training pairs) from CSV files.

    Image paths may be absolute or relative to the CSV file's own directory. Extra columns (category,
    attributes...) are kept. A product with several images has several catalog rows (the gallery scores it
    by its best-matching image); a query with several relevant products has several rows. Catalog and
    query rows may carry a box x0,y0,x1,y1 (pixels of the upright photo, x1/y1 exclusive; four empty
    cells = the whole photo): the row's image is then its crop, made once into ``<cache_dir>/crops/``,
    and ``source_image`` keeps the photo.

    Args:
        catalog_csv: columns product_id, image [, x0, y0, x1, y1].
        queries_csv: columns query_id, image, product_id [, x0, y0, x1, y1]; without it the set has no
            queries (enough to build an index).
        pairs_csv: training pairs (`load_pairs_csv`); without it train is None.
        cache_dir: where crops go; default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet.

    Raises:
        FileNotFoundError: a CSV file is missing.
        ValueError: a file that is not CSV text (or not a regular file), a missing or repeated column (named,
            with the file), an empty or whitespace-padded id or an empty image cell (with the line), a bad
            box, or a failed validation.
    """
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    catalog_path = Path(catalog_csv).expanduser().resolve()
    catalog = _cropped(_read_table(catalog_path, CATALOG_COLUMNS, "catalog"), catalog_path, "catalog", cache_dir)
    name = f"csv:{catalog_path}"
    if queries_csv is not None:
        queries_path = Path(queries_csv).expanduser().resolve()
        queries = _cropped(_read_table(queries_path, QUERY_COLUMNS, "queries"), queries_path, "queries", cache_dir)
        name += f",{queries_path}"
    else:
        queries = pd.DataFrame({column: pd.Series(dtype=str) for column in QUERY_COLUMNS})
    train = None
    if pairs_csv is not None:
        pairs_path = Path(pairs_csv).expanduser().resolve()
        train = load_pairs_csv(pairs_path, cache_dir)
        name += f"{',' if queries_csv is not None else ',,'}{pairs_path}"
    return RetrievalSet(name=name, catalog=catalog, queries=queries, train=train, root=catalog_path.parent).validate()


@register_dataset_format(
    "csv", "csv:CATALOG.csv", "csv:CATALOG.csv,QUERIES.csv", "csv:CATALOG.csv,QUERIES.csv,PAIRS.csv"
)
def csv_spec(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
    """``csv:CATALOG.csv[,QUERIES.csv[,PAIRS.csv]]``: `load_csv` (the split is the files' own); QUERIES may be
    left empty before PAIRS (``csv:CATALOG.csv,,PAIRS.csv``: an index-only catalog with training pairs)."""
    files = [part.strip() for part in argument.split(",")]
    if len(files) > 3 or not files[0] or not all(files[2:]) or (len(files) == 2 and not files[1]):
        raise ValueError(
            f"bad dataset spec {spec!r}: expected csv:CATALOG.csv, csv:CATALOG.csv,QUERIES.csv or "
            "csv:CATALOG.csv,QUERIES.csv,PAIRS.csv (QUERIES may be empty: csv:CATALOG.csv,,PAIRS.csv)"
        )
    queries = files[1] if len(files) > 1 and files[1] else None
    pairs = files[2] if len(files) == 3 else None
    return load_csv(files[0], queries, pairs, cache_dir=cache_dir)
