"""The LookBook set of the PaintNet paper (Yoo et al. 2016, "Pixel-level domain transfer"): ``lookbook:ROOT``.

One folder of ``PID<product>_CLEAN<0|1>_IID<image>.jpg``: CLEAN1 is the product photo (on white), CLEAN0 the
photos of people wearing it. A query is a CLEAN0 photo, whole (the set has no boxes), and it matches its
product; the gallery is the CLEAN1 photos.

- Product ids: the PID digits as written (``"000123"``); query ids: the file stems.
- Splits: the set has none; products are split by a seeded permutation of their sorted ids, a third in
  validation, as ``viton:`` splits its pairs: ``val`` evaluates the validation products, ``train`` the
  training products, ``all`` every product. Training pairs (``val`` and ``train``) are every CLEAN0 photo of
  a training product with its product photo; no parse maps (``parse`` and ``mask`` None). The paper's
  protocol (galleries of 250 products) is the bench's ``protocol_gallery=250``.
- Products without a CLEAN1 photo are left out with a warning (nothing to index).
- A product with several CLEAN1 photos keeps them all (several catalog rows): the gallery scores it by its
  best-matching photo (`retrieval.gallery`); a training pair takes the first by image id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from retrieval.datasets import layout
from retrieval.datasets.base import PathLike, RetrievalSet, logger

NAME = "lookbook"
LOOKBOOK_SPLITS = ("val", "train", "all")
LOOKBOOK_VAL_FRACTION = 1.0 / 3.0
LOOKBOOK_LAYOUT = layout.expected_layout(
    NAME,
    """
ROOT/
  PID<product>_CLEAN1_IID<image>.jpg    the product photo
  PID<product>_CLEAN0_IID<image>.jpg    photos of people wearing it
""",
)
_FILE_NAME = re.compile(r"^PID(\d+)_CLEAN([01])_IID(\d+)\.[A-Za-z]+$")


def _read_folder(root: Path) -> pd.DataFrame:
    """One row per matching file: product_id, clean, image id, stem, source_image; sorted by product, image."""
    rows = []
    for path in root.iterdir():
        match = _FILE_NAME.match(path.name)
        if match and path.is_file():
            rows.append((match.group(1), int(match.group(2)), int(match.group(3)), path.stem, str(path)))
    if not rows:
        raise layout.layout_error(NAME, root / "PID<product>_CLEAN1_IID<image>.jpg", "any LookBook photo")
    table = pd.DataFrame(rows, columns=["product_id", "clean", "image_id", "stem", "source_image"])
    return table.sort_values(["product_id", "image_id"], kind="stable").reset_index(drop=True)


def load_lookbook(
    root: PathLike, split: str = "val", seed: int = 0, val_fraction: float = LOOKBOOK_VAL_FRACTION
) -> RetrievalSet:
    """Load a LookBook folder as a street-to-shop retrieval set (see the module docstring).

    Args:
        root: the folder of PID*_CLEAN*_IID* photos.
        split: "val", "train" or "all" (a seeded split by product).
        seed: seed of the split.
        val_fraction: share of the products in validation, in (0, 1).

    Returns:
        A validated RetrievalSet of whole photos (no crops); train = the training products' pairs (None
        for "all").

    Raises:
        FileNotFoundError: the root is missing or holds no LookBook photo (the expected tree is shown).
        ValueError: an unknown split, val_fraction outside (0, 1), or an empty split.
    """
    layout.check_split(NAME, split, LOOKBOOK_SPLITS)
    root = layout.existing_root(NAME, root)
    name = f"{NAME}:{root} [{split}]"
    photos = _read_folder(root)
    photos["image"] = photos["source_image"]
    shop = photos[photos["clean"] == 1].reset_index(drop=True)
    people = photos[photos["clean"] == 0]
    orphans = sorted(set(people["product_id"]) - set(shop["product_id"]))
    if orphans:
        logger.warning(
            "%s: left out %d products that have no CLEAN1 product photo (e.g. PID%s)", name, len(orphans), orphans[0]
        )
        people = people[people["product_id"].isin(set(shop["product_id"]))]
    products = sorted(shop["product_id"].unique())
    in_val = dict(zip(products, layout.validation_mask(len(products), seed, val_fraction)))
    wanted = {"val": {True}, "train": {False}, "all": {True, False}}[split]
    catalog = shop[[in_val[product] in wanted for product in shop["product_id"]]]
    queries = people[[in_val[product] in wanted for product in people["product_id"]]].rename(
        columns={"stem": "query_id"}
    )
    if catalog.empty:
        raise ValueError(f"{name}: the {split!r} split is empty ({len(products)} products); use more products")
    train = None
    if split != "all":
        pairs = people[[not in_val[product] for product in people["product_id"]]].reset_index(drop=True)
        first = layout.first_image_of_each_product(shop)
        product_rows = first.set_index("product_id").loc[pairs["product_id"]].reset_index()
        train = layout.training_pairs(pairs, product_rows, pairs["stem"])
    return layout.shop_set(
        name, root, catalog[["product_id", "image", "image_id"]], queries[["query_id", "image", "product_id"]], train
    )


lookbook_spec = layout.register_root_format(
    NAME, load_lookbook, "the folder of PID*_CLEAN*_IID* photos", uses_seed=True, uses_cache=False
)
