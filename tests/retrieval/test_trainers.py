"""retrieval/training/trainers.py: the one convention every trainer follows (a toy trainer here)."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from retrieval.training import TrainingJob, register_trainer, split_options, train_model, trainer_for, training_config


@dataclass(frozen=True)
class ToyConfig:
    epochs: int = 3
    lr: float = 1e-3
    use_bias: bool = True
    image_size: tuple = (64, 48)


calls = []


@register_trainer("toy-model", config=ToyConfig)
def train_toy(model, job: TrainingJob, config) -> Path:
    calls.append((model.name, job.dataset, config, job.seed, job.time_budget_s))
    return job.out_dir / "final.pt"


class ToyModel:
    name = "toy-model"


def test_options_are_typed_against_the_dataclass_defaults():
    config = training_config("toy-model", {"epochs": "5", "lr": None, "use_bias": "false", "image_size": "32,24"})
    assert config == ToyConfig(epochs=5, lr=1e-3, use_bias=False, image_size=(32, 24))
    with pytest.raises(ValueError, match="toy-model training option epochs=2.5: expected a whole number"):
        training_config("toy-model", {"epochs": "2.5"})
    with pytest.raises(ValueError, match="unknown options \\['momentum'\\]; valid: epochs, image_size, lr, use_bias"):
        training_config("toy-model", {"momentum": 0.9})


def test_train_model_runs_the_registered_trainer(tmp_path):
    final = train_model(ToyModel(), "data", tmp_path, seed=4, time_budget_s=60.0, epochs=1)
    assert final == tmp_path / "final.pt"
    assert calls[-1] == ("toy-model", "data", ToyConfig(epochs=1), 4, 60.0)
    assert trainer_for("toy-model").defaults() == {"epochs": 3, "lr": 1e-3, "use_bias": True, "image_size": (64, 48)}


def test_the_job_hands_a_training_run_its_arguments(tmp_path):
    job = TrainingJob("data", tmp_path, seed=2, progress=False, time_budget_s=5.0)
    assert job.run_options("train toy") == {"seed": 2, "time_budget_s": 5.0, "progress": None}
    assert TrainingJob("data", tmp_path).run_options("train toy") == {
        "seed": 0,
        "time_budget_s": None,
        "progress": "train toy",
    }


def test_split_options_sends_each_key_to_its_owner():
    model_conf, training = split_options("toy-model", {"dim": 128}, {"dim": "256", "epochs": "2"})
    assert model_conf == {"dim": 256} and training == {"epochs": 2}
    with pytest.raises(ValueError, match="no option widht; model options: dim; training options: epochs"):
        split_options("toy-model", {"dim": 128}, {"widht": "1"})


def test_the_convention_is_enforced():
    @dataclass
    class Mutable:
        epochs: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_trainer("other", config=Mutable)
    with pytest.raises(ValueError, match="already has a trainer"):
        register_trainer("toy-model", config=ToyConfig)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="'nothing' is not trainable"):
        trainer_for("nothing")
