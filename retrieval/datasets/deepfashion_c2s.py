"""DeepFashion Consumer-to-shop Clothes Retrieval: ``deepfashion-c2s:ROOT`` (Liu et al. 2016, the published layout).

Two lists, each a count line, a header line, then whitespace-separated rows:

- ``Eval/list_eval_partition.txt``: ``image_pair_name_1 image_pair_name_2 item_id evaluation_status``, a
  consumer image, a shop image of the same item, and train, val or test;
- ``Anno/list_bbox_consumer2shop.txt``: ``image_name clothes_type source_type x_1 y_1 x_2 y_2``
  (source_type 1 = shop, 2 = consumer);

images under ``ROOT/img/...`` as the lists name them. A query is a consumer image of the evaluated partition,
cropped by its box, and it matches its item id; the gallery is the partition's shop images, cropped by theirs.

- Product ids: the item ids (``id_00000001``); query ids: the consumer image names (``img/.../comsumer_01.jpg``).
- Splits: ``val``, ``test`` and ``train`` evaluate the pairs of that evaluation_status, ``all`` every pair.
  Training pairs (``val``, ``test`` and ``train``) are the ``train`` pairs: consumer crop and shop crop of one
  item; no parse maps (``parse`` and ``mask`` None).
- An item with several shop images keeps them all (several catalog rows): the gallery scores it by its
  best-matching crop (`retrieval.gallery`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import pandas as pd

from retrieval.datasets import layout
from retrieval.datasets.base import PathLike, RetrievalSet, default_cache_dir, logger

NAME = "deepfashion-c2s"
C2S_SPLITS = ("val", "test", "train", "all")
PARTITION_FILE = "Eval/list_eval_partition.txt"
BBOX_FILE = "Anno/list_bbox_consumer2shop.txt"
PARTITION_HEADER = ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status")
BBOX_HEADER = ("image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2")
SHOP, CONSUMER = 1, 2
C2S_LAYOUT = layout.expected_layout(
    NAME,
    f"""
ROOT/
  {PARTITION_FILE}     N, then '{" ".join(PARTITION_HEADER)}', then one pair a line
  {BBOX_FILE}  N, then '{" ".join(BBOX_HEADER)}' (source_type 1 = shop, 2 = consumer)
  img/<CATEGORY>/<Type>/id_NNNNNNNN/{{comsumer,shop}}_NN.jpg   as the lists name them
""",
)


def _read_list(root: Path, relative: str, header: Tuple[str, ...]) -> list:
    """The rows (lists of fields) of a DeepFashion list file: a count line, a header line, then the rows."""
    path = root / relative
    if not path.is_file():
        raise layout.layout_error(NAME, path, relative)
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2 or tuple(lines[1].split()) != header:
        found = lines[1].strip() if len(lines) > 1 else "nothing"
        raise ValueError(
            f"{path}:2: expected the header '{' '.join(header)}' after the count line, found {found!r}; "
            f"expected the {NAME} layout:\n{C2S_LAYOUT}"
        )
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} fields ({' '.join(header)}), got {line!r}")
        rows.append(fields)
    if str(len(rows)) != lines[0].strip():  # a truncated download, most likely: say so, read what is there
        logger.warning("%s:1: the count line says %r but %d rows follow", path, lines[0].strip(), len(rows))
    return rows


def _boxes(root: Path) -> Dict[str, Tuple[int, int, Tuple[float, float, float, float]]]:
    """image name -> (clothes_type, source_type, (x0, y0, x1, y1))."""
    boxes = {}
    for name, clothes, source, *box in _read_list(root, BBOX_FILE, BBOX_HEADER):
        try:
            boxes[name] = (int(clothes), int(source), tuple(float(value) for value in box))
        except ValueError:
            raise ValueError(f"{root / BBOX_FILE}: {name}: clothes_type, source_type and the box must be numbers")
    return boxes


def _items(root: Path, names, boxes, source: int, item_ids) -> pd.DataFrame:
    """An item table (source_image, box, clothes_type, product_id) for images of one source type."""
    rows = []
    for name, item_id in zip(names, item_ids):
        if name not in boxes:
            raise ValueError(f"{root / BBOX_FILE} has no box for {name} (named by {root / PARTITION_FILE})")
        clothes, kind, box = boxes[name]
        if kind != source:
            expected = "shop (1)" if source == SHOP else "consumer (2)"
            raise ValueError(f"{root / BBOX_FILE}: {name} has source_type {kind}, expected {expected}")
        path = root / name
        if not path.is_file():
            raise layout.layout_error(NAME, path, f"the image {name}")
        rows.append((name, str(path), *box, clothes, item_id))
    columns = ["name", "source_image", "x0", "y0", "x1", "y1", "clothes_type", "product_id"]
    return pd.DataFrame(rows, columns=columns)


def load_deepfashion_c2s(root: PathLike, split: str = "val", cache_dir: Optional[PathLike] = None) -> RetrievalSet:
    """Load a DeepFashion Consumer-to-shop root as a retrieval set (see the module docstring).

    Args:
        root: the root holding Eval/, Anno/ and img/.
        split: "val", "test", "train" (the pairs of that evaluation_status) or "all".
        cache_dir: where the crops go (``<cache_dir>/crops/``); default `default_cache_dir()`.

    Returns:
        A validated RetrievalSet; catalog and queries carry source_image, x0, y0, x1, y1 and clothes_type
        beside the crop paths; train = the train pairs (None for "all").

    Raises:
        FileNotFoundError: the root, a list file or a listed image is missing (the expected tree is shown).
        ValueError: an unknown split, a list with another header, or a row that does not parse (named).
    """
    layout.check_split(NAME, split, C2S_SPLITS)
    root = layout.existing_root(NAME, root)
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    name = f"{NAME}:{root} [{split}]"
    pairs = pd.DataFrame(_read_list(root, PARTITION_FILE, PARTITION_HEADER), columns=list(PARTITION_HEADER))
    unknown = set(pairs["evaluation_status"]) - {"train", "val", "test"}
    if unknown:
        raise ValueError(
            f"{root / PARTITION_FILE}: unknown evaluation_status {sorted(unknown)}; expected train/val/test"
        )
    boxes = _boxes(root)
    evaluated = pairs if split == "all" else pairs[pairs["evaluation_status"] == split]
    shop = _items(root, evaluated["image_pair_name_2"], boxes, SHOP, evaluated["item_id"])
    shop = shop.drop_duplicates("name")  # one shop image is listed in a pair with each consumer image
    catalog = layout.with_crops(shop.reset_index(drop=True), cache_dir)
    consumers = evaluated.drop_duplicates(["image_pair_name_1", "item_id"])
    queries = _items(root, consumers["image_pair_name_1"], boxes, CONSUMER, consumers["item_id"])
    queries = layout.with_crops(queries.rename(columns={"name": "query_id"}), cache_dir)

    train = None
    if split != "all":
        rows = pairs[pairs["evaluation_status"] == "train"]
        people = layout.with_crops(_items(root, rows["image_pair_name_1"], boxes, CONSUMER, rows["item_id"]), cache_dir)
        products = layout.with_crops(_items(root, rows["image_pair_name_2"], boxes, SHOP, rows["item_id"]), cache_dir)
        pair_ids = rows["image_pair_name_1"] + "|" + rows["image_pair_name_2"]
        train = layout.training_pairs(people, products, pair_ids)
    keep = ["product_id", "image", "source_image", "x0", "y0", "x1", "y1", "clothes_type"]
    return layout.shop_set(name, root, catalog[keep], queries[["query_id"] + keep], train)


deepfashion_c2s_spec = layout.register_root_format(
    NAME, load_deepfashion_c2s, "the Consumer-to-shop directory (Eval/, Anno/, img/)"
)
