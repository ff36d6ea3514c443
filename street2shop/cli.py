"""The `street2shop` command line. It parses and calls; the work is in street2shop.engine and benchmarks."""

from __future__ import annotations

import json
import logging
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import click

DATASET_HELP = (
    "Dataset spec: 'synthetic' or 'synthetic:N' (the embedded generated set, N products), "
    "'viton:ROOT' (VITON layout, e.g. viton:../shared/data/viton), 'viton-street:ROOT' (the same with "
    "street-condition query photos, generated once into the cache), or 'csv:CATALOG.csv[,QUERIES.csv]'."
)


def _split_list(value: str) -> List[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _ks(value: str) -> List[int]:
    try:
        ks = sorted({int(k) for k in _split_list(value)})
    except ValueError:
        raise click.BadParameter(f"--k takes comma-separated whole numbers, e.g. 1,5,10,20; got {value!r}")
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"every k must be >= 1, got {value!r}")
    return ks


def _counts(value: str) -> List[int]:
    """'10000,100000' -> [10000, 100000]; anything but whole numbers >= 1 is a usage error naming the value."""
    try:
        counts = [int(n) for n in _split_list(value)]
    except ValueError:
        counts = [0]
    if any(n < 1 for n in counts):
        raise click.BadParameter(f"expected comma-separated whole numbers >= 1, e.g. 10000,100000; got {value!r}")
    return counts


def _opt(*declarations, **attributes):
    """click.option with its default shown in --help."""
    return click.option(*declarations, show_default=True, **attributes)


def _whole(flag: str, default: int, minimum: int, help: Optional[str] = None):
    """A whole-number option >= `minimum`, its default shown (click refuses anything else, naming it)."""
    return _opt(flag, default=default, type=click.IntRange(min=minimum), help=help)


def _embedding_options(fit_help: str, cache_help: str):
    """--device, --batch-size, --fit-max-images and --cache-dir: what a command that embeds photos takes."""
    options = (
        _opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"])),
        _opt("--batch-size", default=32, type=click.IntRange(min=1)),
        _whole("--fit-max-images", 1000, 1, fit_help),
        click.option("--cache-dir", default=None, help=cache_help),
    )

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _cache_dir(value: Optional[str]) -> Path:
    from benchmarks.suite import resolve_cache_dir

    return resolve_cache_dir(value)


# Errors with a message written for the user (a bad option, a missing or damaged file): "error: MESSAGE",
# exit 2. Anything else is a bug or an unforeseen failure: its type is named too, exit 1.
EXPECTED_ERRORS = (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError, EOFError)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _error_text(exc: BaseException) -> str:
    """The message of an exception on one line; an OSError from the system as 'PATH: reason'."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{where}: {exc.strerror or exc}"
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would quote the message
    else:
        text = str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


class Street2shopGroup(click.Group):
    """The command group that turns every error into one line on stderr and a non-zero exit.

    Done here once, around every command, so no command needs its own try/except: expected errors
    print "error: MESSAGE" (exit 2), any other "error: TYPE: MESSAGE (run with -v for the traceback)"
    (exit 1), Ctrl-C a short line (exit 130); `street2shop -v ...` prints the traceback first.
    Click's own errors (usage, exit 2) pass through as click prints them.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("verbose"):
                click.echo(traceback.format_exc(), err=True, nl=False)
            click.echo("\ninterrupted: run the same command again to resume from what is cached", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except Exception as exc:  # noqa: BLE001  (the last resort: nothing reaches the user as a bare traceback)
            verbose = bool(ctx.params.get("verbose"))
            if verbose:
                click.echo(traceback.format_exc(), err=True, nl=False)
            if isinstance(exc, EXPECTED_ERRORS):
                click.echo(f"error: {_error_text(exc)}", err=True)
                ctx.exit(2)
            hint = "" if verbose else " (run with -v for the traceback)"
            click.echo(f"error: {type(exc).__name__}: {_error_text(exc)}{hint}", err=True)
            ctx.exit(1)


@click.group(cls=Street2shopGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug) and the traceback of an error.")
@click.version_option(package_name="street2shop")
def cli(verbose: int) -> None:
    """Street-to-shop retrieval: find the product a person wears, from a photo, in a shop's catalog.

    \b
    Typical session:
      street2shop demo                                   # everything on the embedded synthetic set
      street2shop index --catalog viton:../shared/data/viton --descriptor gem --out shop-index
      street2shop query --index shop-index photo1.jpg photo2.jpg --k 5
      street2shop bench --dataset viton:../shared/data/viton --descriptors sift,rmac,gem
      street2shop list                                   # descriptors, proxies, index presets
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command("list")
def list_plugins() -> None:
    """List the registered descriptors, proxies and index presets."""
    from generation.proxies import list_proxies
    from index import list_index_presets
    from retrieval.descriptors import DESCRIPTORS, list_descriptors

    click.echo("descriptors:")
    for name in list_descriptors():
        cls = DESCRIPTORS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        click.echo(f"  {name:<10} {cls.kind:<7} {doc}")
    click.echo("proxies:       " + ", ".join(list_proxies()))
    click.echo("index presets: " + ", ".join(list_index_presets()))


RERANK_MODELS = ("similarity", "affine", "homography")
RERANK_MODEL_HELP = "Geometric model of the spatial verification (see retrieval/rerank/)."


SPEC_HELP = "a spec: NAME, NAME@RUN/final.pt (trained weights) or NAME[KEY=VALUE;...] (options)"


@cli.command("index")
@click.option("--catalog", required=True, help=DATASET_HELP + " Its catalog (products) is indexed.")
@_opt("--split", default="all", help="Which part of a dataset's catalog to index: all, train or val.")
@click.option(
    "--recipe",
    default=None,
    help="A named pipeline (see `street2shop recipes`): sets --proxy, --descriptor, --preset and --rerank.",
)
@click.option("--proxy", default=None, help=f"Proxy stage applied to query photos, {SPEC_HELP}. Default: none.")
@click.option("--descriptor", default=None, help=f"Descriptor, {SPEC_HELP} (see `street2shop list`). Default: gem.")
@click.option("--preset", default=None, help="Index preset: flat (exact), ivfpq, hnsw. Default: flat.")
@click.option(
    "--rerank",
    default=None,
    type=click.IntRange(min=0),
    help="Re-rank each query's top N by spatial verification (local descriptors; stores their features). Default 0.",
)
@click.option(
    "--fit-data",
    default=None,
    help="Data set whose training images fit codebooks/whitening (e.g. viton:../shared/data/viton). "
    "Default: the catalog's data set (its training pairs, else its catalog).",
)
@click.option(
    "--runs", default=None, help="Where a recipe's trained checkpoints are (`build --runs`). Default: runs/RECIPE."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@_embedding_options(
    "Images used to fit codebooks/whitening.",
    "Feature cache (an interrupted run resumes from it). Default: $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@_opt("--seed", default=0)
@click.option(
    "--local-features",
    is_flag=True,
    help="Also store the catalog's local features (local descriptors), for `query --rerank`.",
)
def index_command(catalog, out_dir, recipe, proxy, descriptor, preset, rerank, runs, **options) -> None:
    """Save a pipeline: embed a catalog's product photos into a FAISS index, with everything a query needs.

    The directory records the proxy (and its weights), the descriptor (weights and fitted state), the
    index preset and the re-ranking, so `street2shop query --index DIR photo.jpg` needs nothing else.
    Descriptors that learn something (sift's codebook, rmac's whitening) are fitted on --fit-data.
    Features are cached per image: run the same command again after an interruption and it resumes.

    \b
    Examples:
      street2shop index --catalog viton:../shared/data/viton --recipe fast --out shop-index
      street2shop index --catalog csv:shop.csv --proxy hp@runs/parser/final.pt \\
          --descriptor tn@runs/tn/final.pt --out shop-index
    """
    from street2shop.engine import index_catalog
    from street2shop.recipes import resolve_recipe

    parts = resolve_recipe(recipe, proxy=proxy, descriptor=descriptor, preset=preset, rerank=rerank, runs=runs)
    index_catalog(catalog, out_dir, echo=click.echo, **parts, **options)


@cli.command("query")
@click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory written by `street2shop index` (it records its proxy and descriptor).",
)
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_whole("--k", 10, 1, "Products returned per photo (>= 1).")
@click.option("--proxy", default=None, help="Refuse unless the index has this proxy (old indexes: the proxy to use).")
@click.option("--descriptor", default=None, help="Refuse to run unless the index was built with this descriptor.")
@_opt("--format", "fmt", default="table", type=click.Choice(["table", "json"]))
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--rerank",
    default=None,
    type=click.IntRange(min=0),
    help="Re-rank the top N by spatial verification (index with local features); 0: off. Default: the index's.",
)
@_opt("--rerank-model", default="similarity", type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP)
def query_command(index_dir, photos, k, proxy, descriptor, fmt, device, rerank, rerank_model) -> None:
    """Find the top-k catalog products for street photos.

    The index directory holds the whole pipeline (proxy, descriptor, index, re-ranking): nothing else is
    needed. --proxy/--descriptor only check it; for an index made before pipelines recorded their proxy,
    --proxy names the proxy to query with.
    """
    from street2shop.engine import Searcher, results_per_photo

    searcher = Searcher(
        index_dir, device=device, proxy=proxy, descriptor=descriptor, rerank=rerank, rerank_conf={"model": rerank_model}
    )
    results = searcher.search(list(photos), k=k)
    if fmt == "json":
        click.echo(json.dumps(results_per_photo(results, photos), indent=2))
    else:
        click.echo(results.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


@cli.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--catalog", required=True, help=DATASET_HELP + " Its products not yet in the index are added.")
@_opt("--split", default="all", help="Which part of a dataset's catalog: all, train or val.")
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Where synthetic sets are generated. Default: $STREET2SHOP_CACHE.")
@_opt("--seed", default=0)
def add_command(index_dir, catalog, split, device, cache_dir, seed) -> None:
    """Add a catalog's new products to a saved index (products already in it are left as they are).

    Only the new products' photos are embedded; the index is saved as a new version in one atomic step,
    so a running `query` or service sees the old or the new catalog, never a mix.
    """
    from street2shop.engine import add_catalog

    add_catalog(
        index_dir, catalog, split=split, device=device, cache_dir=_cache_dir(cache_dir), seed=seed, echo=click.echo
    )


@cli.command("remove")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("product_ids", nargs=-1, required=True)
def remove_command(index_dir, product_ids) -> None:
    """Remove products by id from a saved index (an unknown id refuses the whole command)."""
    from street2shop.pipeline import Pipeline

    pipeline = Pipeline.load(index_dir, device="cpu")
    pipeline.remove(list(product_ids))
    pipeline.save()
    click.echo(f"removed {len(set(product_ids))} products from {index_dir}: {pipeline.ntotal} left")


@cli.command("recipes")
def recipes_command() -> None:
    """List the named pipelines (`index --recipe`, `build --recipe`) with what they need and measured."""
    from street2shop.recipes import RECIPES

    for recipe in RECIPES.values():
        needs = ", ".join(f"train {t.kind} {t.name}" for t in recipe.trainings) or "no training"
        click.echo(f"{recipe.name}: {recipe.summary}")
        click.echo(
            f"    proxy {recipe.proxy}, descriptor {recipe.descriptor}, preset {recipe.preset}, rerank {recipe.rerank}"
        )
        click.echo(f"    needs: {needs}; measured: {recipe.measured}")


@cli.command("build")
@click.option("--recipe", required=True, help="Recipe to train and index (see `street2shop recipes`).")
@click.option("--train-data", required=True, help=DATASET_HELP + " Its training pairs train the recipe's models.")
@click.option("--catalog", required=True, help=DATASET_HELP + " Its catalog is indexed.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--runs", default=None, help="Where the trainings go (RUNS/<run>/final.pt). Default: runs/RECIPE.")
@_opt("--split", default="all", help="Which part of the catalog's data set to index: all, train or val.")
@click.option("--fit-data", default=None, help="Data set fitting codebooks/whitening. Default: --train-data.")
@click.option(
    "--time-budget",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Minutes per training (stops cleanly, checkpointed). Default: each model's own.",
)
@click.option("--epochs", default=None, type=click.IntRange(min=0), help="Epochs per training (default: the model's).")
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Default: $STREET2SHOP_CACHE or ~/.cache/street2shop.")
@_opt("--seed", default=0)
def build_command(
    recipe, train_data, catalog, out_dir, runs, split, fit_data, time_budget, epochs, device, cache_dir, seed
):
    """Train what a recipe needs, in dependency order, then index a catalog with it.

    Trainings run in order (the parser, then tn trained behind that parser) into RUNS/<run>/; one whose
    final.pt exists is skipped, so an interrupted build resumes (a training itself resumes from its
    last.pt). Wall times are printed.

    \b
    Example:
      street2shop build --recipe best --train-data viton:../shared/data/viton \\
          --catalog viton:../shared/data/viton --out shop-index
    """
    from street2shop.engine import build_recipe

    build_recipe(
        recipe,
        train_data,
        catalog,
        out_dir,
        runs=runs,
        split=split,
        fit_data=fit_data,
        time_budget_minutes=time_budget,
        epochs=epochs,
        device=device,
        cache_dir=cache_dir,
        seed=seed,
        echo=click.echo,
    )


def _expand(patterns: str, names: List[str], what: str) -> List[str]:
    """retrieval.specs.expand_specs, an entry that matches nothing a usage error listing what exists."""
    from retrieval.specs import expand_specs

    try:
        return expand_specs(patterns, names, what)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _grid_specs(patterns: str, kind: str, flag: str) -> List[str]:
    """--descriptors/--proxies -> the grid's specs: globs expanded, NAME[KEY=VALUE;...] values typed by the
    model's defaults (a wrong type or unknown option refused here, before any work, naming `flag`)."""
    from benchmarks.reproduce import option_defaults, registered_names
    from retrieval.specs import SpecSyntaxError, typed_specs

    try:
        return typed_specs(_expand(patterns, registered_names(kind), kind), lambda n: option_defaults(kind, n), flag)
    except SpecSyntaxError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


@cli.command("bench")
@_opt("--dataset", default="synthetic", help=DATASET_HELP)
@_opt("--split", default="val", help="val (seeded third of the pairs), train, or all.")
@_opt(
    "--descriptors",
    default="colorhist,sift,rmac,gem",
    help="Comma-separated names or globs ('*' = all), each optionally NAME@run/final.pt.",
)
@_opt("--proxies", default="none", help="Names or globs, e.g. 'none,hp,paintnet@runs/paintnet/final.pt'.")
@_opt("--indexes", "--index", "presets", default="flat", help="Index presets or globs, e.g. 'flat,ivfpq'.")
@_opt("--k", "ks", default="1,5,10,20", help="Cut-offs for mAP@k and recall@k.")
@_opt(
    "--out", "out_dir", default="results", type=click.Path(file_okay=False), help="Where the report goes (see below)."
)
@_embedding_options(
    "Training images used to fit codebooks/whitening.",
    "Feature and checkpoint cache; default $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@click.option("--no-cache", is_flag=True, help="Recompute every feature.")
@_opt("--seed", default=0)
@_whole(
    "--rerank",
    0,
    0,
    "Also score each local descriptor's top N re-ranked by spatial verification (rows NAME+sv); 0: off.",
)
@_opt("--rerank-model", default="similarity", type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP)
@_whole("--limit", 0, 0, "Evaluate a seeded sample of N products and their queries (0: all); for slow descriptors.")
@_whole("--distractors", 0, 0, "Extra gallery products drawn from the training split (nobody queries them).")
@_whole("--protocol-draws", 10, 0, "The paper's protocol: seeded galleries drawn (0: off).")
@_whole("--protocol-gallery", 250, 1, "Products per drawn gallery (the paper: 250).")
@_whole("--bootstrap", 1000, 0, "Bootstrap resamples for the 95% intervals and paired tests (0: off).")
@_whole(
    "--generation-samples",
    200,
    0,
    "Queries whose proxy output is scored against the true product (RMSE, SSIM, IS-style); 0: off.",
)
@_whole("--rank-pictures", 6, 0, "Queries pictured (query | proxy output | top 5) for every combination; 0: off.")
@click.option(
    "--train",
    "train_missing",
    is_flag=True,
    help="Train every trainable model named without a checkpoint (cached under CACHE/checkpoints by config; "
    "reused later). Ablations as NAME[KEY=VALUE;...], e.g. 'paintnet[use_perceptual=False]'.",
)
@_opt(
    "--train-budget",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Minutes of training per model with --train.",
)
@click.option(
    "--fit-data",
    default=None,
    help="Data set whose training images fit codebooks/whitening. Default: --dataset's training pairs.",
)
@click.option(
    "--recipes",
    default=None,
    help="Score named pipelines (see `street2shop recipes`), one row each, e.g. 'best,fast'; "
    "alone unless --descriptors/--proxies are given too.",
)
@click.option("--runs", default=None, help="With --recipes: where their checkpoints are. Default: runs/RECIPE.")
def bench_command(ks, descriptors, proxies, presets, no_cache, train_missing, recipes, runs, **options) -> None:
    """Score the proxy x descriptor x index grid with mAP@k (DESIGN.md), recall@k and MRR.

    Query = person/street photo; gallery = every product of the split (plus --distractors). Features
    are cached by image content and model fingerprints: run the same command again after an
    interruption and it resumes where it stopped.

    \b
    Writes to --out:
      report.md                Table-4-shaped report: intervals, paired tests vs none, the paper beside
      results.csv/.parquet     one row per combination (every metric, interval, test, timing)
      per_query.csv/.parquet   one row per query and combination (rank, AP@k, top 5)
      protocol_draws.csv       the paper's 250-product protocol, one row per draw
      generation.csv           proxy outputs vs true products (generative proxies)
      map_curves.png, heatmap.png, rank/index.html, config.json (config, versions, git revision)

    \b
    Example (every descriptor, three proxies, two indexes, training what has no checkpoint):
      street2shop bench --dataset viton:../shared/data/viton --descriptors '*' \\
          --proxies none,hp,paintnet --indexes flat,ivfpq --train --train-budget 10
    """
    from benchmarks.suite import BenchConfig, run_bench_suite
    from index import list_index_presets

    descriptor_specs = _grid_specs(descriptors, "descriptor", "--descriptors")
    proxy_specs = _grid_specs(proxies, "proxy", "--proxies")
    preset_names = _expand(presets, list_index_presets(), "index preset")
    combinations = None
    if recipes:
        from street2shop.recipes import recipe_combinations

        ctx = click.get_current_context()
        grid_given = any(
            ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            for name in ("descriptors", "proxies")
        )
        if train_missing:
            raise click.UsageError("--recipes and --train do not mix: train a recipe with `street2shop build`")
        pairs = recipe_combinations(_split_list(recipes), runs)
        grid = [(p, d) for p in proxy_specs for d in descriptor_specs] if grid_given else []
        combinations = grid + [pair for pair in pairs if pair not in grid]
        proxy_specs = list(dict.fromkeys(p for p, _ in combinations))
        descriptor_specs = list(dict.fromkeys(d for _, d in combinations))
    config = BenchConfig(
        ks=tuple(_ks(ks)),
        descriptors=tuple(descriptor_specs),
        proxies=tuple(proxy_specs),
        presets=tuple(preset_names),
        combinations=combinations,
        cache_features=not no_cache,
        train=train_missing,
        command="street2shop " + " ".join(sys.argv[1:]),
        **options,
    )
    run_bench_suite(config, echo=click.echo, progress=lambda message: click.echo(message, err=True))


@cli.command("bench-generation")
@_opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP)
@_opt("--split", default="val")
@click.option(
    "--proxies", required=True, help="Proxies to score, e.g. 'hp@runs/parser/final.pt,paintnet@runs/paintnet/final.pt'."
)
@_whole("--samples", 500, 0, "Seeded sample of the split's person -> product pairs (0: all).")
@_whole("--size", 64, 1, "Side the images are compared at (the paper: 64).")
@click.option("--no-inception", is_flag=True, help="Skip the IS-style score (one classifier pass per image).")
@_opt("--out", "out_dir", default="results/generation", type=click.Path(file_okay=False))
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
@_opt("--seed", default=0)
def bench_generation_command(proxies, no_inception, **options) -> None:
    """Tables 2-3: each proxy's output against the true product photo (RMSE, SSIM, IS-style score).

    Adds two reference rows: the mean training product (a generator that learned only the average) and
    the real products' own IS-style score. Writes generation.csv/.md and samples.png (person | each
    proxy | true product) to --out.
    """
    from benchmarks.suite import GenerationBenchConfig, run_generation_bench
    from generation.proxies import list_proxies

    proxies = tuple(_expand(proxies, list_proxies(), "proxy"))
    config = GenerationBenchConfig(proxies=proxies, inception=not no_inception, **options)
    run_generation_bench(config, echo=click.echo)


@cli.command("demo")
@_whole("--products", 120, 1, "Size of the generated synthetic set.")
@_opt("--descriptors", default="colorhist,sift,rmac,gem")
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Where the synthetic set, indexes and features go.")
def demo_command(products, descriptors, device, cache_dir) -> None:
    """Build the embedded synthetic street-to-shop set, index its catalog, query it, print mAP@k.

    Everything runs offline on this machine in about a minute on a laptop CPU.
    """
    from street2shop.engine import run_demo

    run_demo(products, _split_list(descriptors), device, _cache_dir(cache_dir), echo=click.echo)


@cli.group("train")
def train_group() -> None:
    """Train the learnable parts: descriptors and proxies. Every run checkpoints and resumes."""


TRAIN_OPTIONS = [
    _opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP + " Its training pairs are used."),
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
    _opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--cache-dir", default=None, help="Default: $STREET2SHOP_CACHE or ~/.cache/street2shop."),
    _opt("--seed", default=0),
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


def _train(kind: str, name: str, dataset, out_dir, time_budget, device, cache_dir, seed, settings=(), **flags) -> None:
    """Build the named descriptor or proxy, train it on the dataset's training pairs, say where it went."""
    from benchmarks.reproduce import model_class, option_defaults, train_named
    from retrieval.datasets import load_dataset
    from retrieval.registry import parse_settings

    if not getattr(model_class(kind, name), "trainable", False):  # before any data loads
        raise ValueError(f"{kind} {name!r} has nothing to train")
    # Typed by the model's options and its trainer's: 'false' is False, not a truthy string.
    settings = parse_settings(settings, option_defaults(kind, name), source="--set")
    if "pairs" in settings:  # a pair archive (export-pairs) stands in for the photos
        if kind == "descriptor":
            raise ValueError(
                "--set pairs=ARCHIVE is for the generators (paintnet, pix2pix, dtgan); "
                "descriptors train on the data set's photos: drop it and give --dataset"
            )
        data = None
    else:
        data = load_dataset(dataset, split="val", seed=seed, cache_dir=_cache_dir(cache_dir))
        if data.train is None or data.train.empty:
            raise ValueError(f"{data.name} has no training pairs to train {name} on")
    started = time.perf_counter()
    flags = {key: value for key, value in flags.items() if value is not None}  # epochs, batch_size, lr, parser
    budget_s = None if time_budget is None else 60 * time_budget
    final = train_named(kind, name, data, out_dir, settings, flags, device=device, seed=seed, time_budget_s=budget_s)
    budget = f" (stopped by the {time_budget:g}-minute budget if it came first)" if time_budget else ""
    source = (
        f"the pair archive {settings['pairs']}" if data is None else f"{data.name}'s {len(data.train)} training pairs"
    )
    click.echo(
        f"trained {name} in {time.perf_counter() - started:.0f} s on {source}"
        f"{budget} -> {final}; steps and epochs: {Path(out_dir) / 'losses.csv'}"
    )
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


@cli.command("export-pairs")
@_opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP + " Its training pairs are exported.")
@_whole("--size", 64, 1, "Side of the square tensors (PaintNet's image_size).")
@_opt(
    "--shape-maps",
    default="cloth_mask",
    type=click.Choice(["cloth_mask", "grabcut"]),
    help="Product shape maps: the data set's masks, or GrabCut on the product photo (the paper).",
)
@_opt("--seed", default=0, help="Seed of the train/validation split.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Archive to write (.npz).")
@click.option("--cache-dir", default=None)
def export_pairs_command(dataset, size, shape_maps, seed, out_path, cache_dir) -> None:
    """Write the preprocessed training pairs (person, segmented texture, product, shape map, garment mask)
    as one lossless archive, for training on a machine without the photos (`--set pairs=FILE`).

    VITON's 3,639 training pairs at 64x64 make a ~37 MB archive (lossless WebP/PNG).
    """
    from generation.training.pairs import prepare_pair_tensors, save_pair_archive
    from retrieval.datasets import load_dataset

    data = load_dataset(dataset, split="val", seed=seed, cache_dir=_cache_dir(cache_dir))
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


@cli.command("bench-speed")
@_opt("--descriptors", default="colorhist,sift,rmac,gem", help="Descriptors timed for extraction ('' to skip).")
@_opt("--proxies", default="", help="Proxy stages timed alone, e.g. 'hp,paintnet@runs/paintnet/final.pt' ('' to skip).")
@_whole("--images", 64, 1, "Synthetic images per descriptor for the extraction timing.")
@_opt(
    "--sizes",
    default="10000,100000",
    callback=lambda ctx, param, value: _counts(value),
    help="Catalog sizes for the index timings, e.g. 10000,100000,1000000.",
)
@_opt("--dim", default=512, type=click.IntRange(min=1))
@_opt("--presets", default="flat,ivfpq,hnsw", help="Index presets timed (flat always runs as the reference).")
@_opt("--out", "out_dir", default="results/speed", type=click.Path(file_okay=False))
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
def bench_speed_command(sizes, **options) -> None:
    """Extraction images/s per descriptor; index build time, memory, QPS, p50/p99 latency and recall@10.

    Index timings use clustered descriptor-like vectors; each size also gets flat's bound (sgemm for
    batches, memory bandwidth for single queries) and a plain numpy brute force. Approximate presets
    tune their own search parameters for recall@10 >= 0.95 first.
    """
    from benchmarks.suite import SpeedBenchConfig, run_speed_bench

    lists = {name: tuple(_split_list(options.pop(name))) for name in ("descriptors", "proxies", "presets")}
    config = SpeedBenchConfig(sizes=tuple(sizes), **lists, **options)
    run_speed_bench(config, echo=click.echo, progress=lambda message: click.echo(message, err=True))


def _service():
    """street2shop.service, or a one-line error naming the install command when the `serve` extra is missing."""
    import street2shop.service as service  # raises MissingServeExtraError (a RuntimeError) saying what to install

    return service


@cli.command("serve")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@_opt("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface; then set --token).")
@_opt("--port", default=8000, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    default=None,
    envvar="STREET2SHOP_TOKEN",
    help="Writes (add, remove, reload) need 'Authorization: Bearer TOKEN'. Also from $STREET2SHOP_TOKEN.",
)
@_opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@_opt("--max-upload-mb", default=20.0, type=click.FloatRange(min=0, min_open=True), help="Cap on one photo.")
@_whole("--max-pixels", 64_000_000, 1, "Cap on a photo's width x height, checked before decoding it.")
@_opt("--timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), help="Seconds a request may take.")
@_opt(
    "--batch-wait-ms",
    default=2.0,
    type=click.FloatRange(min=0),
    help="How long a search waits for others to batch with.",
)
@_whole("--max-batch", 32, 1, "Most photos searched together.")
def serve_command(index_dir, host, port, token, device, max_upload_mb, max_pixels, timeout, batch_wait_ms, max_batch):
    """Serve an index over HTTP: a search page at /, the JSON API (docs at /docs).

    \b
    Needs the serve extra: pip install -e ".[serve]"
    Endpoints: POST /search (multipart image, k), GET /products/ID/image, POST /products (product_id + image),
    DELETE /products/ID, POST /admin/reload, GET /health, GET /metrics.
    \b
    Example:
      street2shop serve shop-index --port 8000
      curl -F image=@photo.jpg -F k=5 http://127.0.0.1:8000/search
    """
    service = _service()
    from street2shop.service.server import serve

    settings = service.ServiceSettings(
        token=token,
        device=device,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        request_timeout_s=timeout,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
    )
    serve(Path(index_dir), host=host, port=port, settings=settings, echo=click.echo)


def _loadtest_photos(sources, cache_dir) -> List[Path]:
    """--queries values -> photo files: files, directories, or a data set spec (its validation queries)."""
    from street2shop.service.loadtest import MAX_QUERY_PHOTOS, query_photos

    paths = []
    for source in sources:
        if ":" in source and not Path(source).exists():
            from retrieval.datasets import load_dataset

            data = load_dataset(source, split="val", cache_dir=_cache_dir(cache_dir))
            paths += list(dict.fromkeys(data.queries["image"]))[:MAX_QUERY_PHOTOS]
        else:
            paths.append(source)
    return query_photos([Path(p) for p in paths])


@cli.command("loadtest")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--queries",
    "sources",
    multiple=True,
    required=True,
    help="Query photos: files, directories, or a data set spec (its validation queries), e.g. "
    "viton:../shared/data/viton. Repeatable; at most 200 photos are used.",
)
@_opt("--concurrency", default="1,8,32", callback=lambda ctx, param, value: _counts(value), help="Client counts.")
@_opt("--duration", default=10.0, type=click.FloatRange(0, 600, min_open=True), help="Seconds per concurrency.")
@click.option("--reload-during", is_flag=True, help="POST /admin/reload 3 times per level while under load.")
@_whole("--products", 0, 0, "Pad a temporary copy of the index to N products with random vectors (0: as is).")
@_whole("--k", 10, 1, "Products asked per search.")
@_opt("--host", default="127.0.0.1", help="Loopback address to serve on (anything else is refused).")
@_opt("--device", default="cpu", type=click.Choice(["auto", "cpu", "cuda"]))
@_whole("--max-requests", 20000, 1, "Bound on the requests of one concurrency level.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the numbers.")
@click.option("--cache-dir", default=None)
def loadtest_command(index_dir, sources, concurrency, duration, reload_during, products, k, host, device, **rest):
    """Load-test `street2shop serve` on this machine: p50/p99 latency, throughput, failures, load average.

    Starts the service itself on a free loopback port, runs each concurrency for --duration seconds
    (bounded by --max-requests), stops the service. With --products N it serves a temporary copy of
    INDEX_DIR padded to N products with seeded random vectors (INDEX_DIR is not changed).

    \b
    Example (the `fast` recipe on 100k products, VITON validation photos as queries):
      street2shop index --catalog viton:../shared/data/viton --split val --recipe fast --out fast-index
      street2shop loadtest fast-index --products 100000 --queries viton:../shared/data/viton --reload-during
    """
    import tempfile

    _service()
    from street2shop.service.loadtest import pad_catalog, reports_json, run_loadtest

    photos = _loadtest_photos(sources, rest["cache_dir"])
    with tempfile.TemporaryDirectory(prefix="street2shop-loadtest-") as scratch:
        served = Path(index_dir)
        if products:
            started = time.perf_counter()
            served = Path(scratch) / "index"
            total = pad_catalog(Path(index_dir), served, products)
            click.echo(f"padded a copy of {index_dir} to {total} products in {time.perf_counter() - started:.1f} s")
        reports = run_loadtest(
            served,
            photos,
            concurrencies=concurrency,
            duration_s=duration,
            reload_during=reload_during,
            k=k,
            host=host,
            device=device,
            max_requests=rest["max_requests"],
            log_path=Path(scratch) / "server.log",
            echo=click.echo,
        )
    if rest["json_path"]:
        Path(rest["json_path"]).write_text(reports_json(reports))
    failed = sum(r.failed + r.reload_failures for r in reports)
    click.echo(f"{failed} failed requests in all" + (" (reloads included)" if reload_during else ""))
    if failed:
        raise click.exceptions.Exit(1)


def main() -> None:
    cli(prog_name="street2shop")


if __name__ == "__main__":
    main()
