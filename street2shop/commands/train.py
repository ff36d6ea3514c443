"""`street2shop train ...`: train descriptors and proxies; every run checkpoints and resumes."""

from __future__ import annotations

import time
from pathlib import Path

import click

from street2shop.commands.options import (
    DATASET_HELP,
    cache_dir_path,
    opt,
    whole,
)


@click.group("train")
def train_group() -> None:
    """Train the learnable parts: descriptors and proxies. Every run checkpoints and resumes."""


TRAIN_OPTIONS = [
    opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP + " Its training pairs are used."),
    click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(file_okay=False),
        help="Run directory: last.pt (resume), final.pt, losses.csv/png, samples/.",
    ),
    click.option(
        "--epochs",
        default=None,
        type=click.IntRange(min=0),
        help="Passes over the training pairs (default: the model's own).",
    ),
    click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Default: the model's own."),
    click.option(
        "--lr",
        default=None,
        type=click.FloatRange(min=0, min_open=True),
        help="Learning rate (default: the model's own).",
    ),
    click.option(
        "--time-budget",
        default=None,
        type=click.FloatRange(min=0, min_open=True),
        help="Stop cleanly (checkpointed) after this many minutes.",
    ),
    opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--cache-dir", default=None, help="Default: $STREET2SHOP_CACHE or ~/.cache/street2shop."),
    opt(
        "--seed",
        default=0,
        help="Seed of the model's initialisation, its sampling and its street copies (the split is --split-seed's).",
    ),
    opt(
        "--split-seed",
        default=0,
        help="Seed of the data set's train/validation split. Keep the default: `bench` and `index` evaluate on split "
        "seed 0, and a model trained on another split has seen most of its validation products (final.pt records "
        "its training products, and `bench` refuses to score it on them).",
    ),
    click.option(
        "--set",
        "settings",
        multiple=True,
        metavar="KEY=VALUE",
        help="Model or training option for this run, repeatable, typed by its default (true/false, "
        "numbers, 128,96 for a pair): e.g. --set width=0.5 --set use_perceptual=false (PaintNet's "
        "ablations), --set max_pairs=500.",
    ),
]


def _train_options(command):
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


def _train(
    kind: str, name: str, dataset, out_dir, time_budget, device, cache_dir, seed, split_seed, settings=(), **flags
) -> None:
    """Build the named descriptor or proxy, train it on the dataset's training pairs, say where it went."""
    from benchmarks.reproduce import model_class, option_defaults, train_named
    from retrieval.datasets import load_dataset
    from retrieval.registry import parse_settings
    from retrieval.specs import parse_spec, split_specs

    spec = parse_spec(name)
    if spec.options or spec.checkpoint:
        # the options as typed (split like any spec's, so a nested spec's ';' stays in its option)
        inner = name[len(spec.name) + 1 : name.rindex("]")] if spec.options else ""
        settings_hint = "".join(f" --set {item}" for item in split_specs(inner, separator=";"))
        raise ValueError(
            f"train takes a plain {kind} name, not the spec {name!r}: give its options with --set, "
            f"e.g. `street2shop train {kind} {spec.name}{settings_hint}`"
        )
    if not getattr(model_class(kind, name), "trainable", False):  # before any data loads
        raise ValueError(f"{kind} {name!r} has nothing to train")
    # Typed by the model's options and its trainer's: 'false' is False, not a truthy string.
    settings = parse_settings(settings, option_defaults(kind, name), source="--set")
    if "pairs" in settings:  # a pair archive (export-pairs) stands in for the photos
        if kind == "descriptor":
            raise ValueError(
                "--set pairs=ARCHIVE is for the generators (paintnet, pix2pix, dtgan, cyclegan*); "
                "descriptors train on the data set's photos: drop it and give --dataset"
            )
        data = None
    else:
        data = load_dataset(dataset, split="val", seed=split_seed, cache_dir=cache_dir_path(cache_dir))
        if data.train is None or data.train.empty:
            raise ValueError(f"{data.name} has no training pairs to train {name} on")
    started = time.perf_counter()
    flags = {key: value for key, value in flags.items() if value is not None}  # epochs, batch_size, lr, parser
    budget_s = None if time_budget is None else 60 * time_budget
    final = train_named(kind, name, data, out_dir, settings, flags, device=device, seed=seed, time_budget_s=budget_s)
    budget = f" (stopped by the {time_budget:g}-minute budget if it came first)" if time_budget else ""
    copies = int(settings.get("street_copies", 0) or 0)  # each training pair also seen as that many street photos
    street = f" (+ {copies} street cop{'y' if copies == 1 else 'ies'} of each)" if copies else ""
    source = (
        f"the pair archive {settings['pairs']}"
        if data is None
        else f"{data.name}'s {len(data.train)} training pairs{street}"
    )
    losses = Path(out_dir) / "losses.csv"
    where_losses = f"; steps and epochs: {losses}" if losses.is_file() else ""  # the fused trainer fits, no steps
    click.echo(f"trained {name} in {time.perf_counter() - started:.0f} s on {source}{budget} -> {final}{where_losses}")
    flag = "--descriptors" if kind == "descriptor" else "--proxies"
    click.echo(f"use it as: {flag} {name}@{final}")


@train_group.command("descriptor")
@click.argument("name")
@_train_options
def train_descriptor_command(name, **options) -> None:
    """Train descriptor NAME on a dataset's training pairs; then use it as NAME@OUT/final.pt.

    \b
    Example:
      street2shop train descriptor tn --out runs/tn
      street2shop bench --descriptors gem,tn@runs/tn/final.pt
    Run the same command again after an interruption: it resumes from OUT/last.pt.
    """
    _train("descriptor", name, **options)


@train_group.command("parsing")
@_train_options
def train_parsing_command(**options) -> None:
    """Train the garment parser of the `hp` proxy (EfficientNet-Lite0 encoder + light decoder, LIP labels 5/6/7)."""
    _train("proxy", "hp", **options)


@train_group.command("paintnet")
@click.option(
    "--parser",
    default=None,
    help="final.pt of `train parsing`, used to cut the garment out at inference (GrabCut without).",
)
@_train_options
def train_paintnet_command(parser, **options) -> None:
    """Train PaintNet (shape predictor, then texture renderer) on the person/product pairs.

    \b
    Example (the paper's model at half width for 10 epochs, and its w/o-SP ablation):
      street2shop train paintnet --out runs/paintnet --epochs 10 --set width=0.5 --parser runs/parser/final.pt
      street2shop train paintnet --out runs/paintnet-wo-sp --epochs 10 --set width=0.5 --set use_shape_predictor=False
    \b
    On a GPU machine without the photos: export the pairs here, train the renderer there, join here:
      street2shop export-pairs --out pairs64.npz
      street2shop train paintnet --set pairs=pairs64.npz --out gpu-run --device cuda ...    (there)
      street2shop train paintnet --out runs/paintnet-gpu --epochs 0 --set pairs=pairs64.npz \\
          --set renderer_from=gpu-run/final.pt --set shape_predictor_from=runs/paintnet/final.pt
    Other training options go through --set: max_pairs, sp_epochs, sample_every, pairs,
    shape_predictor_from, renderer_from.
    """
    _train("proxy", "paintnet", parser=parser, **options)


@click.command("export-pairs")
@opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP + " Its training pairs are exported.")
@whole("--size", 64, 1, "Side of the square tensors (PaintNet's image_size).")
@opt(
    "--shape-maps",
    default="cloth_mask",
    type=click.Choice(["cloth_mask", "grabcut"]),
    help="Product shape maps: the data set's masks, or GrabCut on the product photo (the paper).",
)
@opt("--seed", default=0, help="Seed of the train/validation split.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Archive to write (.npz).")
@click.option("--cache-dir", default=None)
def export_pairs_command(dataset, size, shape_maps, seed, out_path, cache_dir) -> None:
    """Write the preprocessed training pairs (person, segmented texture, product, shape map, garment mask)
    as one lossless archive, for training on a machine without the photos (`--set pairs=FILE`).

    VITON's 3,639 training pairs at 64x64 make a ~37 MB archive (lossless WebP/PNG).
    """
    from generation.training.pairs import prepare_pair_tensors, save_pair_archive
    from retrieval.datasets import load_dataset

    data = load_dataset(dataset, split="val", seed=seed, cache_dir=cache_dir_path(cache_dir))
    if data.train is None or data.train.empty:
        raise ValueError(f"{data.name} has no training pairs to export")
    tensors = prepare_pair_tensors(data.train.reset_index(drop=True), None, (size, size), shape_maps, progress=True)
    path = save_pair_archive(tensors, Path(out_path))
    click.echo(f"wrote {len(data.train)} pairs at {size}x{size} to {path} ({path.stat().st_size / 1e6:.1f} MB)")


@train_group.command("pix2pix")
@_train_options
def train_pix2pix_command(**options) -> None:
    """Train the pix2pix baseline (U-Net + PatchGAN + L1): person photo -> product photo."""
    _train("proxy", "pix2pix", **options)


@train_group.command("dtgan")
@_train_options
def train_dtgan_command(**options) -> None:
    """Train the DTGAN-style association GAN baseline (residual generator, real/fake + association D)."""
    _train("proxy", "dtgan", **options)


def _cyclegan_command(name: str, summary: str) -> None:
    """Register `train NAME` for one of the CycleGAN proxies (`generation.cyclegan`)."""

    def command(**options) -> None:
        _train("proxy", name, **options)

    command.__doc__ = (
        f"{summary}\n\n    Unpaired by default (no batch holds a person photo and the product it wears; "
        "--set unpaired=false trains on the pairs). Other options through --set: cycle_weight, pool_size, "
        "image_size, width, n_blocks, d_width, max_pairs, pairs, sample_every."
    )
    train_group.command(name)(_train_options(command))


_cyclegan_command(
    "cyclegan", "Train the vanilla CycleGAN (unpaired): person photo <-> product photo, G_AB as the proxy."
)
_cyclegan_command(
    "cyclegan-long", "Train Long CycleGAN: 2 generators cascaded each way; the A->B cascade is the proxy."
)
_cyclegan_command("cyclegan-nest", "Train Nest CycleGAN: Long CycleGAN plus inner cycles and the similarity loss.")


COMMANDS = (
    train_group,
    export_pairs_command,
)
