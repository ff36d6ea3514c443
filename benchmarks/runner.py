"""The benchmark grid: dataset x proxy x descriptor (x index preset) -> mAP@k and friends.

For each descriptor: fit it on the dataset's training images (never on the evaluation queries),
embed the gallery once, then for each proxy embed the queries through proxy + descriptor and rank
the gallery with a FAISS index. Features are cached (benchmarks.features.FeatureCache) by image
content and by the fingerprints of the fitted descriptor and the proxy, so an interrupted grid
resumes and a repeated one costs only the search.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from benchmarks.features import FeatureCache, extract_features
from benchmarks.metrics import count_relevant, ranking_metrics, relevance_matrix
from generation.proxies import create_proxy, query_embedder
from index import ProductIndex
from retrieval.batching import fit_descriptor, sample_paths
from retrieval.datasets import RetrievalSet
from retrieval.descriptors import create_descriptor
from retrieval.rerank import LocalFeatureStore, SpatialVerifier, behind_proxy

log = logging.getLogger("street2shop.bench")
DEFAULT_KS = (1, 5, 10, 20)


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


def run_grid(
    dataset: RetrievalSet,
    descriptors: Sequence[str],
    proxies: Sequence[str] = ("none",),
    *,
    preset: str = "flat",
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device = torch.device("cpu"),
    faiss_device: str = "auto",
    batch_size: int = 32,
    fit_max_images: int = 1000,
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    progress: bool = True,
    rerank: Optional[int] = None,
    rerank_conf: Optional[Dict] = None,
) -> pd.DataFrame:
    """Score every proxy x descriptor pair on `dataset`; one row per pair.

    With ``rerank=N`` every local descriptor also gets a row "NAME+sv": its top N re-ranked by
    spatial verification (`retrieval.rerank.SpatialVerifier(**rerank_conf)`), which extracts the
    local features of gallery and queries once more (they are not cached).

    Returns:
        DataFrame with dataset, proxy, descriptor, index, queries, gallery, mAP@k and recall@k for
        each k, MRR within the top max(ks), and the seconds spent fitting and extracting
        (and re-ranking, ``rerank_s``, on the +sv rows).
    """
    dataset.validate()
    catalog = dataset.catalog
    queries = dataset.queries.drop_duplicates("query_id")
    gallery_ids = [str(p) for p in catalog["product_id"]]
    truth = dataset.queries.assign(product_id=dataset.queries["product_id"].astype(str))
    n_relevant = count_relevant(queries["query_id"], truth, gallery_ids)
    depth = max(ks)
    rows: List[Dict] = []
    for descriptor_spec in descriptors:
        descriptor = create_descriptor(descriptor_spec).to(device).eval()
        descriptor_name = descriptor_label(descriptor_spec)
        started = time.perf_counter()
        if descriptor.needs_fit:
            fit_descriptor(descriptor, fit_images(dataset, fit_max_images, seed), batch_size=batch_size, progress=progress)
        fit_seconds = time.perf_counter() - started
        cache = (lambda key: FeatureCache(cache_dir, key)) if cache_dir else (lambda key: None)
        started = time.perf_counter()
        gallery = extract_features(
            descriptor.embed, list(catalog["image"]), descriptor.input_spec.size, batch_size=batch_size,
            device=device, cache=cache(f"{descriptor.name}-{descriptor.fingerprint()}"),
            progress=f"{descriptor_name}: gallery" if progress else None,
        )
        gallery_seconds = time.perf_counter() - started
        product_index = ProductIndex.build(gallery, gallery_ids, preset=preset, device=faiss_device)
        verify = bool(rerank) and descriptor.kind == "local"
        if rerank and not verify:
            log.warning("%s is a global descriptor: no local features to verify, no +sv row", descriptor_name)
        if verify:
            started = time.perf_counter()
            gallery_local = LocalFeatureStore.build(
                descriptor.extract, list(catalog["image"]), descriptor.input_spec.size, batch_size=batch_size,
                device=device, progress=f"{descriptor_name}: gallery local features" if progress else None,
            )
            gallery_local_seconds = time.perf_counter() - started
        for proxy_name in proxies:
            proxy = create_proxy(proxy_name).to(device).eval()
            started = time.perf_counter()
            query_vectors = extract_features(
                query_embedder(descriptor, proxy), list(queries["image"]), descriptor.input_spec.size,
                batch_size=batch_size, device=device,
                cache=cache(f"{descriptor.name}-{descriptor.fingerprint()}-proxy-{proxy.name}-{proxy.fingerprint()}"),
                progress=f"{proxy_name}+{descriptor_name}: queries" if progress else None,
            )
            query_seconds = time.perf_counter() - started
            scores, ranked = product_index.search(query_vectors, max(depth, int(rerank or 0)) if verify else depth)
            relevance = relevance_matrix(ranked[:, :depth], list(queries["query_id"]), truth)
            row = {
                "dataset": dataset.name,
                "proxy": proxy_name,
                "descriptor": descriptor_name,
                "index": preset,
                "queries": len(queries),
                "gallery": len(gallery_ids),
                **ranking_metrics(relevance, n_relevant, ks),
                "fit_s": round(fit_seconds, 1),
                "gallery_s": round(gallery_seconds, 1),
                "query_s": round(query_seconds, 1),
            }
            rows.append(row)
            if verify:
                started = time.perf_counter()
                reranked = _spatially_reranked(
                    descriptor, proxy, queries, scores, ranked, int(rerank), gallery_ids, gallery_local,
                    rerank_conf or {}, batch_size, device, progress=f"{proxy_name}+{descriptor_name}+sv" if progress else None,
                )
                relevance = relevance_matrix(reranked[:, :depth], list(queries["query_id"]), truth)
                rows.append({
                    **row, "descriptor": f"{descriptor_name}+sv", **ranking_metrics(relevance, n_relevant, ks),
                    "gallery_s": round(gallery_seconds + gallery_local_seconds, 1),
                    "rerank_s": round(time.perf_counter() - started, 1),
                })
    return pd.DataFrame(rows)


def _spatially_reranked(descriptor, proxy, queries, scores, ranked, top, gallery_ids, gallery_local,
                        rerank_conf, batch_size, device, progress) -> np.ndarray:
    """The first stage's ranked ids with their top `top` re-sorted by spatial verification."""
    size = descriptor.input_spec.size
    extract = behind_proxy(descriptor.extract, None if proxy.name == "none" else proxy, size)
    query_local = LocalFeatureStore.build(extract, list(queries["image"]), size, batch_size=batch_size, device=device, progress=progress)
    top = min(top, ranked.shape[1])
    positions = pd.Index(gallery_ids).get_indexer(ranked[:, :top].ravel()).reshape(len(ranked), top)  # -1: none
    positions = torch.from_numpy(positions.astype(np.int64))
    _, reordered, _ = SpatialVerifier(**rerank_conf).rerank(query_local, positions, torch.from_numpy(scores[:, :top]), gallery_local)
    gallery = np.asarray(gallery_ids + [None], dtype=object)  # position -1 (no candidate) -> None
    return np.concatenate([gallery[reordered.numpy()], ranked[:, top:]], axis=1)


def descriptor_label(spec: str) -> str:
    """'tn@runs/tn-viton/final.pt' -> 'tn@tn-viton': short, and still says which training run."""
    name, _, checkpoint = spec.partition("@")
    return f"{name}@{Path(checkpoint).parent.name or Path(checkpoint).stem}" if checkpoint else name


def format_table(results: pd.DataFrame, ks: Sequence[int] = DEFAULT_KS, markdown: bool = False) -> str:
    """The Table-4-shaped view: one line per proxy+descriptor, mAP@k then recall@k, 4 decimals."""
    columns = ["proxy", "descriptor", "index", "queries", "gallery"] + [f"mAP@{k}" for k in ks] + [f"recall@{k}" for k in ks]
    view = results[[c for c in columns if c in results.columns]].copy()
    for column in view.columns:
        if column.startswith(("mAP@", "recall@")):
            view[column] = view[column].map(lambda v: f"{v:.4f}")
    if markdown:
        header = "| " + " | ".join(view.columns) + " |"
        rule = "|" + "|".join("---" if c in ("proxy", "descriptor", "index") else "---:" for c in view.columns) + "|"
        body = ["| " + " | ".join(str(v) for v in row) + " |" for row in view.itertuples(index=False)]
        return "\n".join([header, rule, *body])
    return view.to_string(index=False)
