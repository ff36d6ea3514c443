"""The GANs' paired training data and the loop over it, shared by PaintNet, pix2pix and DTGAN.

- data: `prepare_pair_tensors(train_pairs, cache_path, size)` turns the training pairs of a data set
  (person photo, LIP parse map, product photo, product mask) into uint8 tensors once and caches them,
  including the paper's segmented texture T_m cut out with the *ground-truth* garment labels;
  `save_pair_archive` / `load_pair_archive` carry them to a machine without the photos;
- loop: `GanTrainer`, the epoch/batch loop over those tensors on top of `retrieval.training.TrainingRun`
  (checkpoints, exact resume, time budget, losses.csv/png), which also writes a sample grid PNG every
  `sample_every` steps to ``<out_dir>/samples/step_NNNNNN.png``;
- `save_sample_grid(columns, path)`: rows = examples, columns = named images (photo | texture | ...).

The networks, value ranges and losses they train with are in `generation.gan` (inference needs those).

Example (the shape of a training loop; see generation/training/gan.py for a complete one):
    >>> trainer = GanTrainer(out_dir, {"g": g, "d": d}, {"g": opt_g, "d": opt_d}, config, seed=0)  # doctest: +SKIP
    >>> data = prepare_pair_tensors(dataset.train, out_dir / "pairs_64.pt", size=(64, 64))  # doctest: +SKIP
    >>> trainer.train(data, epochs=5, batch_size=16, step=my_step, sample=my_sample_columns)  # doctest: +SKIP
    >>> final = trainer.finish()                                             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generation.gan import uint8_to_gan
from retrieval.files import write_bytes_atomic, write_image_atomic
from retrieval.garments import GARMENT_LABELS, segmented_texture
from retrieval.io import read_image, read_mask
from retrieval.training import TrainingRun, atomic_torch_save, load_checkpoint

log = logging.getLogger("street2shop.gan")

PAIR_CACHE_VERSION = 1
# Keys of the dict `prepare_pair_tensors` returns (all uint8; images (N, 3, H, W), masks (N, 1, H, W)).
PAIR_KEYS = ("person", "texture", "product", "shape", "garment")


# --------------------------------------------------------------------------------------------------
# Paired training data, preprocessed once
# --------------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=interpolation)


def count_parse_maps(train_pairs) -> int:
    """How many training pairs name a parse map (a non-empty ``parse`` path)."""
    if train_pairs is None or "parse" not in train_pairs:
        return 0
    return int(train_pairs["parse"].map(lambda p: isinstance(p, str) and bool(p.strip())).sum())


def require_parse_maps(dataset, model_name: str) -> None:
    """Refuse, clearly, to train `model_name` on a data set whose training pairs have no parse map.

    The published shop sets (DeepFashion2, DeepFashion Consumer-to-shop, Street2Shop, Lookbook) and a CSV
    without a ``parse`` column give none. The message names what can still be trained there: the trainable
    descriptors (their trainers read photo pairs only) and no proxy (every trainable proxy learns from the
    garment masks of parse maps), and how to bring a proxy trained elsewhere.

    Raises:
        ValueError: no training pair of `dataset` has a parse map.
    """
    if count_parse_maps(dataset.train) > 0:
        return
    from generation.proxies import PROXIES, list_proxies
    from retrieval.descriptors import DESCRIPTORS, list_descriptors

    proxies = [name for name in list_proxies() if getattr(PROXIES.get(name), "trainable", False)]
    descriptors = [name for name in list_descriptors() if getattr(DESCRIPTORS.get(name), "trainable", False)]
    pairs = 0 if dataset.train is None else len(dataset.train)
    raise ValueError(
        f"{dataset.name}: {model_name} learns from parse maps (the training pairs' 'parse' column: LIP labels of "
        f"each person photo), and none of its {pairs} training pairs has one. No proxy can be trained on this set "
        f"(every trainable proxy, {', '.join(proxies)}, needs them); the descriptors can ({', '.join(descriptors)}; "
        "l2net and lfnet on homographies only: --set garment_pairs_weight=0). Train "
        f"{model_name} on a set with parse maps (viton:ROOT, or a csv: PAIRS.csv with a parse column) and use it "
        f"here as {model_name}@RUN/final.pt"
    )


def _garment_mask(parse_path: Optional[str], shape: Tuple[int, int]) -> np.ndarray:

    if parse_path is None:
        raise ValueError("a training pair has no parse map: prepare_pair_tensors needs the ground-truth parses")
    labels = read_mask(parse_path)
    if labels.shape != shape:
        labels = _resize(labels, shape, nearest=True)
    return np.isin(labels, GARMENT_LABELS).astype(np.uint8)


def _product_mask(row, product: np.ndarray, shape_maps: str) -> np.ndarray:
    if shape_maps == "cloth_mask" and row.mask is not None:
        mask = read_mask(row.mask)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != product.shape[:2]:
            mask = _resize(mask, product.shape[:2], nearest=True)
        return (mask >= 128).astype(np.uint8)  # VITON's cloth-masks are JPEGs: threshold at 128 (README)
    from generation.shape_maps import grabcut_shape_map

    return (grabcut_shape_map(product) > 0).astype(np.uint8)


def _one_pair(row, size: Tuple[int, int], shape_maps: str) -> Dict[str, np.ndarray]:
    person = read_image(row.person_image)
    product = read_image(row.product_image)
    garment = _garment_mask(row.parse, person.shape[:2])
    shape = _product_mask(row, product, shape_maps)
    return {
        "person": _resize(person, size),
        "product": _resize(product, size),
        "shape": (_resize(shape * 255, size) >= 128).astype(np.uint8) * 255,
        "garment": (_resize(garment * 255, size) >= 128).astype(np.uint8) * 255,
        "person_full": person,
        "garment_full": garment,
    }


def _pairs_key(train_pairs, size, shape_maps) -> str:
    digest = hashlib.sha256(f"v{PAIR_CACHE_VERSION}|{tuple(size)}|{shape_maps}".encode())
    for column in ("person_image", "product_image", "parse", "mask"):
        digest.update("|".join(map(str, train_pairs[column].tolist())).encode())
    return digest.hexdigest()[:16]


def prepare_pair_tensors(
    train_pairs,
    cache_path: Optional[Path] = None,
    size: Tuple[int, int] = (64, 64),
    shape_maps: str = "cloth_mask",
    workers: int = 2,
    progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """Training pairs -> uint8 tensors at `size`, computed once and cached at `cache_path`.

    Every image is resized to `size` directly (VITON's 256x192 photos become square): generated
    images are resized back to the query's own size, so the stretch is undone downstream and every
    pixel of the small canvas is used for the garment.

    Args:
        train_pairs: a `RetrievalSet.train` table (person_image, product_image, parse, mask columns).
        cache_path: a .pt file; reused when its key (files, size, shape_maps) matches, else rewritten.
        size: (H, W) of every tensor.
        shape_maps: product shape maps from "cloth_mask" (the data set's product masks, thresholded at
            128; GrabCut for a pair without one) or "grabcut" (`generation.shape_maps.grabcut_shape_map`
            on the product photo, as the paper did for Lookbook).
        workers: decoding threads.
        progress: show a tqdm bar.

    Returns:
        dict of uint8 tensors, N = len(train_pairs):
        "person" (N, 3, H, W) the person photo; "texture" (N, 3, H, W) the segmented texture T_m (garment
        labels 5, 6, 7 of the ground-truth parse cut out on white, cropped to their box, aspect kept, by
        `generation.parsing.segmented_texture`); "product" (N, 3, H, W) the product photo; "shape"
        (N, 1, H, W) the product's shape map (0 / 255); "garment" (N, 1, H, W) the person's garment mask.
    """
    if shape_maps not in ("cloth_mask", "grabcut"):
        raise ValueError(f"shape_maps must be 'cloth_mask' or 'grabcut', got {shape_maps!r}")
    size = (int(size[0]), int(size[1]))
    key = _pairs_key(train_pairs, size, shape_maps)
    if cache_path is not None and Path(cache_path).exists():
        cached = load_checkpoint(cache_path)
        if cached.get("key") == key:
            return cached["tensors"]
        log.warning("%s was made from other pairs or settings: recomputing it", cache_path)
    if len(train_pairs) == 0:
        raise ValueError("prepare_pair_tensors got no training pairs")

    rows = list(train_pairs.itertuples(index=False))
    columns: Dict[str, list] = {k: [] for k in PAIR_KEYS}
    pending: list = []

    def flush() -> None:
        # The texture is cut from the full-resolution photo (so the crop keeps the garment's detail), a
        # chunk of same-size photos at a time: one batched call instead of one per pair.
        by_size: Dict[tuple, list] = {}
        for position, item in enumerate(pending):
            by_size.setdefault(item["person_full"].shape, []).append(position)
        textures: list = [None] * len(pending)
        for positions in by_size.values():
            person = (
                torch.from_numpy(np.stack([pending[i]["person_full"] for i in positions])).permute(0, 3, 1, 2).float()
                / 255.0
            )
            garment = torch.from_numpy(np.stack([pending[i]["garment_full"] for i in positions]))[:, None].float()
            cut = segmented_texture(person, garment, size=size)
            for i, texture in zip(positions, cut):
                textures[i] = (texture * 255.0).round().clamp(0, 255).to(torch.uint8)
        columns["texture"].extend(textures)
        pending.clear()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda row: _one_pair(row, size, shape_maps), rows)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(rows), desc="prepare pairs", unit="pair", leave=False)
        for item in results:
            for name in ("person", "product"):
                columns[name].append(torch.from_numpy(item[name]).permute(2, 0, 1).contiguous())
            for name in ("shape", "garment"):
                columns[name].append(torch.from_numpy(item[name])[None].contiguous())
            pending.append(item)
            if len(pending) == 64:
                flush()
        flush()
    tensors = {name: torch.stack(values) for name, values in columns.items()}
    if cache_path is not None:
        atomic_torch_save({"key": key, "tensors": tensors}, cache_path)
    return tensors


#: Version of the pair archive format (`save_pair_archive`).
PAIR_ARCHIVE_VERSION = 1


def save_pair_archive(tensors: Mapping[str, torch.Tensor], path: Path, workers: int = 2) -> Path:
    """Write the tensors of `prepare_pair_tensors` as a compact, lossless archive (.npz).

    Why: the uncompressed pairs_64.pt of VITON's 3,639 training pairs is 164 MB; the archive (lossless
    WebP for images, PNG for masks) is about 36 MB, small enough to carry to a GPU machine that has no
    copy of the photos, where `load_pair_archive` (or `train paintnet --set pairs=FILE`) reads it back
    bit for bit.

    Args:
        tensors: {name: uint8 (N, C, H, W)} with C 1 or 3, every entry the same N.
        path: destination .npz, written atomically.

    Returns:
        `path`.
    """
    path = Path(path)
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"pair tensors of different lengths: {lengths}")
    arrays: Dict[str, np.ndarray] = {"version": np.array(PAIR_ARCHIVE_VERSION)}

    def encode(image: np.ndarray) -> bytes:
        if image.shape[-1] == 3:  # (H, W, 3) RGB -> lossless WebP of the BGR array OpenCV expects
            ok, buffer = cv2.imencode(".webp", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_WEBP_QUALITY, 101])
        else:
            ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image[..., 0]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode an image of shape {image.shape} for {path}")
        return buffer.tobytes()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, values in tensors.items():
            if values.dtype != torch.uint8 or values.ndim != 4 or values.shape[1] not in (1, 3):
                raise ValueError(f"{name}: expected uint8 (N, 1 or 3, H, W), got {values.dtype} {tuple(values.shape)}")
            encoded = list(pool.map(encode, values.permute(0, 2, 3, 1).numpy()))
            arrays[f"{name}__bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            arrays[f"{name}__offsets"] = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
            arrays[f"{name}__shape"] = np.array(values.shape, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # the payload is compressed already
    return write_bytes_atomic(path, buffer.getvalue())


def load_pair_archive(path: Path, workers: int = 2) -> Dict[str, torch.Tensor]:
    """Read a `save_pair_archive` file back: {name: uint8 (N, C, H, W)}, identical to what was saved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair archive not found: {path} (write one with `street2shop export-pairs`)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a pair archive of `street2shop export-pairs` ({exc})") from exc
    with archive:
        if "version" not in archive or int(archive["version"]) != PAIR_ARCHIVE_VERSION:
            raise ValueError(f"{path} is not a version-{PAIR_ARCHIVE_VERSION} pair archive; export it again")
        names = sorted({key.split("__")[0] for key in archive.files if "__" in key})
        tensors: Dict[str, torch.Tensor] = {}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for name in names:
                payload, offsets = archive[f"{name}__bytes"], archive[f"{name}__offsets"]
                shape = tuple(int(v) for v in archive[f"{name}__shape"])
                flag = cv2.IMREAD_COLOR if shape[1] == 3 else cv2.IMREAD_GRAYSCALE
                decoded = list(
                    pool.map(lambda i: cv2.imdecode(payload[offsets[i] : offsets[i + 1]], flag), range(shape[0]))
                )
                if any(image is None for image in decoded):
                    raise ValueError(
                        f"{path}: {name} holds images that do not decode; the archive is damaged, export it again"
                    )
                stacked = np.stack(decoded)
                stacked = stacked[..., ::-1].transpose(0, 3, 1, 2) if shape[1] == 3 else stacked[:, None]
                tensors[name] = torch.from_numpy(np.ascontiguousarray(stacked))
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(f"{path}: {name} decodes to {tuple(tensors[name].shape)}, expected {shape}")
    return tensors


# --------------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------------


def save_sample_grid(
    columns: Sequence[Tuple[str, torch.Tensor]], path: Path, cell: int = 96, max_rows: int = 8
) -> Path:
    """Write a PNG: one row per example, one labelled column per named image batch.

    Args:
        columns: (label, images) pairs; images (B, 1 or 3, H, W) float in [0, 1] (clamped), all with
            the same B; each cell is resized to `cell` x `cell`.
        path: destination PNG (written atomically).
        cell: side of one cell in pixels.
        max_rows: at most this many examples.

    Returns:
        `path`.
    """
    if not columns:
        raise ValueError("save_sample_grid needs at least one column")
    rows = min(min(int(images.shape[0]) for _, images in columns), max_rows)
    header = 16
    canvas = np.full((header + rows * cell, len(columns) * cell, 3), 255, np.uint8)
    for c, (label, images) in enumerate(columns):
        images = images[:rows].detach().float().cpu().clamp(0, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = F.interpolate(images, size=(cell, cell), mode="bilinear", align_corners=False)
        tiles = (images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        for r in range(rows):
            canvas[header + r * cell : header + (r + 1) * cell, c * cell : (c + 1) * cell] = tiles[r]
        cv2.putText(canvas, label[:14], (c * cell + 3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return write_image_atomic(path, canvas, compress_level=1)


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------

StepFn = Callable[[Dict[str, torch.Tensor], torch.Generator], Mapping[str, float]]
SampleFn = Callable[[Dict[str, torch.Tensor]], Sequence[Tuple[str, torch.Tensor]]]
# The rows of one batch: (B,) int64 rows of every tensor, or {tensor name: (B,) rows} (unpaired domains).
BatchRows = Union[torch.Tensor, Mapping[str, torch.Tensor]]
# epoch -> that epoch's batches, in order; deterministic in the epoch so that a resumed run sees the same.
SamplerFn = Callable[[int], Sequence[BatchRows]]


class GanTrainer:
    """Epochs of shuffled mini-batches over cached uint8 tensors, on top of `TrainingRun`.

    The caller writes the optimisation step (what a GAN step is differs between models); the trainer
    owns the order of batches (a permutation seeded by (seed, epoch), so a resumed run sees exactly the
    batches it would have seen), the per-step random generator handed to `step` (seeded by
    (seed, step): e.g. PaintNet's draw of irrelevant products), checkpoints, the time budget, the loss
    log and the periodic sample grids.

    Args:
        out_dir: the run directory (see `TrainingRun`); sample grids go to ``out_dir/samples/``.
        modules, optimizers, config, seed, time_budget_s, progress, checkpoint_every_s: as `TrainingRun`.
        sample_every: write a sample grid every this many steps (and at the end); 0 = never.
        n_samples: examples in a grid (the first ones of the data: the same ones all run long).
    """

    def __init__(
        self,
        out_dir: Path,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        config: Mapping[str, object],
        *,
        seed: int = 0,
        time_budget_s: Optional[float] = None,
        progress: Optional[str] = "train gan",
        checkpoint_every_s: float = 120.0,
        sample_every: int = 200,
        n_samples: int = 8,
    ):
        self.out_dir = Path(out_dir)
        self.run = TrainingRun(
            out_dir,
            modules,
            optimizers,
            config,
            seed=seed,
            time_budget_s=time_budget_s,
            checkpoint_every_s=checkpoint_every_s,
            progress=progress,
        )
        self.seed = seed
        self.sample_every = int(sample_every)
        self.n_samples = int(n_samples)
        self._sample_fn: Optional[SampleFn] = None
        self._sample_batch: Optional[Dict[str, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        for module in self.run.modules.values():
            for parameter in module.parameters():
                return parameter.device
        return torch.device("cpu")

    def batch(self, data: Mapping[str, torch.Tensor], indices: BatchRows) -> Dict[str, torch.Tensor]:
        """Rows `indices` of every tensor of `data` on the trainer's device; uint8 become [-1, 1] floats.

        The batch also holds "index" (B,) int64: the rows' positions in `data`. With `indices` a mapping
        {name: rows} (one entry per tensor of `data`), each tensor is taken at its own rows and the batch
        holds "index_<name>" for each instead.
        """
        if isinstance(indices, torch.Tensor):
            out = {"index": indices.to(self.device)}
            rows_of = {name: indices for name in data}
        else:
            if set(indices) != set(data):
                raise ValueError(f"batch rows name {sorted(indices)}, but the data holds {sorted(data)}")
            out = {f"index_{name}": rows.to(self.device) for name, rows in indices.items()}
            rows_of = dict(indices)
        for name, tensor in data.items():
            rows = tensor[rows_of[name]].to(self.device)
            out[name] = uint8_to_gan(rows) if rows.dtype == torch.uint8 else rows
        return out

    def shuffled_batches(self, n: int, batch_size: int, epoch: int) -> list:
        """The default order: a permutation seeded by (seed, epoch) cut into batches of `batch_size` rows
        (the last, partial one dropped when there is at least one full batch, so BatchNorm never sees one row)."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        stop = n - n % batch_size if n >= batch_size else n
        return [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    def train(
        self,
        data: Mapping[str, torch.Tensor],
        epochs: int,
        batch_size: int,
        step: StepFn,
        sample: Optional[SampleFn] = None,
        sampler: Optional[SamplerFn] = None,
    ) -> None:
        """Run `step(batch, generator) -> {loss name: value}` over `epochs` epochs (or the time budget).

        Batches hold `batch_size` rows of every tensor, the same rows of each (`shuffled_batches`), unless
        `sampler(epoch)` gives each epoch's batches (e.g. unpaired domains: other rows per tensor, see
        `batch`). `sample(batch) -> [(label, images in [0, 1])]` makes the columns of the sample grid.
        """
        n = len(next(iter(data.values())))
        if n == 0:
            raise ValueError("GanTrainer.train got no training rows")
        batch_size = max(1, min(int(batch_size), n))
        self._sample_fn = sample
        self._sample_batch = self.batch(data, torch.arange(min(self.n_samples, n)))
        for epoch in self.run.epochs(epochs):
            chunks = sampler(epoch) if sampler is not None else self.shuffled_batches(n, batch_size, epoch)
            for indices in self.run.skip_done(chunks):
                generator = torch.Generator(device=self.device).manual_seed(
                    self.seed * 1_000_003 + 7919 * (self.run.step + 1)
                )
                losses = step(self.batch(data, indices), generator)
                self.run.log(losses)
                if self.sample_every and self.run.step % self.sample_every == 0:
                    self.write_samples()
                if self.run.out_of_time:
                    break

    def write_samples(self) -> Optional[Path]:
        """Write ``samples/step_NNNNNN.png`` for the fixed sample batch (nothing without a sample function)."""
        if self._sample_fn is None or self._sample_batch is None:
            return None
        with torch.no_grad():
            columns = self._sample_fn(self._sample_batch)
        return save_sample_grid(columns, self.out_dir / "samples" / f"step_{self.run.step:06d}.png")

    def finish(
        self, weights: Optional[Mapping[str, torch.Tensor]] = None, extra: Optional[Mapping[str, object]] = None
    ) -> Path:
        """Final sample grid (unless sample_every is 0), then `TrainingRun.finish`; returns final.pt."""
        if self.sample_every:
            self.write_samples()
        return self.run.finish(weights=weights, extra=extra)
