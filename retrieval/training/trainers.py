"""One convention for every trainer, descriptors' and proxies' alike, kept apart from the models.

A model module (`retrieval/descriptors/tn.py`, `generation/paintnet.py`, ...) holds the network and its
inference only. Its training lives in a trainer module (`retrieval/training/tn.py`,
`generation/training/paintnet.py`, ...), which holds:

- a frozen dataclass of the training options with their defaults (the one place they are spelled);
- a function ``train(model, job, config) -> Path`` that trains ``model`` in place on ``job`` (a `TrainingJob`:
  the data set, the run directory, seed, progress and time budget) through `retrieval.training.run.TrainingRun`
  and returns final.pt;

registered for the model's registry name(s)::

    @dataclass(frozen=True)
    class TNTrainConfig:
        epochs: int = 30
        lr: float = 1e-3

    @register_trainer("tn", config=TNTrainConfig)
    def train_tn(model: TripletNet, job: TrainingJob, config: TNTrainConfig) -> Path:
        ...  # job.dataset, job.out_dir; TrainingRun(job.out_dir, ..., **job.run_options("train tn"))

`Descriptor.train_on` and `Proxy.train_on` call `train_model`, which finds the trainer, types and checks
the options (`training_config`), builds the `TrainingJob` and runs it. `split_options` is the one place
that splits `--set` options into the model's and the trainer's. Trainer modules are imported when first
needed: the model modules never import them (a trainer imports its model, not the other way round); a
higher layer adds its own with `add_trainer_modules` (generation/ does, for its proxies).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from retrieval.registry import typed_options
from retrieval.training.provenance import record_training_products


@dataclass(frozen=True)
class TrainingJob:
    """What every trainer gets from its caller besides the model and its options (never a training option).

    Attributes:
        dataset: the RetrievalSet to train on (its ``train`` pairs), or None where an option names the data.
        out_dir: the run directory (last.pt resumes; final.pt is the result).
        seed: seeds the run: batch order, augmentation, held-out slices.
        progress: whether to show progress bars.
        time_budget_s: wall-clock seconds for the whole call, or None; the trainer stops cleanly when spent.
    """

    dataset: Any
    out_dir: Path
    seed: int = 0
    progress: bool = True
    time_budget_s: Optional[float] = None

    def run_options(self, label: str) -> Dict[str, Any]:
        """``seed``, ``time_budget_s`` and ``progress`` as `TrainingRun` takes them, the bar named ``label``."""
        return {"seed": self.seed, "time_budget_s": self.time_budget_s, "progress": label if self.progress else None}


# Arguments every trainer gets from the caller (in its `TrainingJob`); never a training option of a model.
RUN_ARGUMENTS = tuple(field.name for field in dataclasses.fields(TrainingJob))[2:]

# Trainer modules of this layer, imported on first use (a new trainer file appends its module here).
_TRAINER_MODULES: List[str] = [
    "retrieval.training.delf",
    "retrieval.training.fused",
    "retrieval.training.patch",
    "retrieval.training.tn",
]


@dataclass(frozen=True)
class Trainer:
    """A registered trainer: its function and its options' frozen dataclass."""

    train: Callable[..., Path]
    config: Type[Any]

    def defaults(self) -> Dict[str, Any]:
        """{option: default} of the config dataclass."""
        return {field.name: _field_default(field) for field in dataclasses.fields(self.config)}


_TRAINERS: Dict[str, Trainer] = {}


def register_trainer(*model_names: str, config: Type[Any]) -> Callable[[Callable[..., Path]], Callable[..., Path]]:
    """Decorator: the function trains the models registered under ``model_names`` with options ``config``.

    Raises:
        TypeError: ``config`` is not a frozen dataclass.
        ValueError: a name already has a trainer.
    """
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"the options of a trainer must be a frozen dataclass, got {config!r}")

    def decorator(train: Callable[..., Path]) -> Callable[..., Path]:
        for name in model_names:
            if name in _TRAINERS and _TRAINERS[name].train is not train:
                raise ValueError(f"model {name!r} already has a trainer ({_TRAINERS[name].train.__module__})")
            _TRAINERS[name] = Trainer(train, config)
        return train

    return decorator


def add_trainer_modules(*modules: str) -> None:
    """Trainer modules to import before the next lookup (a higher layer registers its own this way)."""
    _TRAINER_MODULES.extend(module for module in modules if module not in _TRAINER_MODULES)


def _load_trainer_modules() -> None:
    for module in list(_TRAINER_MODULES):
        importlib.import_module(module)


def has_trainer(model_name: str) -> bool:
    _load_trainer_modules()
    return model_name in _TRAINERS


def trainer_for(model_name: str) -> Trainer:
    """The trainer registered for ``model_name``.

    Raises:
        ValueError: no trainer (the message lists the trainable models).
    """
    _load_trainer_modules()
    if model_name not in _TRAINERS:
        raise ValueError(f"{model_name!r} is not trainable; trainable: {', '.join(sorted(_TRAINERS)) or 'none yet'}")
    return _TRAINERS[model_name]


def training_config(model_name: str, options: Mapping[str, Any]) -> Any:
    """``options`` as the trainer's config: text typed like each default ('false' -> False), None values
    left at the default (the CLI passes its unset flags), an unknown option refused naming the valid ones.

    Example:
        >>> training_config("tn", {"epochs": "2", "lr": None}).epochs  # doctest: +SKIP
        2
    """
    trainer = trainer_for(model_name)
    defaults = trainer.defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{model_name} training got unknown options {unknown}; valid: {', '.join(sorted(defaults))}")
    given = {key: value for key, value in options.items() if value is not None}
    return trainer.config(**typed_options(given, defaults, f"{model_name} training"))


def train_model(
    model: Any,
    dataset: Any,
    out_dir: Any,
    *,
    seed: int = 0,
    progress: bool = True,
    time_budget_s: Optional[float] = None,
    **options: Any,
) -> Path:
    """Train ``model`` (a descriptor or proxy, by its registry name) with its registered trainer; final.pt,
    stamped with the products of ``dataset``'s training pairs (`retrieval.training.provenance`)."""
    config = training_config(model.name, options)
    job = TrainingJob(dataset, Path(out_dir), seed=seed, progress=progress, time_budget_s=time_budget_s)
    final = Path(trainer_for(model.name).train(model, job, config))
    record_training_products(final, dataset)  # so a benchmark can refuse to score it on products it has seen
    return final


def split_options(
    model_name: str, model_defaults: Mapping[str, Any], settings: Mapping[str, Any], source: str = "--set"
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split options into (model config, training options), each typed against its defaults.

    A key of ``model_defaults`` (the model's `default_conf`) builds the model; a key of the trainer's
    config trains it; anything else is refused naming both lists.

    Example:
        >>> split_options("tn", {"dim": 512}, {"dim": "256", "epochs": "2"})  # doctest: +SKIP
        ({'dim': 256}, {'epochs': 2})
    """
    training_defaults = trainer_for(model_name).defaults() if has_trainer(model_name) else {}
    model_conf = {k: v for k, v in settings.items() if k in model_defaults}
    training = {k: v for k, v in settings.items() if k not in model_defaults}
    unknown = sorted(set(training) - set(training_defaults))
    if unknown:
        raise ValueError(
            f"{source}: {model_name} has no option {', '.join(unknown)}; "
            f"model options: {', '.join(sorted(model_defaults)) or 'none'}; "
            f"training options: {', '.join(sorted(training_defaults)) or 'none'}"
        )
    return (
        typed_options(model_conf, dict(model_defaults), model_name),
        typed_options(training, training_defaults, f"{model_name} training"),
    )


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"training option {field.name!r} has no default: every option of a trainer needs one")
