"""Tables 2-3 of the PaintNet paper: how close is a proxy's output to the product the person wears?

Every proxy stage maps a person photo to an image; for a generative proxy (PaintNet, its ablations,
pix2pix, DTGAN) that image claims to *be* the product photo, so it is scored against the true product
photo of the pair at the paper's 64x64: RMSE and SSIM (`generation.metrics`), plus the Inception-Score
formula with the pretrained EfficientNet-Lite0 classifier (`IS_NAME`: not comparable with the paper's
Inception numbers, only with each other). Two reference rows make the numbers readable: the *mean
product* (one constant image, the pixel mean of the training product photos: what a generator that
learned nothing but the average earns) and the *real products* (IS of the ground truth itself).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from generation.metrics import IS_NAME, inception_style_score, rmse, ssim
from retrieval.batching import iter_batches, sample_paths

log = logging.getLogger("street2shop.generation")

#: (H, W) the person photo is read at before the proxy: VITON's native size.
PERSON_SIZE = (256, 192)
#: Side of the square the paper compares generated and real product images at (Table 1: 64x64).
COMPARE_SIZE = 64


def _to_compare_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size), antialiased, clamped."""
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(
        0, 1
    )


def evaluation_pairs(dataset, n_samples: Optional[int], seed: int = 0) -> Tuple[List[str], List[str]]:
    """(person photos, their product photos) of a seeded sample of the evaluation queries.

    Queries are the dataset's street photos; each query's (first) relevant product is its target.
    """
    queries = dataset.queries.drop_duplicates("query_id")
    product_image = dict(zip(dataset.catalog["product_id"].astype(str), dataset.catalog["image"]))
    keep = sample_paths(list(range(len(queries))), n_samples, seed)
    rows = queries.iloc[keep]
    return list(rows["image"]), [product_image[str(p)] for p in rows["product_id"]]


def mean_product_image(
    product_paths: Sequence[str], size: int = COMPARE_SIZE, limit: int = 1000, seed: int = 0
) -> torch.Tensor:
    """(1, 3, size, size): the pixel mean of (a sample of) product photos, the 'learned nothing' reference."""
    total, count = None, 0
    for batch in iter_batches(sample_paths(list(product_paths), limit, seed), PERSON_SIZE, 64):
        batch = _to_compare_size(batch, size)
        total = batch.sum(0, keepdim=True) if total is None else total + batch.sum(0, keepdim=True)
        count += len(batch)
    if total is None:
        raise ValueError("no product images to average")
    return total / count


@torch.no_grad()
def evaluate_generation(
    proxies: Sequence[Tuple[str, torch.nn.Module]],
    person_paths: Sequence[str],
    product_paths: Sequence[str],
    *,
    reference_products: Optional[Sequence[str]] = None,
    size: int = COMPARE_SIZE,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    inception: bool = True,
    progress: bool = True,
) -> Tuple[pd.DataFrame, Dict[str, torch.Tensor]]:
    """Score each (label, proxy) on the same person -> product pairs.

    Args:
        proxies: (label, proxy) pairs; a proxy maps (B, 3, H, W) person photos to (B, 3, H, W) images.
        person_paths, product_paths: aligned lists, person photo i wears product i.
        reference_products: product photos (e.g. the training split's) whose pixel mean is the
            "mean product" reference row; None skips that row.
        size: comparison side (64 = the paper's).
        inception: also compute the IS-style score (costs one classifier pass per image).

    Returns:
        (table, first_batch): table with one row per proxy plus the reference rows: method, images,
        rmse, rmse_std, ssim, ssim_std, is_mean, is_std; first_batch maps each label (and "person",
        "product") to its first batch at `size`, for sample grids.
    """
    if len(person_paths) != len(product_paths) or not person_paths:
        raise ValueError(
            f"need aligned, non-empty person/product lists, got {len(person_paths)} and {len(product_paths)}"
        )
    targets = torch.cat([_to_compare_size(b, size) for b in iter_batches(list(product_paths), PERSON_SIZE, 64)])
    first_batch: Dict[str, torch.Tensor] = {"product": targets[:batch_size]}
    rows: List[Dict] = []
    for label, proxy in proxies:
        proxy = proxy.to(device).eval()
        outputs = []
        bar = tqdm(total=len(person_paths), desc=f"generate {label}", unit="img", disable=not progress, leave=False)
        for batch in iter_batches(list(person_paths), PERSON_SIZE, batch_size):
            if "person" not in first_batch:
                first_batch["person"] = _to_compare_size(batch, size)
            outputs.append(_to_compare_size(proxy(batch.to(device)).float().cpu(), size))
            bar.update(len(batch))
        bar.close()
        generated = torch.cat(outputs)
        first_batch[label] = generated[:batch_size]
        rows.append(_score(label, generated, targets, inception))
    if reference_products is not None:
        mean = mean_product_image(reference_products, size).expand_as(targets)
        rows.append(_score("mean product (reference)", mean, targets, inception=False))
        first_batch["mean product (reference)"] = mean[:batch_size]
    if inception:
        is_mean, is_std = inception_style_score(targets, splits=min(10, len(targets)))
        rows.append(
            {"method": "real products (reference)", "images": len(targets), "is_mean": is_mean, "is_std": is_std}
        )
    return pd.DataFrame(rows), first_batch


def _score(label: str, generated: torch.Tensor, targets: torch.Tensor, inception: bool) -> Dict:
    per_rmse = rmse(generated, targets, reduction="none")
    per_ssim = ssim(generated, targets, reduction="none")
    row = {
        "method": label,
        "images": len(generated),
        "rmse": float(per_rmse.mean()),
        "rmse_std": float(per_rmse.std()),
        "ssim": float(per_ssim.mean()),
        "ssim_std": float(per_ssim.std()),
    }
    if inception:
        row["is_mean"], row["is_std"] = inception_style_score(generated, splits=min(10, len(generated)))
    return row


def sample_grid(first_batch: Dict[str, torch.Tensor], labels: Sequence[str], rows: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 grid: one row per pair, columns person | each label's output | true product."""
    columns = ["person", *labels, "product"]
    n = min(rows, *(len(first_batch[c]) for c in columns))
    tiles = torch.stack([first_batch[c][:n] for c in columns], dim=1)  # (n, C, 3, S, S)
    n, c, _, s, _ = tiles.shape
    tiles = F.pad(tiles, (1, 1, 1, 1), value=1.0)  # white gutters
    grid = tiles.permute(0, 3, 1, 4, 2).reshape(n * (s + 2), c * (s + 2), 3)
    return (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def format_generation_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """RMSE (lower is better), SSIM and the IS-style score (higher is better), 4 decimals."""
    view = pd.DataFrame({"method": table["method"], "images": table["images"]})
    for metric in ("rmse", "ssim"):
        view[metric.upper()] = [
            "" if pd.isna(m) else f"{m:.4f} ± {s:.4f}"
            for m, s in zip(table.get(metric, np.nan), table.get(f"{metric}_std", np.nan))
        ]
    if "is_mean" in table:
        view[IS_NAME] = ["" if pd.isna(m) else f"{m:.3f} ± {s:.3f}" for m, s in zip(table["is_mean"], table["is_std"])]
    if not markdown:
        return view.to_string(index=False)
    header = "| " + " | ".join(view.columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in view.columns[1:]) + "|"
    return "\n".join(
        [header, rule, *("| " + " | ".join(str(v) for v in row) + " |" for row in view.itertuples(index=False))]
    )
