"""Plain tables: ``csv:CATALOG.csv`` or ``csv:CATALOG.csv,QUERIES.csv``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from retrieval.datasets.base import (
    CATALOG_COLUMNS,
    ID_COLUMNS,
    QUERY_COLUMNS,
    PathLike,
    RetrievalSet,
    _check_ids,
    _require_columns,
    register_dataset_format,
)
from retrieval.datasets.layout import expected_layout
from retrieval.io import open_regular_file

CSV_LAYOUT = expected_layout(
    "csv",
    """
CATALOG.csv    product_id,image[,...]          one row per product; image paths absolute or relative to the CSV
QUERIES.csv    query_id,image,product_id[,...]  one row per relevant product of a query (optional file)
""",
)


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


@register_dataset_format("csv", "csv:CATALOG.csv", "csv:CATALOG.csv,QUERIES.csv")
def csv_spec(argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]) -> RetrievalSet:
    """``csv:CATALOG.csv[,QUERIES.csv]``: `load_csv` of one or two files (the split is the files' own)."""
    files = [part.strip() for part in argument.split(",")]
    if len(files) > 2 or not all(files):
        raise ValueError(f"bad dataset spec {spec!r}: expected csv:CATALOG.csv or csv:CATALOG.csv,QUERIES.csv")
    return load_csv(files[0], files[1] if len(files) == 2 else None)
