"""Extraction speed per descriptor: images/s with decoding, and of the descriptor alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd
import torch

from retrieval.batching import fit_descriptor, iter_batches, load_batch
from retrieval.datasets import load_dataset
from retrieval.descriptors import create_descriptor


def extraction_speed(
    descriptors: Sequence[str],
    n_images: int = 64,
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    cache_dir: Path | None = None,
) -> List[Dict]:
    """Time `embed` on synthetic street photos (fitted first where needed, untimed).

    Returns one dict per descriptor: images, input size, dim, images/s end to end (read + decode +
    resize + embed, as `street2shop index` runs it) and images/s of the descriptor alone.
    """
    data = load_dataset(f"synthetic:{max(n_images, 60)}", split="all", cache_dir=cache_dir)
    paths = list(data.queries["image"])[:n_images] + list(data.catalog["image"])
    paths = paths[:n_images]
    rows = []
    for name in descriptors:
        descriptor = create_descriptor(name).to(device).eval()
        size = descriptor.input_spec.size
        fit_descriptor(descriptor, list(data.catalog["image"])[:60], batch_size=batch_size, progress=False)
        descriptor.embed(load_batch(paths[:2], size).to(device))  # warm-up: first-call allocations
        started = time.perf_counter()
        for batch in iter_batches(paths, size, batch_size):
            descriptor.embed(batch.to(device))
        _sync(device)
        end_to_end = time.perf_counter() - started
        tensors = [load_batch(paths[i : i + batch_size], size).to(device) for i in range(0, len(paths), batch_size)]
        started = time.perf_counter()
        for batch in tensors:
            descriptor.embed(batch)
        _sync(device)
        compute = time.perf_counter() - started
        rows.append(
            {
                "descriptor": name,
                "images": len(paths),
                "input HxW": f"{size[0]}x{size[1]}",
                "dim": descriptor.dim,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "img/s (read+embed)": len(paths) / end_to_end,
                "img/s (embed only)": len(paths) / compute,
            }
        )
    return rows


@torch.no_grad()
def proxy_speed(
    proxies: Sequence[str],
    n_images: int = 32,
    batch_size: int = 16,
    size: tuple = (256, 192),
    device: torch.device = torch.device("cpu"),
    cache_dir: Path | None = None,
) -> List[Dict]:
    """Images/s of each proxy stage alone on synthetic person photos at `size` (VITON's 256x192).

    A proxy runs before the descriptor on every query, so a query's cost is roughly
    1/proxy + 1/descriptor seconds per image. Trained and untrained proxies cost the same.
    """
    from generation.proxies import create_proxy

    data = load_dataset(f"synthetic:{max(n_images, 60)}", split="all", cache_dir=cache_dir)
    paths = list(data.queries["image"])[:n_images]
    tensors = [load_batch(paths[i : i + batch_size], size).to(device) for i in range(0, len(paths), batch_size)]
    rows = []
    for spec in proxies:
        proxy = create_proxy(spec).to(device).eval()
        proxy(tensors[0][:2])  # warm-up: first-call allocations, lazy parser loading
        started = time.perf_counter()
        for batch in tensors:
            proxy(batch)
        _sync(device)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "proxy": spec,
                "images": len(paths),
                "input HxW": f"{size[0]}x{size[1]}",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "img/s": len(paths) / seconds,
            }
        )
    return rows


def format_extraction_table(rows: List[Dict]) -> str:
    frame = pd.DataFrame(rows)
    return "extraction speed\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.1f}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
