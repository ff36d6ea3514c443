"""PaintNet's training (paper 000, Sec. 3.2): the shape predictor (Algorithm 1), then the texture renderer.

`train_paintnet` is registered for "paintnet" and "paintnet-wo-sp" (`retrieval.training.trainers`):
`PaintNet.train_on(dataset, out_dir, seed=..., progress=..., time_budget_s=..., **options)` types the
options into a `PaintNetTrainConfig` and runs it. The run directory holds final.pt, last.pt,
losses.csv/png and samples/ (the renderer's run), pairs_<S>.pt (the preprocessed pairs) and
shape_predictor/ (its own run and cached maps).

A run can also start from parts trained elsewhere: `pairs` trains on a pair archive (`street2shop
export-pairs`) instead of the photos, `renderer_from` / `shape_predictor_from` take the renderer or the
shape predictor of another PaintNet final.pt (e.g. a renderer trained on a GPU machine, joined with
epochs=0 to a shape predictor trained here).

Example:
    >>> proxy = create_proxy("paintnet", width=0.5)                                   # doctest: +SKIP
    >>> final = proxy.train_on(load_dataset("viton:../shared/data/viton"), "runs/paintnet", epochs=10)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from generation.gan import from_gan_range, uint8_to_gan
from generation.paintnet import PaintNet, _jsonable
from generation.paintnet_networks import RealFakeDiscriminator, RelevanceDiscriminator
from generation.training.paintnet_losses import PerceptualLoss, RendererStep
from generation.training.paintnet_shape_predictor import train_shape_predictor
from generation.training.pairs import GanTrainer, load_pair_archive, prepare_pair_tensors, require_parse_maps
from retrieval.backbones import EfficientNetLite0
from retrieval.registry import typed_options
from retrieval.training import TrainingJob, load_checkpoint, register_trainer, seed_everything

log = logging.getLogger("street2shop.paintnet")

#: Renderer epochs of a default run. One epoch of VITON's 3,639 training pairs is 227 steps of 16; a
#: Table-1-sized step costs about 8.6 CPU-seconds (4-5 s on an idle 2-core CPU), so an epoch takes ~17 min.
DEFAULT_EPOCHS = 1
#: Epochs of a run given a time budget but no epochs: the budget, not this, ends it.
UNTIL_BUDGET_EPOCHS = 10_000
#: A run that names neither epochs nor a time budget stops after this long (preprocessing included), so a
#: default run fits the 15-minute CPU budget; name --epochs (or a budget) for more.
DEFAULT_TIME_BUDGET_S = 15 * 60


@dataclass(frozen=True)
class PaintNetTrainConfig:
    """Every option of a PaintNet training run, with its default.

    Args:
        epochs: renderer epochs; None: `DEFAULT_EPOCHS` under `DEFAULT_TIME_BUDGET_S` when no time budget
            is given either, else as many as the budget allows (it covers both stages).
        batch_size, lr: the renderer's (Adam, betas 0.5/0.999), as the paper.
        sp_epochs, sp_lr, sp_batch_size: the shape predictor's triplet training (SGD with momentum 0.9).
        sample_every: steps between sample grids (samples/step_NNNNNN.png).
        checkpoint_every_s: seconds between last.pt writes (~750 MB at Table 1's size, with Adam's state).
        max_pairs: train on a seeded sample of at most this many pairs (smoke runs, tests).
        pairs: a pair archive (`street2shop export-pairs`) to train on instead of the data set's photos;
            `dataset` may then be None. Without photos the shape predictor cannot be trained here: give
            `shape_predictor_from`, or the run trains the renderer alone (on the true shape maps, as
            always) and final.pt says its shape predictor is untrained.
        shape_predictor_from: a PaintNet final.pt whose trained shape predictor this run takes instead
            of training one (stage 1 is skipped): ablations that differ in renderer options share it.
        renderer_from: a PaintNet final.pt whose renderer weights (float32 or float16) start this run:
            fine-tuning, or with epochs=0, joining a renderer trained elsewhere (a GPU machine) with a
            shape predictor trained here.

    The fields after those are PaintNet's own options (`PaintNet.default_conf`), None meaning the
    proxy's value: `train_on(use_rf_discriminator=False)` and `street2shop train paintnet --parser RUN`
    set them on the proxy before it trains, typed as its constructor types them; they are stored in
    final.pt ("proxy_conf") and adopted when it is loaded. Building the proxy with them is the same.
    """

    epochs: Optional[int] = None
    batch_size: int = 16
    lr: float = 1e-4
    sp_epochs: int = 5
    sp_lr: float = 1e-3
    sp_batch_size: int = 32
    sample_every: int = 100
    checkpoint_every_s: float = 300.0
    max_pairs: Optional[int] = None
    pairs: Optional[str] = None
    shape_predictor_from: Optional[str] = None
    renderer_from: Optional[str] = None
    # PaintNet's options for this run (None: the proxy's own); see the docstring.
    image_size: Optional[int] = None
    width: Optional[float] = None
    norm: Optional[bool] = None
    use_shape_predictor: Optional[bool] = None
    use_rf_discriminator: Optional[bool] = None
    use_rv_discriminator: Optional[bool] = None
    use_perceptual: Optional[bool] = None
    lambda_rf: Optional[float] = None
    lambda_rv: Optional[float] = None
    lambda_f: Optional[float] = None
    lambda_s: Optional[float] = None
    lambda_l1: Optional[float] = None
    gan_mode: Optional[str] = None
    perceptual_size: Optional[int] = None
    parser: Optional[str] = None
    sp_image_size: Optional[Tuple[int, int]] = None
    sp_layer: Optional[str] = None
    sp_hidden: Optional[int] = None
    sp_dim: Optional[int] = None
    sp_ranking: Optional[str] = None
    sp_k: Optional[int] = None
    sp_margin: Optional[float] = None
    shape_maps: Optional[str] = None
    train_shapes: Optional[str] = None
    pretrained: Optional[bool] = None


@register_trainer("paintnet", "paintnet-wo-sp", config=PaintNetTrainConfig)
def train_paintnet(model: PaintNet, job: TrainingJob, config: PaintNetTrainConfig) -> Path:
    """Train the shape predictor, then the texture renderer, on `job.dataset.train`; return final.pt.

    Args:
        model: the PaintNet to train in place (its networks are rebuilt from the job's seed first; a
            resumed run reloads last.pt).
        job: its dataset is a RetrievalSet with training pairs (person_image, product_image, parse, mask),
            or None with `config.pairs`; its out_dir the run directory (see the module docstring); its
            time budget covers both stages.
        config: the options (`PaintNetTrainConfig`).
    """
    dataset, seed, progress, time_budget_s = job.dataset, job.seed, job.progress, job.time_budget_s
    overrides = {key: getattr(config, key) for key in model.default_conf if getattr(config, key) is not None}
    if overrides:
        # typed like --set: a text 'false' must not train the full model under an ablation's name
        model.conf.update(typed_options(overrides, model.default_conf, model.name))
        model._explicit |= set(overrides)
    device = model.device
    model._build(seed)  # fresh networks initialised from the run's seed (a resumed run reloads last.pt)
    model.to(device)
    if config.pairs is None and (dataset is None or dataset.train is None or len(dataset.train) == 0):
        name = "no data set" if dataset is None else dataset.name
        raise ValueError(f"{name} has no training pairs to train {model.name} on (or give pairs=ARCHIVE)")
    epochs = config.epochs
    if epochs is None and time_budget_s is None:
        time_budget_s = DEFAULT_TIME_BUDGET_S
        epochs = DEFAULT_EPOCHS
        log.info(
            "%s: default run, capped at %.0f min of training (pass epochs or a time budget for more)",
            model.name,
            time_budget_s / 60,
        )
    elif epochs is None:  # a time budget alone: train until it is spent
        epochs = UNTIL_BUDGET_EPOCHS
    epochs = int(epochs)
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(seed)
    size = model.conf["image_size"]
    if config.pairs is not None:
        train = None
        data = _pairs_from_archive(model, config.pairs, size, config.max_pairs, seed)
    else:
        require_parse_maps(dataset, model.name)
        train = dataset.train.reset_index(drop=True)
        if config.max_pairs is not None and len(train) > int(config.max_pairs):
            train = train.sample(int(config.max_pairs), random_state=seed).reset_index(drop=True)
        data = prepare_pair_tensors(
            train, out_dir / f"pairs_{size}.pt", (size, size), model.conf["shape_maps"], progress=progress
        )
    log.info(
        "%s: %d training pairs ready in %.0f s", model.name, data["product"].shape[0], time.perf_counter() - started
    )
    joined: Dict[str, Any] = {}
    if config.renderer_from is not None:
        source = _load_part(model, config.renderer_from, "renderer.")
        joined["renderer_from"] = {
            "path": str(config.renderer_from),
            "steps": source.get("steps"),
            "train_seconds": source.get("train_seconds"),
            "config": source.get("config"),
        }

    predictor = model.shape_predictor
    sp_summary: Dict[str, Any] = {}
    if predictor is not None and config.shape_predictor_from is not None:
        source = _load_part(model, config.shape_predictor_from, "shape_predictor.")
        if not predictor.has_memory:
            raise ValueError(
                f"{config.shape_predictor_from} holds no trained shape predictor (its shape memory is empty)"
            )
        sp_summary = {**source.get("shape_predictor", {}), "taken_from": str(config.shape_predictor_from)}
        if model.conf["train_shapes"] == "predicted":
            # The leave-one-out neighbours come from the stored training embeddings, which are those of
            # these pairs only if the memory holds exactly these pairs' shape maps, in this order.
            memory = predictor.memory_shapes.cpu()
            if memory.shape != data["shape"].shape or not torch.equal(memory, data["shape"]):
                raise ValueError(
                    f"train_shapes='predicted': the shape memory of {config.shape_predictor_from} was not "
                    "built from these training pairs, so it gives no leave-one-out neighbours; train "
                    "the shape predictor in this run (drop shape_predictor_from)"
                )
            with torch.no_grad():
                loo_index = predictor.nearest(predictor.memory_embeddings, exclude_self=True).cpu()
            data = dict(data, shape=data["shape"][loo_index])
    elif predictor is not None and train is None:
        log.warning(
            "%s: training from a pair archive without shape_predictor_from: the shape predictor stays "
            "untrained (it needs the photos); the renderer trains on the true shape maps as always. "
            "Join a trained one later with shape_predictor_from and renderer_from (epochs=0).",
            model.name,
        )
        sp_summary = {"trained": False}
    elif predictor is not None:
        sp_budget = None if time_budget_s is None else 0.3 * time_budget_s
        sp_summary = train_shape_predictor(
            predictor,
            train,
            data["shape"],
            out_dir / "shape_predictor",
            ranking=model.conf["sp_ranking"],
            k=model.conf["sp_k"],
            margin=model.conf["sp_margin"],
            epochs=config.sp_epochs,
            batch_size=config.sp_batch_size,
            lr=config.sp_lr,
            seed=seed,
            time_budget_s=sp_budget,
            progress=progress,
        )
        if model.conf["train_shapes"] == "predicted":
            data = dict(data, shape=data["shape"][sp_summary.pop("loo_index")])
        else:
            sp_summary.pop("loo_index")

    remaining = None if time_budget_s is None else max(1.0, time_budget_s - (time.perf_counter() - started))
    renderer_job = dataclasses.replace(job, out_dir=out_dir, time_budget_s=remaining)
    final = _train_renderer(model, data, renderer_job, epochs, config, sp_summary, device, joined)
    log.info("%s: trained in %.0f s -> %s", model.name, time.perf_counter() - started, final)
    return final


def _pairs_from_archive(
    model: PaintNet, path, size: int, max_pairs: Optional[int], seed: int
) -> Dict[str, torch.Tensor]:
    """The pair tensors of a `save_pair_archive` file, checked against this run's image size."""
    data = load_pair_archive(Path(path))
    missing = [k for k in ("texture", "product", "shape") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}: export it again with `street2shop export-pairs`")
    found = tuple(data["product"].shape[-2:])
    if found != (size, size):
        raise ValueError(
            f"{path} holds {found[0]}x{found[1]} pairs but this {model.name} renders {size}x{size}: "
            f"export it with --size {size}, or --set image_size={found[0]}"
        )
    if max_pairs is not None and data["product"].shape[0] > int(max_pairs):
        keep = torch.randperm(data["product"].shape[0], generator=torch.Generator().manual_seed(seed))[: int(max_pairs)]
        data = {k: v[keep] for k, v in data.items()}
    return data


def _load_part(model: PaintNet, checkpoint, prefix: str) -> Dict[str, Any]:
    """Copy the tensors under `prefix` ("renderer." or "shape_predictor.") from a PaintNet final.pt; return it."""
    payload = load_checkpoint(checkpoint, map_location="cpu")
    state = {k[len(prefix) :]: v for k, v in payload.get("state_dict", {}).items() if k.startswith(prefix)}
    module = getattr(model, prefix.rstrip("."))
    own = {k for k in module.state_dict() if ".backbone." not in f".{k}"}
    if not state or own - set(state) or set(state) - set(module.state_dict()):
        raise ValueError(
            f"{checkpoint}: its {prefix.rstrip('.')} does not fit this {model.name} (conf {model.conf}); "
            f"missing {sorted(own - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(module.state_dict()))[:3]}"
        )
    try:
        module.load_state_dict(state, strict=False)  # the frozen pretrained backbone is not in final.pt
    except RuntimeError as exc:  # same names, other shapes: another width or image size
        raise ValueError(
            f"{checkpoint}: its {prefix.rstrip('.')} does not fit this {model.name} (conf {model.conf}): "
            f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
        ) from exc
    log.info("%s: %s taken from %s", model.name, prefix.rstrip("."), checkpoint)
    return payload


def _train_renderer(
    model: PaintNet,
    data,
    job: TrainingJob,
    epochs: int,
    config: PaintNetTrainConfig,
    sp_summary,
    device,
    joined=None,
) -> Path:
    """Stage 2: the texture renderer and its discriminators on the pair tensors `data`; final.pt.

    ``job`` holds the renderer's share of the time budget; ``epochs`` the resolved epoch count.
    """
    batch_size, lr = config.batch_size, config.lr
    c = model.conf
    size = c["image_size"]
    rf = RealFakeDiscriminator(size, c["width"], c["norm"]).to(device) if c["use_rf_discriminator"] else None
    rv = RelevanceDiscriminator(size, c["width"], c["norm"]).to(device) if c["use_rv_discriminator"] else None
    perceptual = None
    if c["use_perceptual"]:
        backbone = (
            model.shape_predictor.backbone
            if model.shape_predictor is not None
            else EfficientNetLite0(pretrained=c["pretrained"])
        )
        perceptual = PerceptualLoss(backbone, size=c["perceptual_size"]).to(device)
    betas = (0.5, 0.999)
    modules: Dict[str, nn.Module] = {"renderer": model.renderer}
    optimizers: Dict[str, torch.optim.Optimizer] = {
        "g": torch.optim.Adam(model.renderer.parameters(), lr=lr, betas=betas, fused=True)
    }
    for name, d in (("rf", rf), ("rv", rv)):
        if d is not None:
            modules[name] = d
            optimizers[name] = torch.optim.Adam(d.parameters(), lr=lr, betas=betas, fused=True)
    step = RendererStep(model.renderer, rf, rv, perceptual, optimizers, c)
    run_config = {
        "proxy": model.name,
        "conf": _jsonable(c),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": job.seed,
        "n_pairs": int(data["product"].shape[0]),
    }
    trainer = GanTrainer(
        job.out_dir,
        modules,
        optimizers,
        run_config,
        checkpoint_every_s=config.checkpoint_every_s,
        sample_every=config.sample_every,
        **job.run_options(f"train {model.name}"),
    )
    # The fixed sample rows also get the shape the predictor gives them (leave-one-out), as at inference.
    loo_shapes = None
    if model.shape_predictor is not None and model.shape_predictor.has_memory:
        n_samples = min(trainer.n_samples, data["product"].shape[0])
        memory = model.shape_predictor.memory_embeddings
        with torch.no_grad():
            distances = torch.cdist(memory[:n_samples], memory) ** 2
            distances[torch.arange(n_samples), torch.arange(n_samples)] = float("inf")  # leave one out
            index = distances.argmin(1)
        loo_shapes = uint8_to_gan(model.shape_predictor.memory_shapes[index]).to(device)

    def sample_columns(batch):
        was_training = model.renderer.training
        model.renderer.eval()
        columns = [("photo", from_gan_range(batch["person"])), ("texture T_m", from_gan_range(batch["texture"]))]
        if model.renderer.in_channels == 6:
            columns += [
                ("true shape", from_gan_range(batch["shape"])),
                ("gen(true)", from_gan_range(step.generate(batch))),
            ]
            if loo_shapes is not None:
                predicted = dict(batch, shape=loo_shapes[: batch["shape"].shape[0]])
                columns += [
                    ("pred shape", from_gan_range(loo_shapes[: batch["shape"].shape[0]])),
                    ("gen(pred)", from_gan_range(step.generate(predicted))),
                ]
        else:
            columns.append(("generated", from_gan_range(step.generate(batch))))
        columns.append(("truth", from_gan_range(batch["product"])))
        model.renderer.train(was_training)
        return columns

    model.renderer.train()
    trainer.train(
        data,
        epochs,
        batch_size,
        step=lambda batch, gen: step.step(batch, gen, data["product"]),
        sample=sample_columns,
    )
    model.eval()
    extra = {"proxy": model.name, "proxy_conf": _jsonable(c), "shape_predictor": sp_summary, **(joined or {})}
    final = trainer.finish(weights=model.trained_state(), extra=extra)
    model.eval()
    return final
