"""Galleries with several images per product: image-level ids, search depth, and the collapse to products.

A shop often has several photos of one product (front, back, detail). Both the benchmark and the saved
pipeline index one vector per IMAGE, under an internal image id, and score a product by its
best-matching image: the index is searched deeper (k x the most images any product has, capped), and
the ranked images collapse to products, each keeping its first (best) score. Products with one image
keep their product id as image id, so a catalog of one image per product builds exactly the index it
always did and ranks exactly as before.

Image ids: a product's first image is the product id itself; its later images are ``"<product_id>#<n>"``
with the smallest n >= 1 not taken (an id of the catalog is never reused, so a product literally named
``"a#1"`` cannot be confused with the second image of ``"a"``). The mapping is kept explicitly
(`ProductImages`), never parsed back out of the id.

Example:
    >>> images = ProductImages.of_catalog(["a", "b", "a"])
    >>> images.image_ids
    ['a', 'b', 'a#1']
    >>> scores = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    >>> ids = np.array([["a#1", "a", "b"]], dtype=object)
    >>> images.collapse(scores, ids, k=2)[1].tolist()
    [['a', 'b']]
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_SEPARATOR = "#"
MAX_SEARCH_DEPTH = 2048  # images searched per query at most (FAISS on GPU takes k <= 2048)


class ProductImages:
    """Which product each indexed image shows, in the order the images were added.

    Mutable (``add``, ``remove``) for the pipeline's catalog updates; not thread-safe, like
    `index.ProductIndex`'s add and remove.
    """

    def __init__(self) -> None:
        self._images: Dict[str, List[str]] = {}  # product id -> its image ids, first added first
        self._product: Dict[str, str] = {}  # image id -> product id, in insertion (= index) order

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def of_catalog(cls, product_ids: Iterable) -> "ProductImages":
        """One image per catalog row: ``product_ids`` (N,) may repeat a product for its further images."""
        images = cls()
        images.add(product_ids)
        return images

    @classmethod
    def from_pairs(cls, image_ids: Sequence[str], product_ids: Sequence[str]) -> "ProductImages":
        """The mapping as saved (catalog.csv's image_id, product_id columns).

        Raises:
            ValueError: different lengths or a repeated image id.
        """
        if len(image_ids) != len(product_ids):
            raise ValueError(f"{len(image_ids)} image ids but {len(product_ids)} product ids: give one per image")
        images = cls()
        for image_id, product_id in zip(map(str, image_ids), map(str, product_ids)):
            if image_id in images._product:
                raise ValueError(f"image id {image_id!r} appears twice; image ids must be unique")
            images._product[image_id] = product_id
            images._images.setdefault(product_id, []).append(image_id)
        return images

    def add(self, product_ids: Iterable) -> List[str]:
        """Register one new image per entry of ``product_ids`` (a product may repeat); return their image ids."""
        added = []
        for product_id in map(str, product_ids):
            owned = self._images.setdefault(product_id, [])
            image_id = product_id if not owned and product_id not in self._product else None
            n = len(owned)
            while image_id is None or image_id in self._product:
                n = max(n, 1)
                image_id = f"{product_id}{IMAGE_SEPARATOR}{n}"
                n += 1
            owned.append(image_id)
            self._product[image_id] = product_id
            added.append(image_id)
        return added

    def remove(self, product_ids: Iterable) -> List[str]:
        """Forget every image of the given products; return their image ids. Unknown ids raise KeyError."""
        product_ids = list(dict.fromkeys(map(str, product_ids)))
        unknown = [p for p in product_ids if p not in self._images]
        if unknown:
            raise KeyError(f"{len(unknown)} product ids are not in the gallery: {unknown[:5]}")
        removed = [image_id for p in product_ids for image_id in self._images.pop(p)]
        for image_id in removed:
            del self._product[image_id]
        return removed

    def discard(self, image_ids: Iterable[str]) -> None:
        """Undo `add`: forget these images (a product left without images goes too). Unknown ids are ignored."""
        for image_id in image_ids:
            product_id = self._product.pop(image_id, None)
            if product_id is None:
                continue
            owned = self._images[product_id]
            owned.remove(image_id)
            if not owned:
                del self._images[product_id]

    # ------------------------------------------------------------------------------ facts
    @property
    def image_ids(self) -> List[str]:
        return list(self._product)

    @property
    def product_ids(self) -> List[str]:
        """The product of each image, aligned with `image_ids` (repeats for several images)."""
        return list(self._product.values())

    @property
    def n_images(self) -> int:
        return len(self._product)

    @property
    def n_products(self) -> int:
        return len(self._images)

    @property
    def max_images(self) -> int:
        """The most images any product has (1 for a one-image-per-product gallery, 0 when empty)."""
        return max((len(owned) for owned in self._images.values()), default=0)

    @property
    def one_per_product(self) -> bool:
        return self.n_images == self.n_products

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._images

    def product_of(self, image_id: str) -> str:
        """The product an image shows; an id never registered is taken as its own product (older indexes)."""
        return self._product.get(image_id, image_id)

    def images_of(self, product_id: str) -> List[str]:
        """Image ids of a product, first added first. Raises KeyError for an unknown product."""
        return list(self._images[product_id])

    def sizes(self) -> str:
        """ "N products" or "N products (M images)" when they differ, for logs, reports and `describe()`."""
        return products_and_images(self.n_products, self.n_images)

    # ------------------------------------------------------------------------------ search
    def search_depth(self, k: int) -> int:
        """How many images to search so that the top ``k`` products come out exact.

        Each product has at most `max_images` images, so the first k*max_images images hold at least k
        distinct products, and the first k of them are the k best by best-image score. Capped at
        ``max(k, MAX_SEARCH_DEPTH)`` images (past it a query may get fewer than k products).
        """
        return max(int(k), min(int(k) * max(1, self.max_images), MAX_SEARCH_DEPTH))

    def collapse(self, scores: np.ndarray, image_ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image-level results -> the top ``k`` products, each at its best (first) image's score.

        Shape:
            - scores: (Q, K') float, best first per row; image_ids: (Q, K') object, None for padding.
            - Output: scores (Q, min(k, n_products)) float32 with -inf padding, product ids
              (Q, min(k, n_products)) object with None padding (fewer products found than asked).

        A gallery of one image per product is returned as is, cut to k columns.
        """
        positions = self.best_image_positions(image_ids, k)
        if positions is None:
            return scores[:, :k], image_ids[:, :k]
        rows = np.arange(len(positions))[:, None]
        found = positions >= 0
        safe = np.where(found, positions, 0)
        out_scores = np.where(found, np.asarray(scores)[rows, safe], -np.inf).astype(np.float32)
        out_ids = np.full(positions.shape, None, dtype=object)
        out_ids[found] = np.asarray(
            [self.product_of(i) for i in np.asarray(image_ids, dtype=object)[rows, safe][found]], dtype=object
        )
        return out_scores, out_ids

    def best_image_positions(self, image_ids: np.ndarray, k: int) -> Optional[np.ndarray]:
        """Column of each product's first (best) image in each row, first k products; None when every
        product has one image (the columns are then the products themselves).

        Shape:
            - image_ids: (Q, K') object, None for padding.
            - Output: (Q, min(k, n_products)) int64, -1 where a row has fewer products.
        """
        if self.max_images <= 1:
            return None
        image_ids = np.asarray(image_ids, dtype=object)
        width = min(int(k), max(1, self.n_products))
        positions = np.full((len(image_ids), width), -1, dtype=np.int64)
        for row, ranked in enumerate(image_ids):
            seen = set()
            for column, image_id in enumerate(ranked):
                if image_id is None:
                    continue
                product = self.product_of(image_id)
                if product in seen:
                    continue
                positions[row, len(seen)] = column
                seen.add(product)
                if len(seen) == width:
                    break
        return positions


def products_and_images(n_products: int, n_images: int) -> str:
    """ "N products", or "N products (M images)" when a product has several images."""
    return f"{n_products} products" + (f" ({n_images} images)" if n_images != n_products else "")


def max_per_group(scores: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Max-pool image scores into product scores, for exact protocols that rank whole score matrices.

    Shape:
        - scores: (Q, I); groups: (I,) int in [0, n_groups), the product column of each image; every
          group must have at least one image.
        - Output: (Q, n_groups).
    """
    order = np.argsort(groups, kind="stable")
    sorted_groups = np.asarray(groups)[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_groups) != 0])
    if len(starts) != n_groups or sorted_groups[0] != 0 or sorted_groups[-1] != n_groups - 1:
        raise ValueError(f"every one of the {n_groups} groups needs at least one image")
    return np.maximum.reduceat(scores[:, order], starts, axis=1)
