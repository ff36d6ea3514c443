"""The benchmark grid: dataset x proxy x descriptor (x index preset) -> mAP@k and friends.

For each descriptor: fit it on the dataset's training images (never on the evaluation queries),
embed the gallery once, then for each proxy embed the queries through proxy + descriptor and rank
the gallery with a FAISS index. Features are cached (retrieval.features.FeatureCache) by image
content and by the fingerprints of the fitted descriptor and the proxy, so an interrupted grid
resumes and a repeated one costs only the search.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from benchmarks.protocols import sampled_gallery_protocol, summarise_draws
from benchmarks.stats import bootstrap_ci, paired_bootstrap_test, relative_improvement
from generation.proxies import create_proxy
from index import ProductIndex
from index.bank_norm import DEFAULT_BANK_BETA, bank_offsets
from retrieval.batching import fit_descriptor, sample_paths
from retrieval.datasets import RetrievalSet
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.fused import FusedDescriptor, fuse_vectors
from retrieval.features import DEFAULT_CHUNK, FeatureCache, extract_features, materialize_proxy_outputs
from retrieval.files import file_sha1, read_checked_bytes, write_checked_bytes
from retrieval.gallery import ProductImages
from retrieval.metrics import average_precision_at_k, count_relevant, ranking_metrics, relevance_matrix
from retrieval.proxy_stage import box_in_photo, proxy_input_size, to_descriptor_input
from retrieval.rerank import LocalFeatureStore, SpatialVerifier
from retrieval.specs import checkpoint_paths
from retrieval.training.provenance import held_out_violations

log = logging.getLogger("street2shop.bench")
DEFAULT_KS = (1, 5, 10, 20)


# The outputs of `street2shop bench` in its --out directory, by name: the only files a re-run may delete.
BENCH_TABLES = ("results", "per_query", "protocol_draws", "generation", "trainings")  # each .csv and .parquet
BENCH_FILES = ("report.md", "config.json", "map_curves.png", "heatmap.png")
BENCH_RANK_DIR = "rank"  # rank/index.html and rank/rank_NNN.png (benchmarks.rank_pictures.write_rank_pages)
_RANK_PICTURE = re.compile(r"rank_\d{3,}\.png")


def remove_previous_bench_outputs(out_dir) -> List[Path]:
    """Delete the files an earlier `street2shop bench` wrote to `out_dir`; return them.

    A re-run that writes fewer files (no --train, --protocol-draws 0, fewer rank pictures) would
    otherwise leave the earlier run's beside its own report. Only the names bench writes go: anything
    else in `out_dir` is someone else's and stays.
    """
    out_dir = Path(out_dir)
    candidates = [out_dir / f"{stem}{suffix}" for stem in BENCH_TABLES for suffix in (".csv", ".parquet")]
    candidates += [out_dir / name for name in BENCH_FILES] + [out_dir / BENCH_RANK_DIR / "index.html"]
    rank_dir = out_dir / BENCH_RANK_DIR
    if rank_dir.is_dir():
        candidates += sorted(path for path in rank_dir.iterdir() if _RANK_PICTURE.fullmatch(path.name))
    removed = [path for path in candidates if path.is_file()]
    for path in removed:
        path.unlink()
    if rank_dir.is_dir() and not any(rank_dir.iterdir()):
        rank_dir.rmdir()
    return removed


def fit_images(dataset: RetrievalSet, max_images: int, seed: int = 0) -> List[str]:
    """Training images for codebooks and whitening: both domains of the training pairs, or the catalog.

    Half product photos, half person photos when the dataset has training pairs; otherwise (split
    'all', a CSV catalog) the gallery itself, which is unsupervised and legitimate for a shop that
    indexes its own catalog, and is logged.
    """
    if dataset.train is not None and len(dataset.train):
        half = max(1, max_images // 2)
        return sample_paths(list(dataset.train["product_image"]), half, seed) + sample_paths(
            list(dataset.train["person_image"]), half, seed + 1
        )
    log.warning("%s has no training pairs: descriptors are fitted on the gallery images", dataset.name)
    return sample_paths(list(dataset.catalog["image"]), max_images, seed)


def describe_fit_images(dataset: RetrievalSet, max_images: int) -> str:
    """Which images `fit_images` takes from `dataset`, in words, for the log and the index manifest."""
    if dataset.train is not None and len(dataset.train):
        half = max(1, max_images // 2)
        products = min(half, len(dataset.train))
        people = min(half, len(dataset.train))
        return f"{dataset.name} training pairs ({products} product + {people} person photos)"
    return f"{dataset.name} catalog ({min(max_images, len(dataset.catalog))} product photos; no training pairs)"


@dataclass
class BenchResult:
    """Everything one grid run measured.

    Attributes:
        summary: one row per proxy x descriptor x index: gallery (products) and gallery_images, mAP@k,
            recall@k and acc@k (top-k accuracy: any relevant product in the top k) for each k, MRR, their
            bootstrap 95% intervals, the paired test against `none` (same descriptor and index), the
            paper's improvement column, the paper-protocol means and spreads, timings.
        per_query: one row per query and combination: query_id, product_id, rank of the first relevant
            product within the top max(k) (0 = not there), AP@k for each k, top5 (';'-joined ids).
        draws: the paper protocol's draws (one row per draw and combination).
    """

    summary: pd.DataFrame
    per_query: pd.DataFrame
    draws: pd.DataFrame


def run_grid(
    dataset: RetrievalSet,
    descriptors: Sequence[str],
    proxies: Sequence[str] = ("none",),
    *,
    preset: str = "flat",
    **options,
) -> pd.DataFrame:
    """`run_benchmark` for one index preset, returning only its summary table (the old interface)."""
    return run_benchmark(dataset, descriptors, proxies, presets=(preset,), **options).summary


def run_benchmark(
    dataset: RetrievalSet,
    descriptors: Sequence[str],
    proxies: Sequence[str] = ("none",),
    *,
    presets: Sequence[str] = ("flat",),
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device = torch.device("cpu"),
    faiss_device: str = "auto",
    batch_size: int = 32,
    fit_max_images: int = 1000,
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    progress: bool = True,
    workers: Optional[int] = None,
    rerank: Optional[int] = None,
    rerank_conf: Optional[Dict] = None,
    distractors: int = 0,
    protocol_gallery: int = 250,
    protocol_draws: int = 10,
    bootstrap: int = 1000,
    chunk_size: int = DEFAULT_CHUNK,
    proxy_output_dir: Optional[Path] = None,
    fit_dataset: Optional[RetrievalSet] = None,
    combinations: Optional[Sequence[Tuple[str, str]]] = None,
    query_bank: Optional[Sequence[str]] = None,
    bank_beta: float = DEFAULT_BANK_BETA,
    allow_train_overlap: bool = False,
) -> BenchResult:
    """Score every proxy x descriptor x index preset on `dataset`.

    For each descriptor: fit it on training images, embed the gallery once (plus `distractors` extra
    products drawn from the training split, never from the evaluation products), build each preset's
    index; for each proxy embed the queries once and search every index. Features are cached in
    `cache_dir` by image content and fitted fingerprints, so an interrupted run resumes.

    With ``rerank=N`` every local descriptor also gets a row "NAME+sv": its top N re-ranked by
    spatial verification (`retrieval.rerank.SpatialVerifier(**rerank_conf)`).

    Protocols: the full gallery (the main columns) and the paper's (``protocol_draws`` seeded
    galleries of ``protocol_gallery`` products, ranked exactly; columns ``paper_mAP@k`` and
    ``paper_mAP@k_std``; 0 draws turns it off). Statistics: ``bootstrap`` resamples of the queries.

    Each proxy runs once over the queries (`materialize_proxy_outputs`; stored under
    ``proxy_output_dir``, default ``cache_dir/../proxy-outputs``, a temporary folder without a cache),
    and every descriptor reads its outputs.

    Descriptors are fitted on ``fit_dataset``'s training images (default: ``dataset``'s; `fit_images`).
    ``workers``: processes decoding photos for fitting and embedding (`retrieval.batching.iter_mapped`).
    ``combinations``: (proxy spec, descriptor spec) pairs to score, e.g. named recipes; None scores the
    whole proxy x descriptor grid.

    With ``query_bank`` (photos of typical queries, from a training split: never the evaluated ones) every
    combination also gets a row "NAME+qb": the same search with query-bank normalisation (``index.bank_norm``,
    inverted softmax at ``bank_beta``); the bank photos go through the proxy and descriptor as queries do.

    A checkpoint trained on any evaluated product (`retrieval.training.provenance`) is refused unless
    ``allow_train_overlap``: its scores would measure memorisation.
    """
    dataset.validate()
    catalog = _with_distractors(dataset, distractors, seed)
    queries = dataset.queries.drop_duplicates("query_id").reset_index(drop=True)
    evaluated = set(map(str, queries["image"])) & set(map(str, query_bank or []))
    if evaluated:
        raise ValueError(
            f"{len(evaluated)} query-bank photos are evaluated queries too (e.g. {sorted(evaluated)[0]}): the bank "
            "must come from a training split, not from the photos it is scored on"
        )
    specs = [*descriptors, *proxies, *(spec for pair in combinations or () for spec in pair)]
    refuse_seen_products(specs, {str(p) for p in queries["product_id"]}, dataset.name, allow_train_overlap)
    # one vector per catalog image; a product with several images is scored by its best one (retrieval.gallery)
    gallery = ProductImages.of_catalog(catalog["product_id"].astype(str))
    image_ids, gallery_ids = gallery.image_ids, gallery.product_ids  # (I,) each: the image, its product
    truth = dataset.queries.assign(product_id=dataset.queries["product_id"].astype(str))
    query_ids = list(queries["query_id"])
    query_products = [str(p) for p in queries["product_id"]]
    n_relevant = count_relevant(queries["query_id"], truth, gallery_ids)
    depth = max(ks)
    rows: List[Dict] = []
    per_query: List[pd.DataFrame] = []
    draws: List[pd.DataFrame] = []
    cache = (lambda key: FeatureCache(cache_dir, key)) if cache_dir else (lambda key: None)

    def record(row: Dict, ranked: np.ndarray) -> None:
        relevance = relevance_matrix(ranked[:, :depth], query_ids, truth)
        row.update(ranking_metrics(relevance, n_relevant, ks))
        rows.append(row)
        per_query.append(_per_query_frame(row, query_ids, query_products, relevance, n_relevant, ranked, ks))

    temporary = None
    if proxy_output_dir is None and not cache_dir:
        temporary = tempfile.TemporaryDirectory(prefix="street2shop-proxy-")
    output_root = Path(proxy_output_dir or (temporary.name if temporary else Path(cache_dir).parent / "proxy-outputs"))
    try:
        # Each proxy runs once over the queries; every descriptor below reads its stored outputs.
        photo_sets = {"queries": list(queries["image"]), "bank": list(query_bank or [])}
        proxy_runs: Dict[Tuple[str, str], Tuple] = {}

        def proxied(spec: str, photos: str = "queries") -> Tuple:
            """A proxy run once over the queries (or the bank's photos): `_run_proxy`'s (label, paper name, feature-
            cache key, output paths, seconds)."""
            if (spec, photos) not in proxy_runs:
                proxy_runs[spec, photos] = _run_proxy(
                    spec, photo_sets[photos], output_root, batch_size, device, progress
                )
            return proxy_runs[spec, photos]

        for spec in proxies:
            proxied(spec)
        wanted = None if combinations is None else {(str(p), str(d)) for p, d in combinations}

        def embed_photos(descriptor, proxy_spec: str, photos: str, label: str) -> np.ndarray:
            """The query vectors of `photos` behind `proxy_spec`; a fusion embeds branch by branch (each behind its
            own proxy where it names one), each cached."""
            _, _, proxy_key, paths, _ = proxied(proxy_spec, photos)
            embedded = [(descriptor, paths, proxy_key)]
            if isinstance(descriptor, FusedDescriptor):
                embedded = []
                for branch, spec in zip(descriptor.branches, descriptor.branch_proxies):
                    if spec is None:
                        embedded.append((branch, paths, proxy_key))
                    else:
                        _, _, branch_key, branch_paths, _ = proxied(spec, photos)
                        embedded.append((branch, branch_paths, branch_key))
            parts = [
                extract_features(
                    model.embed,
                    paths,
                    model.input_spec.size,
                    batch_size=batch_size,
                    device=device,
                    chunk_size=chunk_size,
                    cache=cache(f"{model.name}-{model.fingerprint()}-{key}"),
                    progress=label if progress else None,
                    workers=workers,
                )
                for model, paths, key in embedded
            ]
            if len(parts) == 1:
                return parts[0]
            return fuse_vectors([torch.from_numpy(p) for p in parts], descriptor.fusion_weights).numpy()

        for descriptor_spec in descriptors:
            descriptor = create_descriptor(descriptor_spec).to(device).eval()
            descriptor_name = descriptor_label(descriptor_spec)
            started = time.perf_counter()
            if descriptor.needs_fit:
                fit_set = fit_dataset if fit_dataset is not None else dataset
                _stage(progress, f"{descriptor_name}: fitting on {describe_fit_images(fit_set, fit_max_images)}")
                fit_descriptor(
                    descriptor,
                    fit_images(fit_set, fit_max_images, seed),
                    batch_size=batch_size,
                    progress=progress,
                    cache_dir=cache_dir,
                    workers=workers,
                )
            fit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            # a fusion's gallery is its branches' (each cached under its own fingerprint, so a grid of fusions
            # over the same branches embeds every catalog photo once per branch), fused with its weights
            fused_branches = list(descriptor.branches) if isinstance(descriptor, FusedDescriptor) else []
            gallery_parts = [
                extract_features(
                    model.embed_catalog,
                    list(catalog["image"]),
                    model.input_spec.size,
                    batch_size=batch_size,
                    device=device,
                    cache=cache(f"{model.name}-{model.catalog_fingerprint()}"),
                    chunk_size=chunk_size,
                    progress=f"{descriptor_name}: gallery" if progress else None,
                    workers=workers,
                )
                for model in (fused_branches or [descriptor])
            ]
            gallery_vectors = (
                gallery_parts[0]
                if not fused_branches
                else fuse_vectors([torch.from_numpy(p) for p in gallery_parts], descriptor.fusion_weights).numpy()
            )
            gallery_seconds = time.perf_counter() - started
            indexes = {}
            for preset in presets:
                started = time.perf_counter()
                indexes[preset] = (
                    ProductIndex.build(gallery_vectors, image_ids, preset=preset, device=faiss_device),
                    time.perf_counter() - started,
                )
            verify = bool(rerank) and descriptor.kind == "local"
            if rerank and not verify:
                log.warning("%s is a global descriptor: no local features to verify, no +sv row", descriptor_name)
            if verify:
                started = time.perf_counter()
                gallery_local = _local_features(
                    descriptor,
                    list(catalog["image"]),
                    cache_dir,
                    f"{descriptor.name}-{descriptor.fingerprint()}",
                    batch_size,
                    device,
                    progress=f"{descriptor_name}: gallery local features" if progress else None,
                )
                gallery_local_seconds = time.perf_counter() - started
            for proxy_spec in proxies:
                proxy_label, paper_proxy, proxy_key, query_paths, proxy_seconds = proxied(proxy_spec)
                if wanted is not None and (str(proxy_spec), str(descriptor_spec)) not in wanted:
                    continue
                started = time.perf_counter()
                query_vectors = embed_photos(
                    descriptor, proxy_spec, "queries", f"{proxy_label}+{descriptor_name}: queries"
                )
                query_seconds = time.perf_counter() - started
                protocol = _paper_protocol(
                    query_vectors,
                    gallery_vectors,
                    query_products,
                    gallery_ids,
                    protocol_gallery,
                    protocol_draws,
                    ks,
                    seed,
                )
                if protocol is not None:
                    draws.append(protocol[1].assign(proxy=proxy_label, descriptor=descriptor_name))
                if query_bank:
                    started = time.perf_counter()
                    bank_vectors = embed_photos(
                        descriptor, proxy_spec, "bank", f"{proxy_label}+{descriptor_name}: query bank"
                    )
                    offsets = bank_offsets(gallery_vectors, bank_vectors, bank_beta)
                    bank_seconds = time.perf_counter() - started
                for preset, (product_index, build_seconds) in indexes.items():
                    started = time.perf_counter()
                    scores, ranked_images = product_index.search(
                        query_vectors, gallery.search_depth(max(depth, int(rerank or 0)) if verify else depth)
                    )
                    row = {
                        "dataset": dataset.name,
                        "proxy": proxy_label,
                        "paper_proxy": paper_proxy,
                        "descriptor": descriptor_name,
                        "index": preset,
                        "queries": len(queries),
                        "gallery": gallery.n_products,
                        "gallery_images": gallery.n_images,
                        **(protocol[0] if protocol is not None else {}),
                        "fit_s": round(fit_seconds, 1),
                        "gallery_s": round(gallery_seconds, 1),
                        "proxy_s": round(proxy_seconds, 1),
                        "query_s": round(query_seconds, 1),
                        "index_build_s": round(build_seconds, 2),
                        "search_s": round(time.perf_counter() - started, 3),
                    }
                    record(row, gallery.collapse(scores, ranked_images, depth)[1])
                    if query_bank:
                        started = time.perf_counter()
                        normalised = product_index.search(query_vectors, gallery.search_depth(depth), offsets)
                        record(
                            {
                                **_first_stage_columns(row),
                                "descriptor": f"{descriptor_name}+qb",
                                "bank_s": round(bank_seconds, 1),
                                "search_s": round(time.perf_counter() - started, 3),
                            },
                            gallery.collapse(*normalised, depth)[1],
                        )
                    if verify:
                        started = time.perf_counter()
                        reranked = _spatially_reranked(
                            descriptor,
                            query_paths,
                            scores,
                            ranked_images,
                            int(rerank) * max(1, gallery.max_images),  # N products' worth of images
                            image_ids,
                            gallery_local,
                            rerank_conf or {},
                            batch_size,
                            device,
                            cache_dir,
                            f"{descriptor.name}-{descriptor.fingerprint()}-{proxy_key}",
                            progress=f"{proxy_label}+{descriptor_name}+sv" if progress else None,
                        )
                        record(
                            {
                                **_first_stage_columns(row),
                                "descriptor": f"{descriptor_name}+sv",
                                "gallery_s": round(gallery_seconds + gallery_local_seconds, 1),
                                "rerank_s": round(time.perf_counter() - started, 1),
                            },
                            gallery.collapse(scores, reranked, depth)[1],
                        )
    finally:
        if temporary is not None:
            temporary.cleanup()
    per_query_table = pd.concat(per_query, ignore_index=True)
    summary = add_statistics(pd.DataFrame(rows), per_query_table, ks, n_resamples=bootstrap, seed=seed)
    return BenchResult(summary, per_query_table, pd.concat(draws, ignore_index=True) if draws else pd.DataFrame())


def refuse_seen_products(specs: Sequence[str], evaluated_products: set, dataset_name: str, allow: bool) -> None:
    """Raise when a checkpoint of `specs` was trained on an evaluated product (warn instead with `allow`); warn
    about checkpoints too old to say what they were trained on."""
    paths = [path for spec in specs for path in checkpoint_paths(spec)]
    overlaps, unrecorded = held_out_violations(paths, evaluated_products)
    if unrecorded:
        log.warning(
            "%d checkpoint(s) record no training products (trained before the record existed), so their "
            "evaluated products are not checked: %s",
            len(unrecorded),
            ", ".join(unrecorded),
        )
    if not overlaps:
        return
    lines = [
        f"{o.checkpoint} was trained on {o.shared} of the {len(evaluated_products)} products {dataset_name} "
        f"evaluates (training data: {o.trained_on}; e.g. product {o.example})"
        for o in overlaps
    ]
    if allow:
        log.warning("scoring on products the models have seen (--allow-train-overlap): %s", "; ".join(lines))
        return
    raise ValueError(
        "; ".join(lines) + ". Its scores would measure memorisation, not retrieval: evaluate it on products it "
        "held out (a split data set: train and bench with the same --split-seed; your own files: queries of other "
        "products), or pass --allow-train-overlap to measure that on purpose"
    )


def _first_stage_columns(row: Dict) -> Dict:
    """A combination's row less the paper protocol's columns, which describe its first stage only (the paper's proxy
    name still applies): the base of its "+qb" and "+sv" rows."""
    return {k: v for k, v in row.items() if not k.startswith("paper_") or k == "paper_proxy"}


def _run_proxy(
    spec: str, paths: List[str], root: Path, batch_size: int, device: torch.device, progress: bool
) -> Tuple[str, Optional[str], str, List[str], float]:
    """(label, the paper's name for it or None, feature-cache key part, the proxy's output paths, seconds)
    for one proxy over the queries."""
    started = time.perf_counter()
    proxy = create_proxy(spec).to(device).eval()
    label = descriptor_label(spec)
    if proxy.name != "none":
        paths = materialize_proxy_outputs(
            proxy,
            paths,
            root,
            batch_size=min(batch_size, 16),
            device=device,
            progress=f"proxy {label}" if progress else None,
        )
    return label, proxy.paper_name(), f"proxy-{proxy.name}-{proxy.fingerprint()}", paths, time.perf_counter() - started


def _stage(progress: bool, message: str) -> None:
    if progress:
        log.info(message)


def _with_distractors(dataset: RetrievalSet, count: int, seed: int) -> pd.DataFrame:
    """The catalog plus `count` distractor products from the training pairs (ids 'distractor:ID').

    Distractors are products nobody in the evaluation queries wears: they make the gallery harder the
    way a real shop's long tail does. They come after the catalog, so the catalog's cached feature
    chunks are reused unchanged.
    """
    if count <= 0:
        return dataset.catalog
    if dataset.train is None or dataset.train.empty:
        raise ValueError(
            f"{dataset.name} has no training pairs to draw {count} distractor products from; "
            "use --distractors 0 or a dataset with a training split (e.g. viton:ROOT --split val)"
        )
    pool = dataset.train.drop_duplicates("product_id")
    pool = pool[~pool["product_id"].astype(str).isin(set(dataset.catalog["product_id"].astype(str)))]
    if len(pool) < count:
        log.warning("only %d training products can be distractors (asked for %d)", len(pool), count)
    pool = pool.sample(min(count, len(pool)), random_state=seed) if len(pool) > count else pool
    extra = pd.DataFrame({"product_id": "distractor:" + pool["product_id"].astype(str), "image": pool["product_image"]})
    return pd.concat([dataset.catalog[["product_id", "image"]], extra], ignore_index=True)


def _per_query_frame(
    row: Dict,
    query_ids,
    query_products,
    relevance: np.ndarray,
    n_relevant: np.ndarray,
    ranked: np.ndarray,
    ks: Sequence[int],
) -> pd.DataFrame:
    hits = relevance.any(axis=1)
    frame = pd.DataFrame(
        {
            "proxy": row["proxy"],
            "descriptor": row["descriptor"],
            "index": row["index"],
            "query_id": query_ids,
            "product_id": query_products,
            "rank": np.where(hits, relevance.argmax(axis=1) + 1, 0),
        }
    )
    for k in ks:
        frame[f"AP@{k}"] = average_precision_at_k(relevance, n_relevant, k)
    frame["top5"] = [";".join(str(x) for x in top) for top in ranked[:, :5]]
    return frame


def _paper_protocol(query_vectors, gallery_vectors, query_products, gallery_ids, gallery_size, n_draws, ks, seed):
    """(summary columns, draws table) of the paper's sampled-gallery protocol, or None when off."""
    if n_draws <= 0:
        return None
    with_queries = len(set(query_products) & set(gallery_ids))
    size = min(gallery_size, with_queries)
    if size < gallery_size:
        log.warning(
            "paper protocol: only %d products have queries; galleries of %d instead of %d",
            with_queries,
            size,
            gallery_size,
        )
    queries = query_vectors / np.maximum(np.linalg.norm(query_vectors, axis=1, keepdims=True), 1e-12)
    gallery = gallery_vectors / np.maximum(np.linalg.norm(gallery_vectors, axis=1, keepdims=True), 1e-12)
    table = sampled_gallery_protocol(queries, gallery, query_products, gallery_ids, size, n_draws, ks, seed)
    summary = {f"paper_{key}": value for key, value in summarise_draws(table, ks).items()}
    summary.update({"paper_gallery": size, "paper_draws": n_draws})
    return summary, table


def add_statistics(
    summary: pd.DataFrame, per_query: pd.DataFrame, ks: Sequence[int], n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Add bootstrap 95% intervals of mAP@k, and each proxy's paired test against `none`.

    The paired test resamples per-query AP@max(k) differences between a proxy and `none` for the same
    descriptor and index (same queries, same gallery); `improvement_pct` is the paper's relative
    improvement of mAP@max(k) over the non-generative (`none`) row.
    """
    summary = summary.copy()
    top = f"AP@{max(ks)}"
    key = ["proxy", "descriptor", "index"]
    groups = {name: group for name, group in per_query.groupby(key, sort=False)}
    for column in (
        [f"mAP@{k}_ci_low" for k in ks]
        + [f"mAP@{k}_ci_high" for k in ks]
        + ["improvement_pct", "diff_vs_none", "diff_ci_low", "diff_ci_high", "p_value"]
    ):
        summary[column] = np.nan
    for i, row in summary.iterrows():
        own = groups[(row["proxy"], row["descriptor"], row["index"])]
        if n_resamples > 0:
            for k in ks:
                low, high = bootstrap_ci(own[f"AP@{k}"].to_numpy(), n_resamples=n_resamples, seed=seed)
                summary.at[i, f"mAP@{k}_ci_low"], summary.at[i, f"mAP@{k}_ci_high"] = low, high
        baseline = groups.get(("none", row["descriptor"], row["index"]))
        if row["proxy"] == "none" or baseline is None:
            continue
        summary.at[i, "improvement_pct"] = relative_improvement(own[top].mean(), baseline[top].mean())
        if n_resamples > 0:
            test = paired_bootstrap_test(
                own[top].to_numpy(), baseline[top].to_numpy(), n_resamples=max(n_resamples, 1000), seed=seed
            )
            summary.at[i, "diff_vs_none"] = test["mean_diff"]
            summary.at[i, "diff_ci_low"], summary.at[i, "diff_ci_high"] = test["ci_low"], test["ci_high"]
            summary.at[i, "p_value"] = test["p_value"]
    return summary


def _local_features(
    descriptor,
    paths: List[str],
    cache_dir: Optional[Path],
    stage_key: str,
    batch_size: int,
    device: torch.device,
    progress: Optional[str],
) -> LocalFeatureStore:
    """The local features of `paths`, kept in ``cache_dir/stage_key/`` under the images' contents when there is
    a cache dir, so that a repeated `--rerank` bench does not extract them again."""
    stored = None
    if cache_dir:
        stored = Path(cache_dir) / stage_key / f"local-{FeatureCache.chunk_key([file_sha1(p) for p in paths])}.npz"
        if stored.exists():
            try:
                store = LocalFeatureStore.from_bytes(read_checked_bytes(stored))
                if len(store) == len(paths):
                    return store
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:  # damaged: extracted again
                log.warning("local features %s are unreadable (%s): extracting them again", stored, error)
    store = LocalFeatureStore.build(
        descriptor.extract, paths, descriptor.input_spec.size, batch_size=batch_size, device=device, progress=progress
    )
    if stored is not None:
        write_checked_bytes(stored, store.to_bytes())
    return store


def _spatially_reranked(
    descriptor,
    query_paths,
    scores,
    ranked,
    top,
    gallery_ids,
    gallery_local,
    rerank_conf,
    batch_size,
    device,
    cache_dir,
    stage_key,
    progress,
) -> np.ndarray:
    """The first stage's ranked ids with their top `top` re-sorted by spatial verification.

    Queries are verified on the images their global vectors came from (the proxy's outputs, if any).
    """
    query_local = _local_features(descriptor, list(query_paths), cache_dir, stage_key, batch_size, device, progress)
    top = min(top, ranked.shape[1])
    positions = pd.Index(gallery_ids).get_indexer(ranked[:, :top].ravel()).reshape(len(ranked), top)  # -1: none
    positions = torch.from_numpy(positions.astype(np.int64))
    _, reordered, _ = SpatialVerifier(**rerank_conf).rerank(
        query_local, positions, torch.from_numpy(scores[:, :top]), gallery_local
    )
    gallery = np.asarray(gallery_ids + [None], dtype=object)  # position -1 (no candidate) -> None
    return np.concatenate([gallery[reordered.numpy()], ranked[:, top:]], axis=1)


def descriptor_label(spec: str) -> str:
    """'tn@runs/tn-viton/final.pt' -> 'tn@tn-viton': short, and still says which training run.

    Every checkpoint path is shortened, also those inside a fusion's options, so two specs that differ only in
    their options keep different labels.

    Example:
        >>> descriptor_label("fused[branches=tn@runs/a/final.pt|tn@runs/b/final.pt;weights=(1, 2)]")
        'fused[branches=tn@a|tn@b;weights=(1, 2)]'
    """

    def run_name(match: "re.Match") -> str:
        path = Path(match.group(1))
        return f"@{path.parent.name or path.stem}"

    return re.sub(r"@([^|\];,'\"\s]+)", run_name, spec)


def format_table(results: pd.DataFrame, ks: Sequence[int] = DEFAULT_KS, markdown: bool = False) -> str:
    """The Table-4-shaped view: one line per proxy+descriptor, mAP@k, recall@k then acc@k (top-k accuracy),
    4 decimals."""
    columns = ["proxy", "descriptor", "index", "queries", "gallery"]
    columns += [f"{metric}@{k}" for metric in ("mAP", "recall", "acc") for k in ks]
    view = results[[c for c in columns if c in results.columns]].copy()
    for column in view.columns:
        if column.startswith(("mAP@", "recall@", "acc@")):
            view[column] = view[column].map(lambda v: f"{v:.4f}")
    if markdown:
        header = "| " + " | ".join(view.columns) + " |"
        rule = "|" + "|".join("---" if c in ("proxy", "descriptor", "index") else "---:" for c in view.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in row) + " |" for row in view.itertuples(index=False)]
        return "\n".join([header, rule, *body])
    return view.to_string(index=False)


@torch.no_grad()
def proxy_previews(
    proxy_specs: Sequence[str],
    paths: Sequence[str],
    ids: Sequence[str],
    size: Tuple[int, int] = (256, 192),
    device: torch.device = torch.device("cpu"),
) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Dict[str, Tuple[int, int, int, int]]]]:
    """What each proxy makes of a few query photos, for rank pictures: (label -> {id: (H, W, 3) uint8 output},
    label -> {id: (x0, y0, x1, y1) crop box in the photo's own pixels}, for the photos the proxy cropped)."""
    from retrieval.batching import load_batch
    from retrieval.io import read_image

    previews: Dict[str, Dict[str, np.ndarray]] = {}
    boxes: Dict[str, Dict[str, Tuple[int, int, int, int]]] = {}
    photo_sizes = [read_image(path).shape[:2] for path in paths]
    for spec in proxy_specs:
        proxy = create_proxy(spec).to(device).eval()
        if proxy.name == "none":
            continue
        read = proxy_input_size(proxy, size)
        with torch.no_grad():
            generated, found = proxy.forward_with_boxes(load_batch(list(paths), read).to(device))
        images = to_descriptor_input(generated, size).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        label = descriptor_label(spec)
        previews[label] = dict(zip(ids, images))
        boxes[label] = {
            query_id: box_in_photo(box, read, photo)
            for query_id, box, photo in zip(ids, found, photo_sizes)
            if box is not None
        }
    return previews, boxes
