"""Shared pieces of the project's conditional GANs (PaintNet, pix2pix, DTGAN).

Small on purpose; every generator in `generation/` builds on these and nothing else:

- layers: `conv_block` (conv -> [BN] -> L-ReLU/ReLU/Tanh) and `up_block` (transposed conv -> ...),
  `init_gan_weights` (DCGAN's N(0, 0.02) initialisation), `set_requires_grad`;
- value ranges: generators work in [-1, 1] (tanh); `to_gan_range` / `from_gan_range` convert from/to the
  project's [0, 1] images;
- losses: `adversarial_loss(logits, real, mode)` for one side of the game (generator or discriminator),
  `discriminator_loss(real_logits, fake_logits, mode)` for a discriminator step; modes "bce" (the
  log-loss of the papers, computed on logits), "lsgan" and "hinge";
- data: `prepare_pair_tensors(train_pairs, cache_path, size)` turns the training pairs of a data set
  (person photo, LIP parse map, product photo, product mask) into uint8 tensors once and caches them,
  including the paper's segmented texture T_m cut out with the *ground-truth* garment labels;
- loop: `GanTrainer`, the epoch/batch loop over those tensors on top of `retrieval.training.TrainingRun`
  (checkpoints, exact resume, time budget, losses.csv/png), which also writes a sample grid PNG every
  `sample_every` steps to ``<out_dir>/samples/step_NNNNNN.png``;
- `save_sample_grid(columns, path)`: rows = examples, columns = named images (photo | texture | ...).

Example (the shape of a training loop; see generation/paintnet.py for a complete one):
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
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.garments import GARMENT_LABELS, segmented_texture
from retrieval.io import read_image, read_mask, write_bytes_atomic, write_image_atomic
from retrieval.training import TrainingRun, atomic_torch_save, load_checkpoint

log = logging.getLogger("street2shop.gan")

GAN_MODES = ("bce", "lsgan", "hinge")
PAIR_CACHE_VERSION = 1
# Keys of the dict `prepare_pair_tensors` returns (all uint8; images (N, 3, H, W), masks (N, 1, H, W)).
PAIR_KEYS = ("person", "texture", "product", "shape", "garment")


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _activation(name: Optional[str]) -> Optional[nn.Module]:
    if name is None:
        return None
    table = {
        "lrelu": lambda: nn.LeakyReLU(0.2, inplace=True),
        "relu": lambda: nn.ReLU(inplace=True),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(table)} or None")
    return table[name]()


def conv_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 4,
    stride: int = 2,
    padding: int = 1,
    norm: bool = True,
    activation: Optional[str] = "lrelu",
) -> nn.Sequential:
    """Convolution -> optional BatchNorm -> activation (Leaky-ReLU 0.2 by default).

    The default (4x4, stride 2, padding 1) halves the resolution: the encoder/discriminator layer of
    DCGAN, pix2pix, DTGAN and PaintNet's Table 1. The convolution has no bias when BN follows it.

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, out_channels, floor((H + 2 * padding - kernel_size) / stride) + 1, ...).

    Example:
        >>> conv_block(6, 96)(torch.zeros(2, 6, 64, 64)).shape
        torch.Size([2, 96, 32, 32])
    """
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    act = _activation(activation)
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def up_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 4,
    stride: int = 2,
    padding: int = 1,
    norm: bool = True,
    activation: Optional[str] = "relu",
    dropout: float = 0.0,
) -> nn.Sequential:
    """Transposed convolution -> optional BatchNorm -> optional dropout -> activation (ReLU by default).

    The default (4x4, stride 2, padding 1) doubles the resolution ("stride 1/2" in the papers' tables).

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, out_channels, (H - 1) * stride - 2 * padding + kernel_size, ...).

    Example:
        >>> up_block(96, 3, norm=False, activation="tanh")(torch.zeros(2, 96, 32, 32)).shape
        torch.Size([2, 3, 64, 64])
    """
    layers = [nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    act = _activation(activation)
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


@torch.no_grad()
def init_gan_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """DCGAN initialisation: conv weights ~ N(0, std), BN weights ~ N(1, std), biases 0. Returns `module`."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.InstanceNorm2d)) and layer.weight is not None:
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)
    return module


def set_requires_grad(modules: nn.Module | Iterable[nn.Module], flag: bool) -> None:
    """Switch gradients of every parameter of `modules` on or off (freeze D during the G step)."""
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


def to_gan_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the tanh range of the generators)."""
    return images * 2.0 - 1.0


def from_gan_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def adversarial_loss(logits: torch.Tensor, real: bool, mode: str = "bce") -> torch.Tensor:
    """One side of the GAN game on raw discriminator outputs (logits, any shape), averaged.

    - "bce": -log sigmoid(x) for real, -log(1 - sigmoid(x)) for fake: eq. 7 of PaintNet, the original GAN
      log-loss. A generator calls it with ``real=True`` on its fakes (the non-saturating form).
    - "lsgan": (x - 1)^2 for real, x^2 for fake.
    - "hinge": relu(1 - x) for real, relu(1 + x) for fake (the discriminator's side; a generator uses
      `generator_loss`, which is -x for hinge).

    Example:
        >>> round(adversarial_loss(torch.zeros(4), real=True).item(), 4)  # log 2
        0.6931
    """
    if mode == "bce":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return ((logits - 1.0) ** 2).mean() if real else (logits**2).mean()
    if mode == "hinge":
        return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()
    raise ValueError(f"unknown GAN loss mode {mode!r}; valid: {', '.join(GAN_MODES)}")


def generator_loss(fake_logits: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's logits for its fakes (non-saturating).

    Example:
        >>> generator_loss(torch.tensor([2.0]), mode="hinge").item()
        -2.0
    """
    if mode == "hinge":
        return -fake_logits.mean()
    return adversarial_loss(fake_logits, real=True, mode=mode)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """0.5 * (loss on real + loss on fake): the mean per-sample loss over a half-real, half-fake batch.

    Example:
        >>> round(discriminator_loss(torch.zeros(2), torch.zeros(2)).item(), 4)
        0.6931
    """
    return 0.5 * (adversarial_loss(real_logits, True, mode) + adversarial_loss(fake_logits, False, mode))


# --------------------------------------------------------------------------------------------------
# Paired training data, preprocessed once
# --------------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=interpolation)


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


def uint8_to_gan(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


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

    def batch(self, data: Mapping[str, torch.Tensor], indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Rows `indices` of every tensor of `data` on the trainer's device; uint8 become [-1, 1] floats.

        The batch also holds "index" (B,) int64: the rows' positions in `data`.
        """
        out = {"index": indices.to(self.device)}
        for name, tensor in data.items():
            rows = tensor[indices].to(self.device)
            out[name] = uint8_to_gan(rows) if rows.dtype == torch.uint8 else rows
        return out

    def train(
        self,
        data: Mapping[str, torch.Tensor],
        epochs: int,
        batch_size: int,
        step: StepFn,
        sample: Optional[SampleFn] = None,
    ) -> None:
        """Run `step(batch, generator) -> {loss name: value}` over `epochs` epochs (or the time budget).

        Batches hold `batch_size` rows (the last, partial one is dropped when the data holds at least one
        full batch, so BatchNorm never sees a batch of one). `sample(batch) -> [(label, images in [0, 1])]`
        makes the columns of the sample grid.
        """
        n = len(next(iter(data.values())))
        if n == 0:
            raise ValueError("GanTrainer.train got no training rows")
        batch_size = max(1, min(int(batch_size), n))
        self._sample_fn = sample
        self._sample_batch = self.batch(data, torch.arange(min(self.n_samples, n)))
        for epoch in self.run.epochs(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            stop = n - n % batch_size if n >= batch_size else n
            chunks = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
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
