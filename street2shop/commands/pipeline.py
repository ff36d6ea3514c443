"""`street2shop index | query | add | remove | recipes | build`: saved pipelines and their catalogs."""

from __future__ import annotations

import json

import click

from street2shop.commands.options import (
    DATASET_HELP,
    RERANK_MODEL_HELP,
    RERANK_MODELS,
    SPEC_HELP,
    cache_dir_path,
    embedding_options,
    opt,
    query_bank_options,
    whole,
    workers_option,
)


@click.command("index")
@click.option("--catalog", required=True, help=DATASET_HELP + " Its catalog (products) is indexed.")
@opt("--split", default="all", help="Which part of a dataset's catalog to index: all, train or val.")
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
@embedding_options(
    "Images used to fit codebooks/whitening.",
    "Feature cache (an interrupted run resumes from it). Default: $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@opt("--seed", default=0)
@click.option(
    "--local-features",
    is_flag=True,
    help="Also store the catalog's local features (local descriptors), for `query --rerank`.",
)
@click.option(
    "--shards",
    default=None,
    type=click.IntRange(min=1),
    help="Build the index as N shards filled in parallel (see --shard-layout). Default: one in-memory index.",
)
@opt(
    "--shard-layout",
    default="merged",
    type=click.Choice(["merged", "separate"]),
    help="With --shards: merged = one memory-mapped on-disk index (--preset ivfpq-rflat; same results, lists and "
    "vectors stay on disk; read-only: `add`/`remove` refuse it); separate = N shard files searched together "
    "(any preset, one GPU per shard where there are several; exact presets give the single index's results; "
    "`add` goes to the last shard, `remove` is refused).",
)
@click.option(
    "--engine",
    default="local",
    type=click.Choice(["local", "ray"]),
    help="Who embeds the catalog: local (this process) or ray (an actor pool on a Ray cluster, resumable Parquet "
    'shards in the feature cache; needs pip install -e ".[distributed]"). Same vectors, same index.',
)
@click.option(
    "--address",
    default=None,
    help="With --engine ray: the cluster to join, auto (the running one) or ray://HOST:PORT. "
    "Default: a local Ray cluster started for this job.",
)
@query_bank_options(
    "Score with query-bank normalisation: a bank of training-split query photos of this data set, embedded "
    "as queries are, demotes products that sit close to every query; repeatable. Default: the recipe's (recipe "
    "street: the street variant of --fit-data, else of the catalog's data set), else none.",
    recipe_defaults=True,
)
def index_command(catalog, out_dir, recipe, proxy, descriptor, preset, rerank, runs, query_bank, **options) -> None:
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

    parts = resolve_recipe(
        recipe,
        proxy=proxy,
        descriptor=descriptor,
        preset=preset,
        rerank=rerank,
        runs=runs,
        query_bank=query_bank,
        bank_data=options["fit_data"] or catalog,
        query_bank_size=options.pop("query_bank_size"),
        bank_beta=options.pop("bank_beta"),
    )
    index_catalog(catalog, out_dir, echo=click.echo, **parts, **options)


@click.command("query")
@click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory written by `street2shop index` (it records its proxy and descriptor).",
)
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@whole("--k", 10, 1, "Products returned per photo (>= 1).")
@click.option("--proxy", default=None, help="Refuse unless the index has this proxy (old indexes: the proxy to use).")
@click.option("--descriptor", default=None, help="Refuse to run unless the index was built with this descriptor.")
@opt("--format", "fmt", default="table", type=click.Choice(["table", "json"]))
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--rerank",
    default=None,
    type=click.IntRange(min=0),
    help="Re-rank the top N by spatial verification (index with local features); 0: off. Default: the index's.",
)
@opt("--rerank-model", default="similarity", type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP)
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


@click.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--catalog", required=True, help=DATASET_HELP + " Its products not yet in the index are added.")
@opt("--split", default="all", help="Which part of a dataset's catalog: all, train or val.")
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Where synthetic sets are generated. Default: $STREET2SHOP_CACHE.")
@opt("--seed", default=0)
@workers_option()
def add_command(index_dir, catalog, split, device, cache_dir, seed, workers) -> None:
    """Add a catalog's new products to a saved index (products already in it are left as they are).

    Only the new products' photos are embedded; the index is saved as a new version in one atomic step,
    so a running `query` or service sees the old or the new catalog, never a mix.
    """
    from street2shop.engine import add_catalog

    add_catalog(
        index_dir,
        catalog,
        split=split,
        device=device,
        cache_dir=cache_dir_path(cache_dir),
        seed=seed,
        workers=workers,
        echo=click.echo,
    )


@click.command("remove")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("product_ids", nargs=-1, required=True)
def remove_command(index_dir, product_ids) -> None:
    """Remove products by id from a saved index (an unknown id refuses the whole command)."""
    from street2shop.pipeline import Pipeline

    pipeline = Pipeline.load(index_dir, device="cpu")
    pipeline.remove(list(product_ids))
    pipeline.save()
    click.echo(f"removed {len(set(product_ids))} products from {index_dir}: {pipeline.ntotal} left")


def _bank_words(template: str) -> str:
    """A recipe's query-bank source in words ("{data_street}" -> street versions of the data's training photos)."""
    words = {"{data}": "the data's training photos", "{data_street}": "street versions of the data's training photos"}
    return words.get(template, template)


def _bank_summary(recipe) -> str:
    """How many photos, from where, at which beta: e.g. "all street versions of the data's training photos, beta 15"."""
    how_many = "all" if recipe.bank_size == 0 else f"{recipe.bank_size:,} of the"
    return f"{how_many} {' + '.join(map(_bank_words, recipe.query_bank))}, beta {recipe.bank_beta:g}"


@click.command("recipes")
def recipes_command() -> None:
    """List the named pipelines (`index --recipe`, `build --recipe`) with what they need and measured."""
    from street2shop.recipes import RECIPES

    for recipe in RECIPES.values():
        needs = ", ".join(f"train {t.kind} {t.name}" for t in recipe.trainings) or "no training"
        click.echo(f"{recipe.name}: {recipe.summary}")
        click.echo(
            f"    proxy {recipe.proxy}, descriptor {recipe.descriptor}, preset {recipe.preset}, rerank {recipe.rerank}"
            + (f", query bank: {_bank_summary(recipe)}" if recipe.query_bank else "")
        )
        click.echo(f"    needs: {needs}; measured: {recipe.measured}")


@click.command("build")
@click.option("--recipe", required=True, help="Recipe to train and index (see `street2shop recipes`).")
@click.option("--train-data", required=True, help=DATASET_HELP + " Its training pairs train the recipe's models.")
@click.option("--catalog", required=True, help=DATASET_HELP + " Its catalog is indexed.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--runs", default=None, help="Where the trainings go (RUNS/<run>/final.pt). Default: runs/RECIPE.")
@opt("--split", default="all", help="Which part of the catalog's data set to index: all, train or val.")
@click.option("--fit-data", default=None, help="Data set fitting codebooks/whitening. Default: --train-data.")
@click.option(
    "--time-budget",
    "time_budget_minutes",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Minutes per training (stops cleanly, checkpointed). Default: each model's own.",
)
@click.option("--epochs", default=None, type=click.IntRange(min=0), help="Epochs per training (default: the model's).")
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Default: $STREET2SHOP_CACHE or ~/.cache/street2shop.")
@opt("--seed", default=0)
@workers_option()
def build_command(recipe, train_data, catalog, out_dir, **options):
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

    build_recipe(recipe, train_data, catalog, out_dir, echo=click.echo, **options)  # the options keep their names


COMMANDS = (
    index_command,
    query_command,
    add_command,
    remove_command,
    recipes_command,
    build_command,
)
