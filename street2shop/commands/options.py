"""Option parsers and decorators shared by the command modules (the CLI's own vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import click

DATASET_HELP = (
    "Dataset spec: 'synthetic' or 'synthetic:N' (the embedded generated set, N products), "
    "'viton:ROOT' (VITON layout, e.g. viton:../shared/data/viton), 'viton-street:ROOT' (the same with "
    "street-condition query photos, generated once into the cache), 'csv:CATALOG.csv[,QUERIES.csv[,PAIRS.csv]]', "
    "'deepfashion2:ROOT', 'deepfashion-c2s:ROOT', 'street2shop:ROOT[,CATEGORY]' or 'lookbook:ROOT' "
    "(`street2shop datasets` shows every format's layout)."
)


def split_list(value: str) -> List[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_ks(value: str) -> List[int]:
    try:
        ks = sorted({int(k) for k in split_list(value)})
    except ValueError:
        raise click.BadParameter(f"--k takes comma-separated whole numbers, e.g. 1,5,10,20; got {value!r}")
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"every k must be >= 1, got {value!r}")
    return ks


def parse_counts(value: str) -> List[int]:
    """'10000,100000' -> [10000, 100000]; anything but whole numbers >= 1 is a usage error naming the value."""
    try:
        counts = [int(n) for n in split_list(value)]
    except ValueError:
        counts = [0]
    if any(n < 1 for n in counts):
        raise click.BadParameter(f"expected comma-separated whole numbers >= 1, e.g. 10000,100000; got {value!r}")
    return counts


def opt(*declarations, **attributes):
    """click.option with its default shown in --help."""
    return click.option(*declarations, show_default=True, **attributes)


def whole(flag: str, default: int, minimum: int, help: Optional[str] = None):
    """A whole-number option >= `minimum`, its default shown (click refuses anything else, naming it)."""
    return opt(flag, default=default, type=click.IntRange(min=minimum), help=help)


def workers_option():
    """--workers N: processes decoding and resizing photos for a command that embeds them (0: in process)."""
    return click.option(
        "--workers",
        default=None,
        type=click.IntRange(min=0),
        help="Processes decoding and resizing photos while the model runs in this one (0: decode in this "
        "process). Default: $STREET2SHOP_WORKERS, else 0 below 4 CPUs and min(4, CPUs // 2) above. The "
        "vectors do not depend on it.",
    )


def embedding_options(fit_help: str, cache_help: str):
    """--device, --batch-size, --fit-max-images, --cache-dir and --workers: what a command that embeds photos takes."""
    options = (
        opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"])),
        opt("--batch-size", default=32, type=click.IntRange(min=1)),
        whole("--fit-max-images", 1000, 1, fit_help),
        click.option("--cache-dir", default=None, help=cache_help),
        workers_option(),
    )

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def query_bank_options(bank_help: str, recipe_defaults: bool = False):
    """--query-bank (repeatable), --query-bank-size and --bank-beta: query-bank normalisation (`index.bank_norm`).

    With `recipe_defaults` the last two default to None: the recipe's values, else the plain defaults
    (`street2shop.recipes.resolve_recipe`).
    """
    from index.bank_norm import DEFAULT_BANK_BETA, DEFAULT_BANK_SIZE

    default_note = "the recipe's, else " if recipe_defaults else ""
    options = (
        click.option("--query-bank", multiple=True, help=bank_help),
        opt(
            "--query-bank-size",
            default=None if recipe_defaults else DEFAULT_BANK_SIZE,
            type=click.IntRange(min=0),
            help="Photos drawn from each --query-bank set (seeded; 0: all of its training split). Default: "
            f"{default_note}{DEFAULT_BANK_SIZE}.",
        ),
        opt(
            "--bank-beta",
            default=None if recipe_defaults else DEFAULT_BANK_BETA,
            type=click.FloatRange(min=0, min_open=True),
            help=f"Inverse temperature of the query-bank normalisation's inverted softmax. Default: "
            f"{default_note}{DEFAULT_BANK_BETA:g}.",
        ),
    )

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def cache_dir_path(value: Optional[str]) -> Path:
    from benchmarks.suite import resolve_cache_dir

    return resolve_cache_dir(value)


RERANK_MODELS = ("similarity", "affine", "homography")
RERANK_MODEL_HELP = "Geometric model of the spatial verification (see retrieval/rerank/)."


SPEC_HELP = "a spec: NAME, NAME@RUN/final.pt (trained weights) or NAME[KEY=VALUE;...] (options)"
