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
    "'viton:ROOT' (VITON layout, e.g. viton:../shared/data/viton), or 'csv:CATALOG.csv[,QUERIES.csv]'."
)


def _split_list(value: str) -> List[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _split_specs(value: str) -> List[str]:
    """Like `_split_list`, but a comma inside brackets stays: 'paintnet[image_size=64;sp_image_size=128,96],none'."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(value):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth <= 0:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:])
    return [item.strip() for item in items if item.strip()]


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


def _cache_dir(value: Optional[str]) -> Path:
    from retrieval.datasets import default_cache_dir

    return Path(value) if value else default_cache_dir()


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
RERANK_MODEL_HELP = "Geometric model of the spatial verification (see retrieval/rerank.py)."


@cli.command("index")
@click.option("--catalog", required=True, help=DATASET_HELP + " Its catalog (products) is indexed.")
@click.option(
    "--split", default="all", show_default=True, help="Which part of a dataset's catalog to index: all, train or val."
)
@click.option("--descriptor", default="gem", show_default=True, help="Descriptor name (see `street2shop list`).")
@click.option("--preset", default="flat", show_default=True, help="Index preset: flat (exact), ivfpq, hnsw.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--fit-max-images",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images used to fit codebooks/whitening.",
)
@click.option(
    "--cache-dir",
    default=None,
    help="Feature cache (an interrupted run resumes from it). Default: $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--local-features",
    is_flag=True,
    help="Also store the catalog's local features (local descriptors), for `query --rerank`.",
)
def index_command(
    catalog, split, descriptor, preset, out_dir, device, batch_size, fit_max_images, cache_dir, seed, local_features
) -> None:
    """Embed a catalog's product photos and save a FAISS index with its manifest.

    Descriptors that learn something (sift's codebook, rmac's whitening) are fitted on the dataset's
    training pairs when it has them, else on the catalog itself. Features are cached per chunk:
    run the same command again after an interruption and it resumes.
    """
    from benchmarks.runner import fit_images
    from index import check_index_destination
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset
    from retrieval.descriptors import create_descriptor
    from street2shop.engine import build_index

    check_index_destination(out_dir)  # before the data loads: a refused --out must not cost the whole extraction
    cache = _cache_dir(cache_dir)
    dataset = load_dataset(catalog, split=split, seed=seed, cache_dir=cache)
    model = create_descriptor(descriptor).to(resolve_device(device)).eval()
    click.echo(f"indexing {len(dataset.catalog)} products of {dataset.name} with {descriptor} ({preset})")
    started = time.perf_counter()
    built = build_index(
        dataset.catalog,
        model,
        out_dir,
        preset=preset,
        fit_paths=fit_images(dataset, fit_max_images, seed),
        batch_size=batch_size,
        cache_dir=cache / "features",
        faiss_device=device,
        local_features=local_features,
    )
    click.echo(f"wrote {out_dir}: {built.ntotal} products, dim {built.dim}, {time.perf_counter() - started:.1f} s")


@cli.command("query")
@click.option(
    "--index",
    "index_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory written by `street2shop index`.",
)
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--k", default=10, show_default=True, type=click.IntRange(min=1), help="Products returned per photo (>= 1)."
)
@click.option("--proxy", default="none", show_default=True, help="Proxy stage applied to the photos first.")
@click.option("--descriptor", default=None, help="Refuse to run unless the index was built with this descriptor.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--rerank",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Re-rank the top N by spatial verification (index built with --local-features); 0: off.",
)
@click.option(
    "--rerank-model", default="similarity", show_default=True, type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP
)
def query_command(index_dir, photos, k, proxy, descriptor, fmt, device, rerank, rerank_model) -> None:
    """Find the top-k catalog products for street photos."""
    from street2shop.engine import Searcher

    searcher = Searcher(
        index_dir, device=device, proxy=proxy, descriptor=descriptor, rerank=rerank, rerank_conf={"model": rerank_model}
    )
    results = searcher.search(list(photos), k=k)
    if fmt == "json":
        # One entry per photo argument, in order: search returns the same number of rows for each, so a
        # photo given twice is two entries (grouping by path merged them into one with 2k results).
        per_photo = len(results) // len(photos)
        entries = [
            {
                "query": photo,
                "results": [
                    {"rank": int(r.rank), "product_id": r.product_id, "score": round(float(r.score), 6)}
                    for r in results.iloc[i * per_photo : (i + 1) * per_photo].itertuples()
                ],
            }
            for i, photo in enumerate(photos)
        ]
        click.echo(json.dumps(entries, indent=2))
    else:
        click.echo(results.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _expand(patterns: str, names: List[str], what: str) -> List[str]:
    """Comma-separated names or shell globs ('*', 'paintnet*', 's?ft') -> registered names, in order.

    A 'NAME@checkpoint' entry is kept as given (its NAME must exist); a glob that matches nothing is an
    error that lists what exists.
    """
    import fnmatch

    chosen: List[str] = []
    for pattern in _split_specs(patterns):
        base = pattern.split("@")[0].split("[")[0]
        if "@" in pattern or "[" in pattern:  # a checkpoint or options (paintnet[use_perceptual=False]): as given
            matches = [pattern] if base in names else []
        else:
            matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise click.BadParameter(f"{pattern!r} matches no {what}; registered: {', '.join(names)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def _model_class(kind: str, name: str):
    """The registered descriptor or proxy class (unknown names: ValueError listing the valid ones)."""
    if kind == "descriptor":
        from retrieval.descriptors import DESCRIPTORS, list_descriptors

        list_descriptors()  # registers the built-ins
        return DESCRIPTORS.get(name)
    from generation.proxies import PROXIES, list_proxies

    list_proxies()
    return PROXIES.get(name)


def _option_defaults(kind: str, name: str) -> dict:
    """Every option a model of that name takes, with its default: its config, then its training options."""
    from retrieval.training import training_defaults

    cls = _model_class(kind, name)
    defaults = training_defaults(cls) if getattr(cls, "trainable", False) else {}
    return {**defaults, **getattr(cls, "default_conf", {})}


def _typed_specs(specs: List[str], kind: str, flag: str) -> List[str]:
    """Each 'NAME[KEY=VALUE;...]' spec with its values typed by the options' defaults, written back as
    Python literals ('paintnet[use_perceptual=false]' -> "paintnet[use_perceptual=False]"), the
    spelling benchmarks.reproduce reads; a wrong type or unknown option is refused here, before any work."""
    from retrieval.registry import parse_settings

    typed = []
    for spec in specs:
        name, bracket, rest = spec.partition("[")
        if not bracket or "@" in spec:
            typed.append(spec)
            continue
        if not rest.endswith("]"):
            raise click.BadParameter(f"{spec!r}: expected NAME[KEY=VALUE;KEY=VALUE]", param_hint=flag)
        items = [item.strip() for item in rest[:-1].split(";") if item.strip()]
        options = parse_settings(items, _option_defaults(kind, name.strip()), source=f"{flag} {spec}:")
        typed.append(f"{name.strip()}[{';'.join(f'{key}={value!r}' for key, value in options.items())}]")
    return typed


@cli.command("bench")
@click.option("--dataset", default="synthetic", show_default=True, help=DATASET_HELP)
@click.option("--split", default="val", show_default=True, help="val (seeded third of the pairs), train, or all.")
@click.option(
    "--descriptors",
    default="colorhist,sift,rmac,gem",
    show_default=True,
    help="Comma-separated names or globs ('*' = all), each optionally NAME@run/final.pt.",
)
@click.option(
    "--proxies",
    default="none",
    show_default=True,
    help="Names or globs, e.g. 'none,hp,paintnet@runs/paintnet/final.pt'.",
)
@click.option(
    "--indexes",
    "--index",
    "presets",
    default="flat",
    show_default=True,
    help="Index presets or globs, e.g. 'flat,ivfpq'.",
)
@click.option("--k", "ks", default="1,5,10,20", show_default=True, help="Cut-offs for mAP@k and recall@k.")
@click.option(
    "--out",
    "out_dir",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the report goes (see below).",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--fit-max-images",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training images used to fit codebooks/whitening.",
)
@click.option(
    "--cache-dir",
    default=None,
    help="Feature and checkpoint cache; default $STREET2SHOP_CACHE or ~/.cache/street2shop.",
)
@click.option("--no-cache", is_flag=True, help="Recompute every feature.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--rerank",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also score each local descriptor's top N re-ranked by spatial verification (rows NAME+sv); 0: off.",
)
@click.option(
    "--rerank-model", default="similarity", show_default=True, type=click.Choice(RERANK_MODELS), help=RERANK_MODEL_HELP
)
@click.option(
    "--limit",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Evaluate a seeded sample of N products and their queries (0: all); for slow descriptors.",
)
@click.option(
    "--distractors",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Extra gallery products drawn from the training split (nobody queries them).",
)
@click.option(
    "--protocol-draws",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="The paper's protocol: seeded galleries drawn (0: off).",
)
@click.option(
    "--protocol-gallery",
    default=250,
    show_default=True,
    type=click.IntRange(min=1),
    help="Products per drawn gallery (the paper: 250).",
)
@click.option(
    "--bootstrap",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Bootstrap resamples for the 95%% intervals and paired tests (0: off).",
)
@click.option(
    "--generation-samples",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Queries whose proxy output is scored against the true product (RMSE, SSIM, IS-style); 0: off.",
)
@click.option(
    "--rank-pictures",
    default=6,
    show_default=True,
    type=click.IntRange(min=0),
    help="Queries pictured (query | proxy output | top 5) for every combination; 0: off.",
)
@click.option(
    "--train",
    "train_missing",
    is_flag=True,
    help="Train every trainable model named without a checkpoint (cached under CACHE/checkpoints by config; "
    "reused later). Ablations as NAME[KEY=VALUE;...], e.g. 'paintnet[use_perceptual=False]'.",
)
@click.option(
    "--train-budget",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Minutes of training per model with --train.",
)
def bench_command(
    dataset,
    split,
    descriptors,
    proxies,
    presets,
    ks,
    out_dir,
    device,
    batch_size,
    fit_max_images,
    cache_dir,
    no_cache,
    seed,
    rerank,
    rerank_model,
    limit,
    distractors,
    protocol_draws,
    protocol_gallery,
    bootstrap,
    generation_samples,
    rank_pictures,
    train_missing,
    train_budget,
) -> None:
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
    from benchmarks.report import (
        bench_markdown,
        git_revision,
        map_curves_frame,
        package_versions,
        plot_heatmap,
        plot_map_curves,
        write_bench_rank_pictures,
        write_table,
    )
    from benchmarks.runner import format_table, proxy_previews, remove_previous_bench_outputs, run_benchmark
    from generation.proxies import list_proxies
    from index import list_index_presets
    from retrieval.batching import resolve_device, sample_paths
    from retrieval.datasets import load_dataset, subset_products
    from retrieval.descriptors import list_descriptors
    from retrieval.io import write_text_atomic

    k_list = _ks(ks)
    descriptor_specs = _typed_specs(
        _expand(descriptors, list_descriptors(), "descriptor"), "descriptor", "--descriptors"
    )
    proxy_specs = _typed_specs(_expand(proxies, list_proxies(), "proxy"), "proxy", "--proxies")
    preset_names = _expand(presets, list_index_presets(), "index preset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    revision = git_revision()  # now: the code this process runs, even if the checkout moves on meanwhile
    trainings = []
    cache = _cache_dir(cache_dir)
    torch_device = resolve_device(device)
    data = subset_products(load_dataset(dataset, split=split, seed=seed, cache_dir=cache), limit, seed)
    click.echo(data.describe())
    with_options = [spec for spec in proxy_specs + descriptor_specs if "[" in spec.split("@")[0]]
    if with_options and not train_missing:
        raise ValueError(
            f"{', '.join(with_options)}: options in brackets name a model to train; add --train, "
            "or train it with `street2shop train ... --set KEY=VALUE` and pass NAME@final.pt"
        )
    if train_missing:
        from benchmarks.reproduce import ensure_trained

        proxy_specs, proxy_rows = ensure_trained(
            proxy_specs, "proxy", data, cache, train_budget, torch_device, seed, progress=True
        )
        descriptor_specs, descriptor_rows = ensure_trained(
            descriptor_specs, "descriptor", data, cache, train_budget, torch_device, seed, progress=True
        )
        trainings = proxy_rows + descriptor_rows
    click.echo(
        f"grid: {len(proxy_specs)} proxies x {len(descriptor_specs)} descriptors x {len(preset_names)} indexes",
        err=True,
    )
    result = run_benchmark(
        data,
        descriptor_specs,
        proxy_specs,
        presets=preset_names,
        ks=k_list,
        device=torch_device,
        faiss_device=device,
        batch_size=batch_size,
        fit_max_images=fit_max_images,
        cache_dir=None if no_cache else cache / "features",
        seed=seed,
        rerank=rerank or None,
        rerank_conf={"model": rerank_model},
        distractors=distractors,
        protocol_gallery=protocol_gallery,
        protocol_draws=protocol_draws,
        bootstrap=bootstrap,
    )
    generation, generation_md = _bench_generation(data, proxy_specs, generation_samples, torch_device, seed)
    # The grid is done: an earlier run's files in --out go now (not at the start, so that a run that
    # fails keeps them), and the report lists only what this run writes.
    remove_previous_bench_outputs(out)
    files = ["results.csv", "per_query.csv"]
    if rank_pictures > 0:
        queries = data.queries.drop_duplicates("query_id")
        chosen = sample_paths(list(queries["query_id"]), rank_pictures, seed)
        paths = dict(zip(queries["query_id"], queries["image"]))
        previews = proxy_previews(proxy_specs, [paths[q] for q in chosen], chosen, device=torch_device)
        catalog = dict(zip(data.catalog["product_id"].astype(str), data.catalog["image"]))
        if data.train is not None:  # distractors shown in a top 5 come from the training products
            catalog.update(
                {
                    f"distractor:{p}": i
                    for p, i in zip(data.train["product_id"].astype(str), data.train["product_image"])
                }
            )
        write_bench_rank_pictures(
            result.per_query, paths, catalog, previews, chosen, out / "rank", f"street2shop bench: {data.name}"
        )
        files.append("rank/index.html")
    wall = time.perf_counter() - started
    config = {
        "command": "street2shop " + " ".join(sys.argv[1:]),
        "dataset": dataset,
        "split": split,
        "described": data.describe(),
        "descriptors": descriptor_specs,
        "proxies": proxy_specs,
        "indexes": preset_names,
        "ks": k_list,
        "device": str(torch_device),
        "batch_size": batch_size,
        "fit_max_images": fit_max_images,
        "seed": seed,
        "limit": limit,
        "rerank": rerank,
        "rerank_model": rerank_model,
        "distractors": distractors,
        "protocol_draws": protocol_draws,
        "protocol_gallery": protocol_gallery,
        "bootstrap": bootstrap,
        "generation_samples": generation_samples,
        "trainings": trainings,
        "wall_s": round(wall, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": package_versions(),
        "git": revision,
    }
    write_table(result.summary, out / "results")
    write_table(result.per_query, out / "per_query")
    if not result.draws.empty:  # --protocol-draws 0 writes no draws: the report must not list the file
        write_table(result.draws, out / "protocol_draws")
        files.append("protocol_draws.csv")
    if generation is not None:
        write_table(generation, out / "generation")
        files.append("generation.csv")
    if trainings:
        write_table(_table_of_rows(trainings), out / "trainings")
        files.append("trainings.csv")
    plot_map_curves(map_curves_frame(result.summary, k_list), out / "map_curves.png")
    plot_heatmap(result.summary, out / "heatmap.png", metric=f"mAP@{max(k_list)}")
    write_text_atomic(out / "config.json", json.dumps(config, indent=2, default=str))
    files += ["map_curves.png", "heatmap.png", "config.json"]
    write_text_atomic(
        out / "report.md",
        bench_markdown(
            result,
            k_list,
            title=f"street2shop bench: {data.name}, split {split}",
            description=data.describe(),
            config=config,
            generation=generation,
            generation_markdown=generation_md,
            files=files,
        ),
    )
    click.echo(format_table(result.summary, k_list))
    if trainings:
        click.echo(
            "trainings: "
            + "; ".join(f"{t['name']} {'trained' if t['trained'] else 'cached'} {t['wall_s']:.0f} s" for t in trainings)
        )
    click.echo(f"\n{wall:.1f} s; wrote {out / 'report.md'} (and {', '.join(files)})")


def _table_of_rows(rows):
    """Rows of dicts -> DataFrame; nested values (training options) as JSON text, so Parquet can hold them."""
    import pandas as pd

    return pd.DataFrame(
        [
            {k: json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v for k, v in row.items()}
            for row in rows
        ]
    )


def _bench_generation(data, proxy_specs, samples, device, seed):
    """(table, markdown) of the proxies' outputs against the true products, or (None, '')."""
    if samples <= 0 or all(spec == "none" for spec in proxy_specs):
        return None, ""
    from benchmarks.generation_eval import evaluate_generation, evaluation_pairs, format_generation_table
    from benchmarks.runner import descriptor_label
    from generation.proxies import create_proxy

    persons, products = evaluation_pairs(data, samples, seed)
    proxies = [(descriptor_label(spec), create_proxy(spec)) for spec in proxy_specs if spec != "none"]
    reference = list(data.train["product_image"]) if data.train is not None and len(data.train) else None
    table, _ = evaluate_generation(proxies, persons, products, reference_products=reference, device=device)
    return table, format_generation_table(table, markdown=True)


@cli.command("bench-generation")
@click.option("--dataset", default="viton:../shared/data/viton", show_default=True, help=DATASET_HELP)
@click.option("--split", default="val", show_default=True)
@click.option(
    "--proxies", required=True, help="Proxies to score, e.g. 'hp@runs/parser/final.pt,paintnet@runs/paintnet/final.pt'."
)
@click.option(
    "--samples",
    default=500,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seeded sample of the split's person -> product pairs (0: all).",
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Side the images are compared at (the paper: 64).",
)
@click.option("--no-inception", is_flag=True, help="Skip the IS-style score (one classifier pass per image).")
@click.option("--out", "out_dir", default="results/generation", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
@click.option("--seed", default=0, show_default=True)
def bench_generation_command(
    dataset, split, proxies, samples, size, no_inception, out_dir, device, cache_dir, seed
) -> None:
    """Tables 2-3: each proxy's output against the true product photo (RMSE, SSIM, IS-style score).

    Adds two reference rows: the mean training product (a generator that learned only the average) and
    the real products' own IS-style score. Writes generation.csv/.md and samples.png (person | each
    proxy | true product) to --out.
    """
    from benchmarks.generation_eval import evaluate_generation, evaluation_pairs, format_generation_table, sample_grid
    from benchmarks.report import write_table
    from benchmarks.runner import descriptor_label
    from generation.proxies import create_proxy, list_proxies
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset
    from retrieval.io import write_image_atomic, write_text_atomic

    specs = _expand(proxies, list_proxies(), "proxy")
    started = time.perf_counter()
    data = load_dataset(dataset, split=split, seed=seed, cache_dir=_cache_dir(cache_dir))
    click.echo(data.describe())
    persons, products = evaluation_pairs(data, samples or None, seed)
    labelled = [(descriptor_label(spec), create_proxy(spec)) for spec in specs]
    reference = list(data.train["product_image"]) if data.train is not None and len(data.train) else None
    table, first = evaluate_generation(
        labelled,
        persons,
        products,
        reference_products=reference,
        size=size,
        device=resolve_device(device),
        inception=not no_inception,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "generation")
    markdown = format_generation_table(table, markdown=True)
    write_text_atomic(
        out / "generation.md",
        f"# Generation metrics: {data.name}\n\n{len(persons)} person -> product pairs "
        f"at {size}x{size}; RMSE lower is better, SSIM and the IS-style score higher.\n\n{markdown}\n",
    )
    write_image_atomic(out / "samples.png", sample_grid(first, [label for label, _ in labelled]))
    click.echo(format_generation_table(table))
    click.echo(
        f"\n{time.perf_counter() - started:.0f} s; wrote {out / 'generation.md'}, generation.csv and samples.png"
    )


@cli.command("demo")
@click.option(
    "--products",
    default=120,
    show_default=True,
    type=click.IntRange(min=1),
    help="Size of the generated synthetic set.",
)
@click.option("--descriptors", default="colorhist,sift,rmac,gem", show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Where the synthetic set, indexes and features go.")
def demo_command(products, descriptors, device, cache_dir) -> None:
    """Build the embedded synthetic street-to-shop set, index its catalog, query it, print mAP@k.

    Everything runs offline on this machine in about a minute on a laptop CPU.
    """
    from benchmarks.runner import format_table, run_grid
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset
    from retrieval.descriptors import create_descriptor
    from street2shop.engine import Searcher, build_index

    cache = _cache_dir(cache_dir)
    spec = f"synthetic:{products}"
    data = load_dataset(spec, split="val", cache_dir=cache)
    click.echo(f"1. synthetic street-to-shop set ({spec}): {data.describe()}")
    index_dir = cache / "demo-index"
    torch_device = resolve_device(device)
    from benchmarks.runner import fit_images

    build_index(
        data.catalog,
        create_descriptor("gem").to(torch_device).eval(),
        index_dir,
        fit_paths=fit_images(data, 1000),
        cache_dir=cache / "features",
        faiss_device=device,
    )
    click.echo(f"2. indexed its {len(data.catalog)} catalog products with gem -> {index_dir}")
    sample = data.queries.head(3)
    results = Searcher(index_dir, device=device).search(list(sample["image"]), k=5)
    truth = dict(zip(sample["image"], sample["product_id"].astype(str)))
    results["correct"] = [truth[q] == p for q, p in zip(results["query"], results["product_id"])]
    results["query"] = results["query"].map(lambda p: Path(p).name)
    click.echo("3. three street photos queried (top 5, correct = the product the person wears):")
    click.echo(results.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    click.echo(f"4. mAP@k of every descriptor on all {len(data.queries)} street photos:")
    grid = run_grid(
        data,
        _split_list(descriptors),
        ("none",),
        device=torch_device,
        faiss_device=device,
        cache_dir=cache / "features",
        progress=True,
    )
    click.echo(format_table(grid))


@cli.group("train")
def train_group() -> None:
    """Train the learnable parts: descriptors and proxies. Every run checkpoints and resumes."""


TRAIN_OPTIONS = [
    click.option(
        "--dataset",
        default="viton:../shared/data/viton",
        show_default=True,
        help=DATASET_HELP + " Its training pairs are used.",
    ),
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
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
    click.option("--cache-dir", default=None, help="Default: $STREET2SHOP_CACHE or ~/.cache/street2shop."),
    click.option("--seed", default=0, show_default=True),
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


def _parse_settings(settings, defaults=None) -> dict:
    """('width=0.5', 'use_rf_discriminator=false') -> {'width': 0.5, 'use_rf_discriminator': False}.

    Each value is typed by its option's default in `defaults` (retrieval.registry.parse_settings): a
    value of the wrong type or an unknown option is refused, naming it; without `defaults`, guessed.
    """
    from retrieval.registry import parse_settings

    return parse_settings(settings, defaults, source="--set")


def _train_options(command):
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


def _train(
    kind: str,
    name: str,
    dataset,
    out_dir,
    epochs,
    batch_size,
    lr,
    time_budget,
    device,
    cache_dir,
    seed,
    settings=(),
    **extra,
) -> None:
    """Build the named descriptor or proxy, train it on the dataset's training pairs, say where it went."""
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset

    options = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    options.update({k: v for k, v in extra.items() if v is not None})
    if not getattr(_model_class(kind, name), "trainable", False):  # before any data loads
        raise ValueError(f"{kind} {name!r} has nothing to train")
    # Typed by the model's options and its trainer's: 'false' is False, not a truthy string.
    settings = _parse_settings(settings, _option_defaults(kind, name))
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
    from retrieval.training import seed_everything

    if kind == "descriptor":
        from retrieval.descriptors import create_descriptor

        create = create_descriptor
    else:
        from generation.proxies import create_proxy

        create = create_proxy
    # --set KEY=VALUE: the model's own options build it, the rest are training options.
    model_conf = {k: v for k, v in settings.items() if k in _model_class(kind, name).default_conf}
    options.update({k: v for k, v in settings.items() if k not in model_conf})
    seed_everything(seed)  # before the model is built: --seed also decides the initial weights
    model = create(name, **model_conf).to(resolve_device(device))
    from generation.proxies import proxy_training_options  # --set proxy=hp@RUN: trainers take the object

    options = proxy_training_options(options)
    started = time.perf_counter()
    final = model.train_on(
        data,
        Path(out_dir),
        seed=seed,
        progress=True,
        time_budget_s=None if time_budget is None else 60 * time_budget,
        **options,
    )
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
@click.option(
    "--dataset",
    default="viton:../shared/data/viton",
    show_default=True,
    help=DATASET_HELP + " Its training pairs are exported.",
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Side of the square tensors (PaintNet's image_size).",
)
@click.option(
    "--shape-maps",
    default="cloth_mask",
    show_default=True,
    type=click.Choice(["cloth_mask", "grabcut"]),
    help="Product shape maps: the data set's masks, or GrabCut on the product photo (the paper).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Archive to write (.npz).")
@click.option("--cache-dir", default=None)
def export_pairs_command(dataset, size, shape_maps, seed, out_path, cache_dir) -> None:
    """Write the preprocessed training pairs (person, segmented texture, product, shape map, garment mask)
    as one lossless archive, for training on a machine without the photos (`--set pairs=FILE`).

    VITON's 3,639 training pairs at 64x64 make a ~37 MB archive (lossless WebP/PNG).
    """
    from generation.gan import prepare_pair_tensors, save_pair_archive
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
@click.option(
    "--descriptors",
    default="colorhist,sift,rmac,gem",
    show_default=True,
    help="Descriptors timed for extraction ('' to skip).",
)
@click.option(
    "--proxies",
    default="",
    show_default=True,
    help="Proxy stages timed alone, e.g. 'hp,paintnet@runs/paintnet/final.pt' ('' to skip).",
)
@click.option(
    "--images",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Synthetic images per descriptor for the extraction timing.",
)
@click.option(
    "--sizes",
    default="10000,100000",
    show_default=True,
    callback=lambda ctx, param, value: _counts(value),
    help="Catalog sizes for the index timings, e.g. 10000,100000,1000000.",
)
@click.option("--dim", default=512, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--presets",
    default="flat,ivfpq,hnsw",
    show_default=True,
    help="Index presets timed (flat always runs as the reference).",
)
@click.option("--out", "out_dir", default="results/speed", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None)
def bench_speed_command(descriptors, proxies, images, sizes, dim, presets, out_dir, device, cache_dir) -> None:
    """Extraction images/s per descriptor; index build time, memory, QPS, p50/p99 latency and recall@10.

    Index timings use clustered descriptor-like vectors; each size also gets flat's bound (sgemm for
    batches, memory bandwidth for single queries) and a plain numpy brute force. Approximate presets
    tune their own search parameters for recall@10 >= 0.95 first.
    """
    from benchmarks.speed import extraction_speed, format_extraction_table
    from benchmarks.speed_suite import format_speed_suite, index_speed_suite, write_speed_suite
    from retrieval.batching import resolve_device

    if _split_list(descriptors):
        rows = extraction_speed(
            _split_list(descriptors), n_images=images, device=resolve_device(device), cache_dir=_cache_dir(cache_dir)
        )
        click.echo(format_extraction_table(rows))
        click.echo("")
    if _split_list(proxies):
        from benchmarks.speed import proxy_speed

        proxy_rows = proxy_speed(
            _split_list(proxies),
            n_images=min(images, 32),
            device=resolve_device(device),
            cache_dir=_cache_dir(cache_dir),
        )
        click.echo(
            "proxy stages alone\n"
            + _table_of_rows(proxy_rows).to_string(index=False, float_format=lambda v: f"{v:.1f}")
        )
        click.echo("")
    frame = index_speed_suite(
        sizes=tuple(sizes),
        dim=dim,
        presets=tuple(_split_list(presets)),
        progress=lambda message: click.echo(message, err=True),
    )
    csv_path, md_path = write_speed_suite(frame, out_dir)
    click.echo(format_speed_suite(frame))
    click.echo(f"wrote {csv_path} and {md_path}")


def main() -> None:
    cli(prog_name="street2shop")


if __name__ == "__main__":
    main()
