"""Training, apart from the models: the shared run scaffolding (`run`), the trainer convention
(`trainers`) and one module per trainer of this layer (tn, the learned patch descriptors, delf).

`from retrieval.training import TrainingRun, TrainingJob, train_model, ...` is the public surface.
"""

from retrieval.training.run import (
    CHECKPOINT_VERSION,
    TrainingRun,
    atomic_torch_save,
    load_checkpoint,
    load_trained_weights,
    plot_losses,
    seed_everything,
    split_trained_spec,
    training_defaults,
)
from retrieval.training.trainers import (
    Trainer,
    TrainingJob,
    add_trainer_modules,
    has_trainer,
    register_trainer,
    split_options,
    train_model,
    trainer_for,
    training_config,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "Trainer",
    "TrainingJob",
    "TrainingRun",
    "add_trainer_modules",
    "atomic_torch_save",
    "has_trainer",
    "load_checkpoint",
    "load_trained_weights",
    "plot_losses",
    "register_trainer",
    "seed_everything",
    "split_options",
    "split_trained_spec",
    "train_model",
    "trainer_for",
    "training_config",
    "training_defaults",
]
