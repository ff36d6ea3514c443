"""TEST-ONLY stand-in for `street2shop.Pipeline` (the pipeline branch writes the real one): the
agreed interface over `street2shop.engine.Searcher`, so the service can be tested before it lands.

The catalog's photo paths live in `<index_dir>.catalog.json` beside the index directory.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from retrieval.io import read_image
from street2shop.engine import DESCRIPTOR_FILE, Searcher, build_index, descriptor_state_bytes


@dataclass(frozen=True)
class Hit:
    rank: int
    product_id: str
    score: float


@dataclass(frozen=True)
class Result:
    hits: list
    descriptor_input: np.ndarray
    crop_box: Optional[tuple]
    timings_ms: dict


def _catalog_file(index_dir: Path) -> Path:
    return index_dir.with_name(index_dir.name + ".catalog.json")


def build_searcher_pipeline(catalog, descriptor, index_dir: Path) -> Path:
    build_index(catalog, descriptor, index_dir, progress=False)
    images = {str(p): str(i) for p, i in zip(catalog["product_id"], catalog["image"])}
    _catalog_file(index_dir).write_text(json.dumps(images))
    return index_dir


class SearcherPipeline:
    calls = 0  # search calls, all instances: lets tests see batching

    def __init__(self, index_dir: Path):
        self.index_dir = Path(index_dir)
        self.searcher = Searcher(self.index_dir, device="cpu")
        self.images = json.loads(_catalog_file(self.index_dir).read_text())
        self._files = Path(tempfile.mkdtemp(prefix="searcher-pipeline-"))
        self._count = 0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, index_dir, *, device: str = "cpu") -> "SearcherPipeline":
        return cls(index_dir)

    def _as_file(self, image) -> str:
        if isinstance(image, (str, Path)):
            return str(image)
        with self._lock:
            self._count += 1
            path = self._files / f"{self._count}.img"
        path.write_bytes(image)
        return str(path)

    def search(self, images, k: int = 10) -> list:
        type(self).calls += 1
        single = not isinstance(images, list)
        paths = [self._as_file(i) for i in ([images] if single else images)]
        started = time.perf_counter()
        table = self.searcher.search(paths, k=min(k, self.ntotal))
        elapsed = (time.perf_counter() - started) * 1000.0
        per = len(table) // len(paths)
        results = []
        for i, path in enumerate(paths):
            rows = table.iloc[i * per : (i + 1) * per]
            hits = [Hit(int(r.rank), str(r.product_id), float(r.score)) for r in rows.itertuples()]
            results.append(Result(hits, read_image(path), None, {"search": elapsed}))
        return results[0] if single else results

    def add(self, product_ids: Sequence[str], images: Sequence) -> None:
        from retrieval.features import extract_features

        paths = [self._as_file(i) for i in images]
        descriptor = self.searcher.descriptor
        vectors = extract_features(self.searcher.embed, paths, descriptor.input_spec.size, device=descriptor.device)
        self.searcher.index.add(vectors, list(product_ids))
        self.images.update(zip(product_ids, paths))

    def remove(self, product_ids: Sequence[str]) -> None:
        self.searcher.index.remove(list(product_ids))
        for product_id in product_ids:
            del self.images[product_id]

    def save(self) -> None:
        attachments = {DESCRIPTOR_FILE: descriptor_state_bytes(self.searcher.descriptor)}
        self.searcher.index.save(self.index_dir, attachments=attachments)
        _catalog_file(self.index_dir).write_text(json.dumps(self.images))

    def product_image_path(self, product_id: str) -> Path:
        return Path(self.images[product_id])

    def describe(self) -> dict:
        return {"descriptor": self.searcher.descriptor.name, "proxy": "none", "products": self.ntotal}

    @property
    def ntotal(self) -> int:
        return self.searcher.index.ntotal
