"""A saved pipeline: proxy -> descriptor -> index -> optional re-ranker, loaded from one index directory.

The unit a shop deploys. `build_pipeline` (behind `street2shop index`) writes it; `Pipeline.load` reads it
back with nothing else given: the directory records every part (see `street2shop.engine` for its files)::

    manifest.json  metadata["pipeline"]: recipe, proxy {spec, name, config, fingerprint}, descriptor spec,
                   preset, rerank (N, verifier settings), fit_data (what codebooks/whitening were fitted on)
    proxy.pt       the proxy's trained weights (a copy of the checkpoint it was built from), if any
    descriptor.pt  the descriptor's weights (trained heads included) and fitted state
    local_features.npz   the catalog's local features, when the pipeline re-ranks
    query_bank.npz the query bank (vectors of training-split query photos, their sources, beta) and each indexed
                   image's offset, when the pipeline scores with query-bank normalisation (`index.bank_norm`)
    catalog.csv    product_id -> image: a file path, or images/<sha256>.<ext> inside the directory for
                   images added as bytes or arrays (`index.store_object`); one row per indexed image, and
                   an image_id column (the index's internal id of each image) when a product has several

All are checksummed in the manifest and change together in one atomic save (`index.storage`).

Example:
    >>> from street2shop import Pipeline                                            # doctest: +SKIP
    >>> shop = Pipeline.load("shop-index")                                          # doctest: +SKIP
    >>> [hit.product_id for hit in shop.search("street.jpg", k=3)[0].hits]          # doctest: +SKIP
    ['000123_1', '004567_1', '000042_1']
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from generation.proxies import Box, BranchQueryEmbedder
from index import IndexMismatchError, ProductIndex, object_path, store_object
from index.bank_norm import DEFAULT_BANK_BETA, bank_offsets
from retrieval.batching import iter_mapped, resolve_device
from retrieval.files import DamagedCacheError, file_sha1, read_checked_bytes, write_checked_bytes
from retrieval.gallery import ProductImages
from retrieval.io import images_to_tensor, resize_image
from retrieval.proxy_stage import box_in_photo, proxy_input_size, to_descriptor_input
from retrieval.rerank import LocalFeatureStore, SpatialVerifier
from street2shop.images import (
    as_image_list,
    encoded_suffix,
    image_name,
    image_to_rgb,
    png_bytes,
)

log = logging.getLogger("street2shop")

PIPELINE_KEY = "pipeline"  # the manifest metadata entry this module writes
PROXY_FILE = "proxy.pt"
CATALOG_FILE = "catalog.csv"
QUERY_BANK_FILE = "query_bank.npz"
SEARCH_BATCH = 32  # images embedded together by `search` and `add`
BANK_CHECKPOINT_S = 30.0  # how often an embedding query bank saves what it has (resumed after an interruption)


@dataclass(frozen=True)
class SearchHit:
    rank: int  # 1-based
    product_id: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    """One query's answer.

    Attributes:
        hits: best first, ``min(k, catalog size)`` of them.
        descriptor_input: (H, W, 3) uint8 RGB, what the descriptor saw after the proxy (hp's cut-out
            garment, PaintNet's drawing, or the resized photo).
        crop_box: (x0, y0, x1, y1) in the query photo's pixels where the proxy localised, else None.
        timings_ms: decode, proxy, describe, search, rerank: the batch's milliseconds divided by its size.
    """

    hits: List[SearchHit]
    descriptor_input: np.ndarray
    crop_box: Optional[Tuple[int, int, int, int]]
    timings_ms: Dict[str, float]


@dataclass(frozen=True)
class QueryBank:
    """The query bank of a pipeline that scores with query-bank normalisation (`index.bank_norm`).

    Attributes:
        vectors: (B, D) float32, the bank photos embedded as queries (proxy, then descriptor).
        beta: the inverted softmax's inverse temperature.
        sources: where the photos came from (data set specs), for people reading `describe`.
    """

    vectors: np.ndarray
    beta: float
    sources: Tuple[str, ...] = ()

    def describe(self) -> Dict[str, Any]:
        return {"photos": len(self.vectors), "beta": self.beta, "sources": list(self.sources)}

    def to_bytes(self, image_ids: Sequence[str], offsets: np.ndarray) -> bytes:
        """query_bank.npz: the bank, and each indexed image's offset under its image id."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            vectors=self.vectors.astype(np.float32),
            beta=np.float64(self.beta),
            sources=np.array(self.sources, dtype=str),
            image_ids=np.array(list(image_ids), dtype=str),
            offsets=np.asarray(offsets, dtype=np.float32),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes, image_ids: Sequence[str], path: Path) -> Tuple["QueryBank", np.ndarray]:
        """(the bank, the offsets in `image_ids`' order) from query_bank.npz.

        Raises:
            IndexMismatchError: the file has no offset for some indexed image (it was not saved with this index).
        """
        with np.load(io.BytesIO(payload), allow_pickle=False) as stored:
            bank = cls(stored["vectors"].astype(np.float32), float(stored["beta"]), tuple(map(str, stored["sources"])))
            by_id = pd.Series(stored["offsets"].astype(np.float32), index=stored["image_ids"].astype(str))
        positions = by_id.index.get_indexer(list(image_ids))
        if (positions < 0).any():
            missing = [image_ids[i] for i in np.flatnonzero(positions < 0)[:5]]
            raise IndexMismatchError(
                f"{path} has no query-bank offset for {int((positions < 0).sum())} indexed images (e.g. {missing}): "
                "rebuild the index with `street2shop index --query-bank ...`"
            )
        return bank, by_id.to_numpy()[positions]


# ------------------------------------------------------------------------------------ models from specs
def model_from_spec(kind: str, spec: str):
    """'NAME', 'NAME@final.pt' or 'NAME[KEY=VALUE;...]' -> (built descriptor or proxy, checkpoint or None)."""
    from benchmarks.reproduce import model_class
    from retrieval.specs import parse_spec

    name = spec.split("@")[0].split("[")[0].strip()
    parsed = parse_spec(spec, getattr(model_class(kind, name), "default_conf", {}), source=f"{kind} {spec!r}:")
    if kind == "proxy":
        from generation.proxies import create_proxy

        model = create_proxy(parsed.name, **parsed.options)
    else:
        from retrieval.descriptors import create_descriptor

        model = create_descriptor(parsed.name, **parsed.options)
    if parsed.checkpoint:
        model.load_trained(parsed.checkpoint)
    return model, parsed.checkpoint


def _json_config(conf: Mapping[str, Any]) -> Dict[str, Any]:
    import json

    return json.loads(json.dumps(dict(conf), default=list))


def _from_json_config(conf: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in conf.items()}


def pipeline_record(
    proxy,
    proxy_spec: str,
    descriptor_spec: str,
    preset: str,
    rerank: int,
    rerank_conf: Optional[Mapping[str, Any]],
    recipe: Optional[str],
    fit_data: Optional[str],
) -> Dict[str, Any]:
    """What the manifest's metadata["pipeline"] says: enough, with proxy.pt, to rebuild the proxy exactly."""
    return {
        "recipe": recipe,
        "proxy": {
            "spec": proxy_spec,
            "name": proxy.name,
            "config": _json_config(proxy.conf),
            "fingerprint": proxy.fingerprint(),
        },
        "descriptor_spec": descriptor_spec,
        "preset": preset,
        "rerank": int(rerank),
        "rerank_conf": dict(rerank_conf or {}),
        "fit_data": fit_data,
    }


def catalog_table_bytes(
    product_ids: Sequence[str], images: Sequence[str], image_ids: Optional[Sequence[str]] = None
) -> bytes:
    """catalog.csv: product_id,image (a path, or images/<sha256>.<ext> inside the index directory), one row
    per indexed image in index order, plus image_id (the index's id of each image) when any differs from its
    product id (`retrieval.gallery.ProductImages`: a product with several images)."""
    table = pd.DataFrame({"product_id": [str(p) for p in product_ids], "image": [str(i) for i in images]})
    if image_ids is not None and list(map(str, image_ids)) != list(table["product_id"]):
        table.insert(0, "image_id", [str(i) for i in image_ids])
    return table.to_csv(index=False).encode("utf-8")


def product_images_of(index_ids: Sequence[str], table: Optional[pd.DataFrame]) -> ProductImages:
    """Which product each image of a loaded index shows: catalog.csv's image_id -> product_id, and an id the
    table does not name (an index saved before catalogs had several images per product) is its own product."""
    recorded = {}
    if table is not None and "image_id" in table.columns:
        recorded = dict(zip(table["image_id"], table["product_id"]))
    return ProductImages.from_pairs(index_ids, [recorded.get(i, i) for i in index_ids])


# ------------------------------------------------------------------------------------ the pipeline
class Pipeline:
    """A loaded index directory: the proxy, descriptor, index and re-ranker it records, ready to search.

    `search` may run in several threads at once; `add`, `remove` and `save` may not run alongside each
    other or alongside `search` (a caller serialises them, e.g. with a readers-writer lock).
    """

    def __init__(
        self,
        index_dir: Path,
        index: ProductIndex,
        descriptor,
        proxy,
        record: Optional[Dict[str, Any]],
        catalog: Optional[Dict[str, str]],
        proxy_state: Optional[bytes],
        gallery_local: Optional[LocalFeatureStore],
        verifier: Optional[SpatialVerifier],
        rerank: int,
        device: torch.device,
        images: Optional[ProductImages] = None,
    ):
        self.index_dir = Path(index_dir)
        self.index = index
        self.descriptor = descriptor
        self.proxy = proxy
        # a fusion whose branches name proxies of their own embeds queries branch by branch
        self._branch_embedder = (
            BranchQueryEmbedder(descriptor, proxy) if getattr(descriptor, "has_branch_proxies", False) else None
        )
        self.record = record
        self._catalog = catalog  # image id -> catalog.csv's image (path or stored object name)
        # which product each indexed image shows: the index holds images, results are products
        self.images = images if images is not None else ProductImages.from_pairs(index.product_ids, index.product_ids)
        self._proxy_state = proxy_state
        self.gallery_local = gallery_local
        self.verifier = verifier
        self.rerank = int(rerank)
        self.device = device
        self._proxy_lock = threading.Lock()  # GrabCut and some proxies keep per-call state: one batch at a time
        self.bank: Optional[QueryBank] = None  # query-bank normalisation (`use_query_bank`), off by default
        self._offsets: Optional[np.ndarray] = None  # (ntotal,) the bank's offset of each indexed image, index order

    # ---------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        index_dir: os.PathLike,
        *,
        device: str = "auto",
        proxy: Optional[str] = None,
        descriptor: Optional[str] = None,
        rerank: Optional[int] = None,
        rerank_conf: Optional[Mapping[str, Any]] = None,
    ) -> "Pipeline":
        """Load the pipeline saved in `index_dir`; nothing else is needed.

        Args:
            device: "auto", "cpu" or "cuda", for the models and the FAISS index.
            proxy, descriptor: what the caller expects (the CLI's --proxy/--descriptor). A pipeline that
                records another is refused with the fix; an index made before pipelines recorded their
                proxy (proxy `none` assumed) takes `proxy` as given.
            rerank: re-rank the top N (overrides the recorded N; needs the catalog's local features).
            rerank_conf: `SpatialVerifier` settings, over the recorded ones.

        Raises:
            FileNotFoundError, IndexCorruptError: no index, missing or damaged files.
            IndexMismatchError: a conflicting proxy or descriptor, weights that no longer reproduce the
                recorded fingerprints.
        """
        from generation.proxies import create_proxy
        from street2shop.engine import DESCRIPTOR_FILE, LOCAL_FEATURES_FILE, load_descriptor_state

        index_dir = Path(index_dir)
        torch_device = resolve_device(device)
        index = ProductIndex.load(index_dir, device=device)
        metadata = index.metadata
        recorded_descriptor = metadata.get("descriptor")
        if descriptor is not None and descriptor.split("@")[0].split("[")[0] != recorded_descriptor:
            raise IndexMismatchError(
                f"index at {index_dir} was built with descriptor {recorded_descriptor!r}, but the query asks for "
                f"{descriptor!r}: drop --descriptor (the index records its own), or rebuild the index with "
                f"`street2shop index --descriptor {descriptor} ...`"
            )
        # The files of the version that was loaded, not the live links: a concurrent save may switch those.
        version_dir = index.attachment_path(DESCRIPTOR_FILE).parent
        model = load_descriptor_state(metadata, version_dir, torch_device).eval()
        record = metadata.get(PIPELINE_KEY)
        proxy_state = None
        if record is None:
            log.warning(
                "index at %s records no proxy (built before pipelines were saved): querying with proxy %r",
                index_dir,
                proxy or "none",
            )
            proxy_model = create_proxy(proxy or "none")
            recorded_rerank, recorded_conf = 0, {}
        else:
            entry = record["proxy"]
            proxy_model = create_proxy(entry["name"], **_from_json_config(entry["config"]))
            if index.has_attachment(PROXY_FILE):
                proxy_state = index.read_attachment(PROXY_FILE)
                proxy_model.load_trained(index.attachment_path(PROXY_FILE))
            if proxy_model.fingerprint() != entry["fingerprint"]:
                raise IndexMismatchError(
                    f"proxy {entry['spec']!r} rebuilt from {index_dir} has fingerprint {proxy_model.fingerprint()} "
                    f"but the pipeline was saved with {entry['fingerprint']}: the code or the shipped weights "
                    "changed since; rebuild the index with `street2shop index`"
                )
            if proxy is not None:
                _refuse_other_proxy(proxy, proxy_model, entry["spec"], index_dir)
            recorded_rerank, recorded_conf = int(record.get("rerank", 0)), dict(record.get("rerank_conf") or {})
        proxy_model = proxy_model.to(torch_device).eval()
        n_rerank = recorded_rerank if rerank is None else int(rerank)
        if n_rerank < 0:
            raise ValueError(f"rerank must be >= 0 (0: off), got {rerank}")
        gallery_local = verifier = None
        if index.has_attachment(LOCAL_FEATURES_FILE):
            gallery_local = LocalFeatureStore.from_bytes(index.read_attachment(LOCAL_FEATURES_FILE))
            if len(gallery_local) != index.ntotal:
                raise IndexMismatchError(
                    f"{index_dir / LOCAL_FEATURES_FILE} holds {len(gallery_local)} products but the index "
                    f"{index.ntotal}: rebuild the index"
                )
        if n_rerank:
            if gallery_local is None:
                raise FileNotFoundError(
                    f"re-ranking needs the catalog's local features, but {index_dir} has no {LOCAL_FEATURES_FILE}: "
                    "rebuild it with `street2shop index --rerank N` or `--local-features` "
                    "(a local descriptor such as sift or delf)"
                )
            verifier = SpatialVerifier(**{**recorded_conf, **dict(rerank_conf or {})})
        catalog = table = None
        if index.has_attachment(CATALOG_FILE):
            table = pd.read_csv(io.BytesIO(index.read_attachment(CATALOG_FILE)), dtype=str, keep_default_na=False)
            image_ids = table["image_id"] if "image_id" in table.columns else table["product_id"]
            catalog = dict(zip(image_ids, table["image"]))
        pipeline = cls(
            index_dir, index, model, proxy_model, record, catalog, proxy_state, gallery_local, verifier, n_rerank,
            torch_device, product_images_of(index.product_ids, table),
        )  # fmt: skip
        if index.has_attachment(QUERY_BANK_FILE):
            pipeline.bank, pipeline._offsets = QueryBank.from_bytes(
                index.read_attachment(QUERY_BANK_FILE), index.product_ids, index_dir / QUERY_BANK_FILE
            )
        return pipeline

    # ---------------------------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        """Images in the index (= products when each has one image; `n_products` counts products)."""
        return self.index.ntotal

    @property
    def n_products(self) -> int:
        return self.images.n_products

    def describe(self) -> Dict[str, Any]:
        """{"recipe", "proxy", "descriptor", "preset", "products", "dim", "rerank", "query_bank", "device"}, and
        "images" when a product has several."""
        record = self.record or {}
        images = {} if self.images.one_per_product else {"images": self.images.n_images}
        return {
            "recipe": record.get("recipe"),
            "proxy": (record.get("proxy") or {}).get("spec", self.proxy.name),
            "descriptor": record.get("descriptor_spec", self.descriptor.name),
            "preset": self.index.preset,
            "products": self.n_products,
            **images,
            "dim": self.index.dim,
            "rerank": self.rerank,
            "query_bank": None if self.bank is None else self.bank.describe(),
            "device": str(self.device),
        }

    def product_image_path(self, product_id: str) -> Path:
        """The (first) catalog photo of `product_id`. Raises KeyError when the product is not in the index."""
        if product_id not in self.images:
            raise KeyError(f"product {product_id!r} is not in the index at {self.index_dir}")
        first = self.images.images_of(product_id)[0]
        if self._catalog is None or first not in self._catalog:
            raise KeyError(
                f"the index at {self.index_dir} keeps no image for {product_id!r} (built before indexes kept their "
                "catalog table): rebuild it with `street2shop index`"
            )
        image = self._catalog[first]
        if image.startswith("images/"):
            return object_path(self.index_dir, image)
        return Path(image)

    # ---------------------------------------------------------------------------- search
    def search(self, images: Any, k: int = 10) -> List[SearchResult]:
        """Top-k products for each image, in order (see `image_to_rgb` for the kinds of image taken).

        Raises:
            BadImageError: an image that cannot be read, naming its position.
            ValueError: k < 1, no images.
        """
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        items = as_image_list(images)
        if not items:
            raise ValueError("no images to search with")
        results: List[SearchResult] = []
        for start in range(0, len(items), SEARCH_BATCH):
            results += self._search_batch(items[start : start + SEARCH_BATCH], int(k), start)
        return results

    @torch.no_grad()
    def _search_batch(self, items: Sequence[Any], k: int, offset: int) -> List[SearchResult]:
        clock = _Clock()
        vectors, seen, boxes, photos, read_size = self._embed_queries(items, offset, clock)
        # images searched deep enough for the top products (`ProductImages.search_depth`), then collapsed
        scores, ids = self.index.search(vectors, self.images.search_depth(max(k, self.rerank)), self._offsets)
        clock.lap("search")
        if self.rerank:
            scores, ids = self._reranked(seen, scores, ids)
            clock.lap("rerank")
        scores, ids = self.images.collapse(scores, ids, k)
        timings = clock.per_image(len(items))
        pixels = seen.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [
            SearchResult(
                hits=[
                    SearchHit(rank=r + 1, product_id=str(pid), score=float(score))
                    for r, (pid, score) in enumerate(zip(ids[i], scores[i]))
                    if pid is not None
                ],
                descriptor_input=np.ascontiguousarray(pixels[i]),
                crop_box=box_in_photo(boxes[i], read_size, photos[i].shape[:2]),
                timings_ms=dict(timings),
            )
            for i in range(len(items))
        ]

    def _embed_queries(self, items: Sequence[Any], offset: int, clock: "_Clock"):
        """Query photos -> (vectors (B, D) float32, what the descriptor saw, the proxy's boxes, the decoded photos,
        the size they were read at); `offset` numbers the photos in error messages."""
        size = self.descriptor.input_spec.size
        read_h, read_w = proxy_input_size(self.proxy, size)  # a cropping proxy may read the photo larger
        photos = [image_to_rgb(image, image_name(image, offset + i)) for i, image in enumerate(items)]
        batch = images_to_tensor([resize_image(photo, (read_h, read_w)) for photo in photos]).to(self.device)
        clock.lap("decode")
        seen, boxes = self._proxied(batch, size)
        clock.lap("proxy")
        embedded = self.descriptor.embed(seen) if self._branch_embedder is None else self._branch_embedder(batch, seen)
        clock.lap("describe")
        return embedded.float().cpu().numpy(), seen, boxes, photos, (read_h, read_w)

    # ---------------------------------------------------------------------------- query-bank normalisation
    @torch.no_grad()
    def use_query_bank(
        self,
        photos: Sequence[Any],
        *,
        beta: float = DEFAULT_BANK_BETA,
        sources: Sequence[str] = (),
        progress=None,
        cache_dir: Optional[os.PathLike] = None,
    ) -> None:
        """Score from now on with query-bank normalisation (`index.bank_norm`): `photos` (typical query photos from
        a training split, never ones you will evaluate on) are embedded as queries are, and every indexed image
        gets the offset that demotes products close to many of them. `save` keeps the bank; `add` gives new
        products their offsets from it.

        Args:
            photos: file paths or anything `search` takes.
            beta: the inverted softmax's inverse temperature.
            sources: where the photos came from (data set specs), recorded with the bank.
            progress: None, or a callable (done, total) called after each batch.
            cache_dir: keep the bank's vectors here (``query-banks/<key>.npy``, keyed by the proxy's and descriptor's
                fingerprints and the photos' contents) and reuse them, so a rebuilt index does not embed the bank
                again. Only banks of file paths are cached. An embedding saves what it has every
                `BANK_CHECKPOINT_S` (``<key>.partial.npy``), so an interrupted one goes on from there.

        Raises:
            BadImageError: an unreadable photo. ValueError: no photos, beta <= 0.
        """
        items = as_image_list(photos)
        if not items:
            raise ValueError("a query bank needs at least one photo")
        stored = self._bank_cache_file(items, cache_dir)
        vectors = _cached_vectors(stored, len(items), self.index.dim)
        if vectors is None:
            # An interrupted embedding left its first batches here: go on from them.
            partial = None if stored is None else stored.with_name(stored.stem + ".partial.npy")
            done = _cached_vectors(partial, len(items), self.index.dim, prefix_of=SEARCH_BATCH)
            parts = [] if done is None else [done]
            last_saved = time.perf_counter()
            for start in range(0 if done is None else len(done), len(items), SEARCH_BATCH):
                parts.append(self._embed_queries(items[start : start + SEARCH_BATCH], start, _Clock())[0])
                if partial is not None and time.perf_counter() - last_saved > BANK_CHECKPOINT_S:
                    _write_vectors(partial, np.concatenate(parts))
                    last_saved = time.perf_counter()
                if progress is not None:
                    progress(min(start + SEARCH_BATCH, len(items)), len(items))
            vectors = np.concatenate(parts).astype(np.float32)
            if stored is not None:
                _write_vectors(stored, vectors)
                partial.unlink(missing_ok=True)
        bank = QueryBank(vectors, float(beta), tuple(str(s) for s in sources))
        self._offsets = self.index.bank_offsets(bank.vectors, bank.beta)
        self.bank = bank

    def _bank_cache_file(self, items: Sequence[Any], cache_dir: Optional[os.PathLike]) -> Optional[Path]:
        """Where `use_query_bank` keeps the vectors of `items` (None: no cache, or photos that are not files)."""
        if cache_dir is None or not all(isinstance(item, (str, os.PathLike)) for item in items):
            return None
        digest = hashlib.sha1(f"{self.proxy.fingerprint()}|{self.descriptor.fingerprint()}".encode("utf-8"))
        for item in items:
            digest.update(file_sha1(item).encode("ascii"))
        return Path(cache_dir) / "query-banks" / f"{digest.hexdigest()[:20]}.npy"

    def _proxied(self, batch: torch.Tensor, size) -> Tuple[torch.Tensor, List[Optional[Box]]]:
        """What the descriptor reads (the proxy's output at its input size, `retrieval.proxy_stage`) and, per
        image, the box the proxy cut it from (in `batch`'s pixels) or None."""
        if self.proxy.name == "none":
            return batch, [None] * len(batch)
        with self._proxy_lock:
            generated, boxes = self.proxy.forward_with_boxes(batch)
        return to_descriptor_input(generated, size), boxes

    def _reranked(self, seen: torch.Tensor, scores: np.ndarray, ids: np.ndarray):
        """Top `rerank` products' worth of images re-sorted by inliers + global similarity (the new score); the
        rest as they were."""
        top = min(self.rerank * max(1, self.images.max_images), ids.shape[1])
        query_local = LocalFeatureStore.from_features([self.descriptor.extract(seen)])
        product_ids = self.index.product_ids
        positions = pd.Index(product_ids).get_indexer(ids[:, :top].ravel()).reshape(len(ids), top)  # -1: none
        new_scores, reordered, _ = self.verifier.rerank(
            query_local,
            torch.from_numpy(positions.astype(np.int64)),
            torch.from_numpy(scores[:, :top].astype(np.float32)),
            self.gallery_local,
        )
        catalog = np.asarray(product_ids + [None], dtype=object)  # position -1 -> None
        return (
            np.concatenate([new_scores.numpy(), scores[:, top:]], axis=1),
            np.concatenate([catalog[reordered.numpy()], ids[:, top:]], axis=1),
        )

    # ---------------------------------------------------------------------------- catalog updates
    def add(
        self, product_ids: Sequence[str], images: Sequence[Any], *, more_images: bool = False, workers: int = 0
    ) -> None:
        """Add products: their photos (any kind `search` takes) are embedded without the proxy, as at indexing.

        ``workers`` processes decode the photos (`retrieval.batching.iter_mapped`; 0, the default: this process,
        as a service that adds while it searches should; None: `default_workers()`); the vectors do not depend on it.

        File paths are remembered as paths; bytes, arrays, PIL images and tensors are written into the
        index directory, content-addressed (`index.store_object`). Call `save` to make it permanent.

        With ``more_images=True`` an id may repeat and may name a product already in the index: each photo
        becomes one more image of its product, which is then scored by its best-matching image.

        Raises:
            ValueError: lengths differ; without ``more_images``, a duplicate or already indexed id; with it,
                an index that keeps no catalog table (it could not save which product an image shows).
                Nothing is added then.
            BadImageError: an image that cannot be read (nothing is added then).
        """
        product_ids = [str(p) for p in ([product_ids] if isinstance(product_ids, str) else product_ids)]
        images = as_image_list(images)
        if len(product_ids) != len(images):
            raise ValueError(f"{len(product_ids)} product ids but {len(images)} images: give one image per id")
        if not product_ids:
            return
        seen, repeated = set(), []
        for pid in product_ids:
            (repeated.append(pid) if pid in seen or pid in self.images else seen.add(pid))
        if repeated and not more_images:
            raise ValueError(
                f"product ids already in the index or given twice: {repeated[:5]}; remove them first, or add "
                "them as further images of their products with more_images=True"
            )
        if repeated and self._catalog is None:
            raise ValueError(
                f"the index at {self.index_dir} keeps no catalog table (built before indexes kept one), so it "
                f"cannot record further images of {repeated[:5]}: rebuild it with `street2shop index`"
            )
        photos = list(iter_mapped(_decoded, list(enumerate(images)), workers, "image"))
        vectors, local = self._embed_catalog(photos)
        stored = [self._remember_image(image, photo) for image, photo in zip(images, photos)]
        image_ids = self.images.add(product_ids)
        try:
            self.index.add(vectors, image_ids)
        except BaseException:
            self.images.discard(image_ids)
            raise
        if self.bank is not None:
            self._offsets = np.concatenate([self._offsets, bank_offsets(vectors, self.bank.vectors, self.bank.beta)])
        if self.gallery_local is not None:
            self.gallery_local = LocalFeatureStore.from_features([self.gallery_local, local])
        if self._catalog is not None:
            self._catalog.update(zip(image_ids, stored))

    @torch.no_grad()
    def _embed_catalog(self, photos: Sequence[np.ndarray]):
        """Catalog photos (no proxy: the proxy brings queries to the catalog's domain) -> vectors, local store."""
        size = self.descriptor.input_spec.size
        vectors, local = [], []
        for start in range(0, len(photos), SEARCH_BATCH):
            batch = images_to_tensor([resize_image(p, size) for p in photos[start : start + SEARCH_BATCH]])
            batch = batch.to(self.device)
            vectors.append(self.descriptor.embed_catalog(batch).float().cpu().numpy())
            if self.gallery_local is not None:
                local.append(self.descriptor.extract(batch))
        return np.concatenate(vectors), (LocalFeatureStore.from_features(local) if local else None)

    def _remember_image(self, image: Any, photo: np.ndarray) -> str:
        """What catalog.csv keeps for an added image: its absolute path, or the stored object's name."""
        if isinstance(image, (str, os.PathLike)):
            return str(Path(image).resolve())
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            return store_object(self.index_dir, data, encoded_suffix(data))
        return store_object(self.index_dir, png_bytes(photo), ".png")

    def remove(self, product_ids: Sequence[str]) -> None:
        """Remove products by id, with all their images. Raises KeyError listing the unknown ids (nothing is
        removed then)."""
        product_ids = [str(p) for p in ([product_ids] if isinstance(product_ids, str) else product_ids)]
        unknown = [pid for pid in product_ids if pid not in self.images]
        if unknown:
            raise KeyError(f"{len(unknown)} product ids are not in the index: {unknown[:5]}")
        before = {pid: position for position, pid in enumerate(self.index.product_ids)}
        image_ids = [image_id for pid in dict.fromkeys(product_ids) for image_id in self.images.images_of(pid)]
        self.index.remove(image_ids)
        self.images.remove(product_ids)
        kept = [before[pid] for pid in self.index.product_ids]  # old positions of the images left, in index order
        if self.gallery_local is not None:
            keep = torch.as_tensor(kept, dtype=torch.long)
            store = self.gallery_local
            self.gallery_local = LocalFeatureStore(store.keypoints[keep], store.desc[keep], store.mask[keep])
        if self._offsets is not None:
            self._offsets = self._offsets[np.asarray(kept, dtype=np.int64)]
        if self._catalog is not None:
            for image_id in image_ids:
                self._catalog.pop(image_id, None)

    def save(self) -> None:
        """Write the pipeline as the new live version of `index_dir`, in one atomic step (`ProductIndex.save`)."""
        from street2shop.engine import DESCRIPTOR_FILE, LOCAL_FEATURES_FILE, descriptor_state_bytes

        attachments = {DESCRIPTOR_FILE: descriptor_state_bytes(self.descriptor)}
        if self._proxy_state is not None:
            attachments[PROXY_FILE] = self._proxy_state
        if self.gallery_local is not None:
            attachments[LOCAL_FEATURES_FILE] = self.gallery_local.to_bytes()
        if self.bank is not None:
            attachments[QUERY_BANK_FILE] = self.bank.to_bytes(self.index.product_ids, self._offsets)
        if self._catalog is not None:
            ids = self.index.product_ids  # image ids, in index order
            attachments[CATALOG_FILE] = catalog_table_bytes(
                [self.images.product_of(i) for i in ids], [self._catalog[i] for i in ids], ids
            )
        self.index.save(self.index_dir, attachments=attachments)

    def __repr__(self) -> str:
        described = self.describe()
        return f"Pipeline({self.index_dir}, " + ", ".join(f"{k}={v!r}" for k, v in described.items()) + ")"


def _refuse_other_proxy(spec: str, recorded, recorded_spec: str, index_dir: Path) -> None:
    """A --proxy at query time must be the recorded one (by name, and by weights when it names a checkpoint)."""
    name = spec.split("@")[0].split("[")[0].strip()
    same = name == recorded.name
    if same and ("@" in spec or "[" in spec):
        asked, _ = model_from_spec("proxy", spec)
        same = asked.fingerprint() == recorded.fingerprint()
    if not same:
        raise IndexMismatchError(
            f"index at {index_dir} is a pipeline with proxy {recorded_spec!r}, but the query asks for {spec!r}: "
            f"drop --proxy (the index records its own), or build another index with `street2shop index --proxy "
            f"{spec} ...`"
        )


class _Clock:
    """Milliseconds per named stage of one batch."""

    def __init__(self):
        self.last = time.perf_counter()
        self.stages: Dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + 1000 * (now - self.last)
        self.last = now

    def per_image(self, count: int) -> Dict[str, float]:
        return {stage: round(ms / max(1, count), 3) for stage, ms in self.stages.items()}


def _write_vectors(path: Path, vectors: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, vectors.astype(np.float32))
    write_checked_bytes(path, buffer.getvalue())


def _cached_vectors(stored: Optional[Path], rows: int, dim: int, prefix_of: int = 0) -> Optional[np.ndarray]:
    """The (rows, dim) vectors `use_query_bank` kept in `stored`, or None (no file; a damaged or stale one is
    logged and embedded again). With `prefix_of` B, the first n rows of them are enough, n a multiple of B
    below `rows` (what an interrupted embedding saved)."""
    if stored is None or not stored.exists():
        return None
    try:
        vectors = np.load(io.BytesIO(read_checked_bytes(stored)), allow_pickle=False)
    except (OSError, ValueError, DamagedCacheError) as error:
        log.warning("query-bank cache %s is unreadable (%s): embedding the bank again", stored, error)
        return None
    whole_batches = prefix_of and vectors.ndim == 2 and len(vectors) < rows and len(vectors) % prefix_of == 0
    if whole_batches and vectors.shape[1] == dim and np.isfinite(vectors).all():
        return vectors.astype(np.float32)
    if vectors.shape != (rows, dim) or not np.isfinite(vectors).all():
        log.warning(
            "query-bank cache %s holds %s vectors, not (%d, %d): embedding the bank again",
            stored,
            vectors.shape,
            rows,
            dim,
        )
        return None
    return vectors.astype(np.float32)


def _decoded(numbered: Tuple[int, Any]) -> np.ndarray:
    """(position, image) -> `image_to_rgb` of it, its errors naming it (what `Pipeline.add`'s workers run)."""
    position, image = numbered
    return image_to_rgb(image, image_name(image, position))
