"""`street2shop bench | bench-generation | bench-speed`: the benchmark suites (`benchmarks.suite`)."""

from __future__ import annotations

import sys
from typing import List

import click

from street2shop.commands.options import (
    DATASET_HELP,
    RERANK_MODEL_HELP,
    RERANK_MODELS,
    embedding_options,
    opt,
    parse_counts,
    parse_ks,
    query_bank_options,
    split_list,
    whole,
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


@click.command("bench")
@opt("--dataset", default="synthetic", help=DATASET_HELP)
@opt(
    "--split",
    default="val",
    help="val, train or all (deepfashion-c2s also test): a seeded third of the pairs or products for viton, "
    "synthetic and lookbook, the official partitions for the published sets.",
)
@opt(
    "--descriptors",
    default="colorhist,sift,rmac,gem",
    help="Comma-separated names or globs ('*' = all), each optionally NAME@run/final.pt; options of an untrainable "
    "one as NAME[KEY=VALUE;...], e.g. 'gem[backbone=lite2]' (a trainable one's need --train or a checkpoint).",
)
@opt("--proxies", default="none", help="Names or globs, e.g. 'none,hp,paintnet@runs/paintnet/final.pt'.")
@opt("--indexes", "--index", "presets", default="flat", help="Index presets or globs, e.g. 'flat,ivfpq'.")
@opt("--k", "ks", default="1,5,10,20", help="Cut-offs for mAP@k and recall@k.")
@opt("--out", "out_dir", default="results", type=click.Path(file_okay=False), help="Where the report goes (see below).")
@embedding_options(
    "Training images used to fit codebooks/whitening.",
    "Feature and checkpoint cache; default $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@click.option("--no-cache", is_flag=True, help="Recompute every feature.")
@opt(
    "--seed",
    default=0,
    help="Seed of the train/validation split, the bootstrap and the samples. A model trained with `street2shop train "
    "--split-seed N` learnt split N's training pairs: a checkpoint trained on evaluated products is refused.",
)
@whole(
    "--rerank",
    0,
    0,
    "Also score each local descriptor's top N re-ranked by spatial verification (rows NAME+sv); 0: off.",
)
@opt("--rerank-model", default="similarity", type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP)
@query_bank_options(
    "Also score every combination with query-bank normalisation (rows NAME+qb): a bank of training-split "
    "query photos of this data set, repeatable (e.g. --query-bank viton:ROOT --query-bank viton-street:ROOT)."
)
@click.option(
    "--allow-train-overlap",
    is_flag=True,
    help="Score checkpoints on products they were trained on (refused by default: such scores measure "
    "memorisation). Every `train` run records its training products in final.pt.",
)
@whole("--limit", 0, 0, "Evaluate a seeded sample of N products and their queries (0: all); for slow descriptors.")
@whole("--distractors", 0, 0, "Extra gallery products drawn from the training split (nobody queries them).")
@whole("--protocol-draws", 10, 0, "The paper's protocol: seeded galleries drawn (0: off).")
@whole("--protocol-gallery", 250, 1, "Products per drawn gallery (the paper: 250).")
@whole("--bootstrap", 1000, 0, "Bootstrap resamples for the 95% intervals and paired tests (0: off).")
@whole(
    "--generation-samples",
    200,
    0,
    "Queries whose proxy output is scored against the true product (RMSE, SSIM, IS-style); 0: off.",
)
@whole("--rank-pictures", 6, 0, "Queries pictured (query | proxy output | top 5) for every combination; 0: off.")
@click.option(
    "--train",
    "train_missing",
    is_flag=True,
    help="Train every trainable model named without a checkpoint (cached under CACHE/checkpoints by config; "
    "reused later). Ablations as NAME[KEY=VALUE;...], e.g. 'paintnet[use_perceptual=False]'.",
)
@opt(
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
    "alone unless --descriptors/--proxies are given too. A recipe with a query bank (street) also gets its "
    "NAME+qb row, with the recipe's bank, size and beta unless --query-bank, --query-bank-size or --bank-beta say.",
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
        from street2shop.recipes import recipe_combinations, recipe_query_bank

        ctx = click.get_current_context()
        grid_given = any(
            ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            for name in ("descriptors", "proxies")
        )
        if train_missing:
            raise click.UsageError("--recipes and --train do not mix: train a recipe with `street2shop build`")
        pairs = recipe_combinations(split_list(recipes), runs)
        given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        bank = None if "query_bank" in given else recipe_query_bank(split_list(recipes), options["dataset"])
        if bank is not None:  # score the recipe as it serves: its +qb row is the recipe's number
            options.update({key: value for key, value in bank.items() if key not in given})
        grid = [(p, d) for p in proxy_specs for d in descriptor_specs] if grid_given else []
        combinations = grid + [pair for pair in pairs if pair not in grid]
        proxy_specs = list(dict.fromkeys(p for p, _ in combinations))
        descriptor_specs = list(dict.fromkeys(d for _, d in combinations))
    config = BenchConfig(
        ks=tuple(parse_ks(ks)),
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


@click.command("bench-generation")
@opt("--dataset", default="viton:../shared/data/viton", help=DATASET_HELP)
@opt("--split", default="val")
@click.option(
    "--proxies", required=True, help="Proxies to score, e.g. 'hp@runs/parser/final.pt,paintnet@runs/paintnet/final.pt'."
)
@whole("--samples", 500, 0, "Seeded sample of the split's person -> product pairs (0: all).")
@whole("--size", 64, 1, "Side the images are compared at (the paper: 64).")
@click.option("--no-inception", is_flag=True, help="Skip the IS-style score (one classifier pass per image).")
@opt("--out", "out_dir", default="results/generation", type=click.Path(file_okay=False))
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
@opt("--seed", default=0)
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


@click.command("bench-speed")
@opt("--descriptors", default="colorhist,sift,rmac,gem", help="Descriptors timed for extraction ('' to skip).")
@opt("--proxies", default="", help="Proxy stages timed alone, e.g. 'hp,paintnet@runs/paintnet/final.pt' ('' to skip).")
@whole("--images", 64, 1, "Synthetic images per descriptor for the extraction timing.")
@opt(
    "--sizes",
    default="10000,100000",
    callback=lambda ctx, param, value: parse_counts(value),
    help="Catalog sizes for the index timings, e.g. 10000,100000,1000000.",
)
@opt("--dim", default=512, type=click.IntRange(min=1))
@opt("--presets", default="flat,ivfpq,hnsw", help="Index presets timed (flat always runs as the reference).")
@opt("--out", "out_dir", default="results/speed", type=click.Path(file_okay=False))
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
def bench_speed_command(sizes, **options) -> None:
    """Extraction images/s per descriptor; index build time, memory, QPS, p50/p99 latency and recall@10.

    Index timings use clustered descriptor-like vectors; each size also gets flat's bound (sgemm for
    batches, memory bandwidth for single queries) and a plain numpy brute force. Approximate presets
    tune their own search parameters for recall@10 >= 0.95 first.
    """
    from benchmarks.suite import SpeedBenchConfig, run_speed_bench

    lists = {name: tuple(split_list(options.pop(name))) for name in ("descriptors", "proxies", "presets")}
    config = SpeedBenchConfig(sizes=tuple(sizes), **lists, **options)
    run_speed_bench(config, echo=click.echo, progress=lambda message: click.echo(message, err=True))


@click.command("bench-shards")
@whole("--n", 1_000_000, 1000, "Catalog size N (descriptor-like vectors).")
@whole("--dim", 512, 1, "Vector dimension D.")
@whole("--shards", 4, 1, "Shards of the on-disk build, filled in parallel.")
@whole("--queries", 1000, 1, "Held-out queries for recall@10, QPS and memory.")
@opt("--out", "out_dir", default="results/shards", type=click.Path(file_okay=False))
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Where both indexes are saved.")
def bench_shards_command(n, dim, shards, queries, out_dir, work_dir) -> None:
    """One in-memory ivfpq-rflat index against the same built as N shards merged on disk: recall@10 (same
    search parameters), resident memory of each loaded in a fresh process, build time, cold and warm QPS.

    Writes shards.json and shards.md to --out. At the default 1M x 512 it needs ~10 GB of RAM, ~5 GB of disk
    and, on 2 cores, about 15 minutes.
    """
    from benchmarks.shard_bench import shard_bench, write_shard_bench

    report = shard_bench(
        n=n,
        dim=dim,
        shards=shards,
        n_queries=queries,
        work_dir=work_dir,
        progress=lambda line: click.echo(line, err=True),
    )
    path = write_shard_bench(report, out_dir)
    click.echo(path.read_text(encoding="utf-8"), nl=False)
    click.echo(f"wrote {path} and {path.with_suffix('.json')}")


COMMANDS = (
    bench_command,
    bench_generation_command,
    bench_speed_command,
    bench_shards_command,
)
