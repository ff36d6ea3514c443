"""The bench workflows behind `street2shop bench`, `bench-generation` and `bench-speed`, callable from Python.

Each takes a frozen config and writes its report directory; the CLI only parses options into the config:

    >>> from benchmarks.suite import BenchConfig, run_bench_suite                            # doctest: +SKIP
    >>> out = run_bench_suite(BenchConfig(dataset="synthetic:12", descriptors=("colorhist", "gem"),
    ...                                   out_dir="results/check"))                          # doctest: +SKIP
    >>> (out / "report.md").exists()                                                         # doctest: +SKIP
    True

`run_bench_suite` trains what has no checkpoint (`benchmarks.reproduce.ensure_trained`, with `train`),
runs the grid (`benchmarks.runner.run_benchmark`), scores the generators (`benchmarks.generation_eval`)
and writes every table and plot (`benchmarks.report`). Specs are spelled as on the command line
(`retrieval.specs`): names, globs, NAME@path/final.pt, NAME[KEY=VALUE;...].

Output: `echo` gets the lines a reader wants (the data set, the tables, where the files went), `progress`
the chatter of a long run (what is trained, the grid's size) and the progress bars: True prints it to
stderr, a callable gets the lines (bars still shown), False keeps quiet.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from benchmarks.reproduce import grid_specs, names_a_training
from index.bank_norm import DEFAULT_BANK_BETA, DEFAULT_BANK_SIZE

Progress = Union[bool, Callable[[str], None]]
Echo = Callable[[str], None]
PathLike = Union[str, Path]


@dataclass(frozen=True)
class BenchConfig:
    """Everything `street2shop bench` takes (its options, same names and defaults).

    descriptors/proxies/presets: names or globs ('*'), each optionally NAME@run/final.pt or (with `train`)
    NAME[KEY=VALUE;...]; a comma-separated text is split as the CLI splits it. cache_dir None: the
    default cache ($STREET2SHOP_CACHE or ~/.cache/street2shop). command: what config.json records as the
    command (the CLI passes its own command line).
    """

    dataset: str = "synthetic"
    split: str = "val"
    descriptors: Union[str, Sequence[str]] = ("colorhist", "sift", "rmac", "gem")
    proxies: Union[str, Sequence[str]] = ("none",)
    presets: Union[str, Sequence[str]] = ("flat",)
    ks: Sequence[int] = (1, 5, 10, 20)
    out_dir: PathLike = "results"
    device: str = "auto"
    batch_size: int = 32
    workers: Optional[int] = None  # processes decoding photos (None: min(4, CPUs); 0: in process)
    fit_max_images: int = 1000
    cache_dir: Optional[PathLike] = None
    cache_features: bool = True  # False: recompute every feature (--no-cache)
    seed: int = 0
    rerank: int = 0
    rerank_model: str = "similarity"
    limit: int = 0
    distractors: int = 0
    protocol_draws: int = 10
    protocol_gallery: int = 250
    bootstrap: int = 1000
    generation_samples: int = 200
    rank_pictures: int = 6
    train: bool = False
    train_budget: float = 10.0
    command: Optional[str] = None
    fit_data: Optional[str] = None  # data set spec whose training images fit codebooks/whitening (None: dataset)
    combinations: Optional[Sequence[Tuple[str, str]]] = None  # (proxy, descriptor) pairs only, e.g. recipes
    query_bank: Sequence[str] = ()  # data set specs whose training-split query photos form the bank (+qb rows)
    query_bank_size: int = DEFAULT_BANK_SIZE  # photos drawn from each (0: all)
    bank_beta: float = DEFAULT_BANK_BETA
    allow_train_overlap: bool = False  # score checkpoints on products they trained on (else refused)


def check_ks(ks: Sequence[int]) -> List[int]:
    """The cut-offs sorted without repeats; each must be a whole number >= 1."""
    k_list = sorted({int(k) for k in ks})
    if not k_list or k_list[0] < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    return k_list


def resolve_cache_dir(cache_dir: Optional[PathLike]) -> Path:
    """`cache_dir`, or the default cache ($STREET2SHOP_CACHE or ~/.cache/street2shop)."""
    from retrieval.datasets import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def _reporter(progress: Progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda message: print(message, file=sys.stderr, flush=True)
    return lambda message: None


def run_bench_suite(config: BenchConfig, *, echo: Echo = print, progress: Progress = True) -> Path:
    """Score the proxy x descriptor x index grid of `config` and write its report; return the report directory.

    Writes to `config.out_dir`: report.md, results.csv/.parquet, per_query.csv/.parquet, protocol_draws.csv,
    generation.csv, trainings.csv, map_curves.png, heatmap.png, rank/index.html and config.json (each only
    when this run has it; an earlier run's files go once the grid is done, foreign files stay).

    Raises:
        ValueError: a spec that matches nothing or has options of the wrong type, options in brackets of a
            trainable model without `train`, cut-offs below 1.
        OSError: an `out_dir` that cannot be made.
    """
    from benchmarks.report import git_revision
    from benchmarks.reproduce import ensure_trained
    from benchmarks.runner import describe_fit_images, format_table, remove_previous_bench_outputs, run_benchmark
    from index import list_index_presets
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset, query_bank_photos, subset_products
    from retrieval.specs import expand_specs

    say = _reporter(progress)
    k_list = check_ks(config.ks)
    descriptor_specs = grid_specs(config.descriptors, "descriptor", "descriptors")
    proxy_specs = grid_specs(config.proxies, "proxy", "proxies")
    # typed like the grid's specs (a fusion's branches come back quoted), or no combination would match a grid cell
    combinations = None
    if config.combinations is not None:
        combinations = [
            (grid_specs((p,), "proxy", "proxies")[0], grid_specs((d,), "descriptor", "descriptors")[0])
            for p, d in config.combinations
        ]
    preset_names = expand_specs(config.presets, list_index_presets(), "index preset")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    revision = git_revision()  # now: the code this process runs, even if the checkout moves on meanwhile
    trainings = []
    cache = resolve_cache_dir(config.cache_dir)
    torch_device = resolve_device(config.device)
    data = subset_products(
        load_dataset(config.dataset, split=config.split, seed=config.seed, cache_dir=cache), config.limit, config.seed
    )
    echo(data.describe())
    fit_set = None
    if config.fit_data is not None:
        fit_set = load_dataset(config.fit_data, split="val", seed=config.seed, cache_dir=cache)
    echo(f"descriptors that need fitting are fitted on {describe_fit_images(fit_set or data, config.fit_max_images)}")
    # 'NAME[k=v]' of a trainable model asks for a training; 'NAME[k=v]@final.pt' is a trained model built with
    # those options, and an untrainable 'gem[backbone=lite2]' is built with them, no training needed.
    with_options = [
        spec
        for kind, specs in (("proxy", proxy_specs), ("descriptor", descriptor_specs))
        for spec in specs
        if "[" in spec and names_a_training(kind, spec)
    ]
    if with_options and not config.train:
        raise ValueError(
            f"{', '.join(with_options)}: options in brackets name a model to train; add --train, "
            "or train it with `street2shop train ... --set KEY=VALUE` and pass NAME@final.pt"
        )
    if config.train:
        budget, seed = config.train_budget, config.seed
        proxy_specs, proxy_rows = ensure_trained(
            proxy_specs, "proxy", data, cache, budget, torch_device, seed, progress=progress
        )
        descriptor_specs, descriptor_rows = ensure_trained(
            descriptor_specs, "descriptor", data, cache, budget, torch_device, seed, progress=progress
        )
        # A proxy a descriptor trains behind (`tn[proxy=hp]`) is also a row of the descriptors' call: once here.
        trainings = list({str(row["checkpoint"]): row for row in proxy_rows + descriptor_rows}.values())
    bank = [
        photo
        for spec in config.query_bank
        for photo in query_bank_photos(spec, config.query_bank_size, config.seed, cache)
    ]
    if bank:
        sources = ", ".join(config.query_bank)
        say(f"query bank: {len(bank)} training-split photos of {sources}, beta {config.bank_beta:g} (rows NAME+qb)")
    if combinations is not None:
        say(f"grid: {len(combinations)} proxy + descriptor pairs x {len(preset_names)} indexes")
    else:
        say(f"grid: {len(proxy_specs)} proxies x {len(descriptor_specs)} descriptors x {len(preset_names)} indexes")
    result = run_benchmark(
        data,
        descriptor_specs,
        proxy_specs,
        presets=preset_names,
        ks=k_list,
        device=torch_device,
        faiss_device=config.device,
        batch_size=config.batch_size,
        workers=config.workers,
        fit_max_images=config.fit_max_images,
        cache_dir=cache / "features" if config.cache_features else None,
        seed=config.seed,
        progress=bool(progress),
        rerank=config.rerank or None,
        rerank_conf={"model": config.rerank_model},
        distractors=config.distractors,
        protocol_gallery=config.protocol_gallery,
        protocol_draws=config.protocol_draws,
        bootstrap=config.bootstrap,
        fit_dataset=fit_set,
        combinations=combinations,
        query_bank=bank,
        bank_beta=config.bank_beta,
        allow_train_overlap=config.allow_train_overlap,
    )
    generation, generation_md = _generation_scores(
        data, proxy_specs, config.generation_samples, torch_device, config.seed
    )
    # The grid is done: an earlier run's files in out_dir go now (not at the start, so that a run that
    # fails keeps them), and the report lists only what this run writes.
    remove_previous_bench_outputs(out)
    files = ["results.csv", "per_query.csv"]
    if config.rank_pictures > 0:
        _write_rank_pictures(data, result.per_query, proxy_specs, config.rank_pictures, config.seed, torch_device, out)
        files.append("rank/index.html")
    wall = time.perf_counter() - started
    resolved = {"descriptors": descriptor_specs, "proxies": proxy_specs, "indexes": preset_names, "ks": k_list}
    record = _config_record(config, data, resolved, torch_device, trainings, wall, revision)
    files = _write_report(out, config.split, data, result, k_list, generation, generation_md, trainings, record, files)
    echo(format_table(result.summary, k_list))
    if trainings:
        echo(
            "trainings: "
            + "; ".join(f"{t['name']} {'trained' if t['trained'] else 'cached'} {t['wall_s']:.0f} s" for t in trainings)
        )
    echo(f"\n{wall:.1f} s; wrote {out / 'report.md'} (and {', '.join(files)})")
    return out


def _config_record(config: BenchConfig, data, resolved, torch_device, trainings, wall: float, revision) -> dict:
    """What config.json says about the run: its options, resolved specs, trainings, wall time, versions, git."""
    from benchmarks.report import package_versions

    return {
        "command": config.command or "python: benchmarks.suite.run_bench_suite",
        "dataset": config.dataset,
        "split": config.split,
        "described": data.describe(),
        **resolved,  # descriptors, proxies, indexes, ks: what ran, checkpoints of --train included
        "device": str(torch_device),
        "batch_size": config.batch_size,
        "fit_max_images": config.fit_max_images,
        "fit_data": config.fit_data or config.dataset,
        "combinations": [list(c) for c in config.combinations] if config.combinations is not None else None,
        "seed": config.seed,
        "limit": config.limit,
        "rerank": config.rerank,
        "rerank_model": config.rerank_model,
        "query_bank": list(config.query_bank),
        "query_bank_size": config.query_bank_size,
        "bank_beta": config.bank_beta,
        "distractors": config.distractors,
        "protocol_draws": config.protocol_draws,
        "protocol_gallery": config.protocol_gallery,
        "bootstrap": config.bootstrap,
        "generation_samples": config.generation_samples,
        "trainings": trainings,
        "wall_s": round(wall, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": package_versions(),
        "git": revision,
    }


def _write_rank_pictures(data, per_query, proxy_specs, count: int, seed: int, device, out: Path) -> None:
    """rank/index.html: `count` seeded queries, each as query | proxy output | top 5, for every combination."""
    from benchmarks.rank_pictures import write_bench_rank_pictures
    from benchmarks.runner import proxy_previews
    from retrieval.batching import sample_paths

    queries = data.queries.drop_duplicates("query_id")
    chosen = sample_paths(list(queries["query_id"]), count, seed)
    paths = dict(zip(queries["query_id"], queries["image"]))
    previews, crop_boxes = proxy_previews(proxy_specs, [paths[q] for q in chosen], chosen, device=device)
    first = data.catalog.drop_duplicates("product_id")  # a product with several images shows its first
    catalog = dict(zip(first["product_id"].astype(str), first["image"]))
    if data.train is not None:  # distractors shown in a top 5 come from the training products
        catalog.update(
            {f"distractor:{p}": i for p, i in zip(data.train["product_id"].astype(str), data.train["product_image"])}
        )
    write_bench_rank_pictures(
        per_query, paths, catalog, previews, chosen, out / "rank", f"street2shop bench: {data.name}", crop_boxes
    )


def _write_report(out: Path, split, data, result, k_list, generation, generation_md, trainings, record, files):
    """The tables, plots, config.json and report.md; returns the names of the files written, in report order."""
    from benchmarks.report import (
        bench_markdown,
        map_curves_frame,
        plot_heatmap,
        plot_map_curves,
        table_of_rows,
        write_table,
    )
    from retrieval.files import write_text_atomic

    files = list(files)
    write_table(result.summary, out / "results")
    write_table(result.per_query, out / "per_query")
    if not result.draws.empty:  # --protocol-draws 0 writes no draws: the report must not list the file
        write_table(result.draws, out / "protocol_draws")
        files.append("protocol_draws.csv")
    if generation is not None:
        write_table(generation, out / "generation")
        files.append("generation.csv")
    if trainings:
        write_table(table_of_rows(trainings), out / "trainings")
        files.append("trainings.csv")
    plot_map_curves(map_curves_frame(result.summary, k_list), out / "map_curves.png")
    plot_heatmap(result.summary, out / "heatmap.png", metric=f"mAP@{max(k_list)}")
    write_text_atomic(out / "config.json", json.dumps(record, indent=2, default=str))
    files += ["map_curves.png", "heatmap.png", "config.json"]
    write_text_atomic(
        out / "report.md",
        bench_markdown(
            result,
            k_list,
            title=f"street2shop bench: {data.name}, split {split}",
            description=data.describe(),
            config=record,
            generation=generation,
            generation_markdown=generation_md,
            files=files,
        ),
    )
    return files


def _generation_scores(data, proxy_specs, samples, device, seed):
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


# ---- bench-generation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationBenchConfig:
    """Everything `street2shop bench-generation` takes. samples 0: every pair of the split."""

    proxies: Union[str, Sequence[str]]
    dataset: str = "viton:../shared/data/viton"
    split: str = "val"
    samples: int = 500
    size: int = 64
    inception: bool = True
    out_dir: PathLike = "results/generation"
    device: str = "auto"
    cache_dir: Optional[PathLike] = None
    seed: int = 0


def run_generation_bench(config: GenerationBenchConfig, *, echo: Echo = print) -> Path:
    """Tables 2-3: each proxy's output against the true product photo (RMSE, SSIM, IS-style score).

    Writes generation.csv/.parquet, generation.md and samples.png (person | each proxy | true product) to
    `config.out_dir`; returns it.
    """
    from benchmarks.generation_eval import evaluate_generation, evaluation_pairs, format_generation_table, sample_grid
    from benchmarks.report import write_table
    from benchmarks.runner import descriptor_label
    from generation.proxies import create_proxy, list_proxies
    from retrieval.batching import resolve_device
    from retrieval.datasets import load_dataset
    from retrieval.files import write_image_atomic, write_text_atomic
    from retrieval.specs import expand_specs

    specs = expand_specs(config.proxies, list_proxies(), "proxy")
    started = time.perf_counter()
    data = load_dataset(
        config.dataset, split=config.split, seed=config.seed, cache_dir=resolve_cache_dir(config.cache_dir)
    )
    echo(data.describe())
    persons, products = evaluation_pairs(data, config.samples or None, config.seed)
    labelled = [(descriptor_label(spec), create_proxy(spec)) for spec in specs]
    reference = list(data.train["product_image"]) if data.train is not None and len(data.train) else None
    table, first = evaluate_generation(
        labelled,
        persons,
        products,
        reference_products=reference,
        size=config.size,
        device=resolve_device(config.device),
        inception=config.inception,
    )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "generation")
    markdown = format_generation_table(table, markdown=True)
    write_text_atomic(
        out / "generation.md",
        f"# Generation metrics: {data.name}\n\n{len(persons)} person -> product pairs "
        f"at {config.size}x{config.size}; RMSE lower is better, SSIM and the IS-style score higher.\n\n{markdown}\n",
    )
    write_image_atomic(out / "samples.png", sample_grid(first, [label for label, _ in labelled]))
    echo(format_generation_table(table))
    echo(f"\n{time.perf_counter() - started:.0f} s; wrote {out / 'generation.md'}, generation.csv and samples.png")
    return out


# ---- bench-speed --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedBenchConfig:
    """Everything `street2shop bench-speed` takes. Empty descriptors/proxies: that timing is skipped."""

    descriptors: Sequence[str] = ("colorhist", "sift", "rmac", "gem")
    proxies: Sequence[str] = ()
    images: int = 64
    sizes: Sequence[int] = (10000, 100000)
    dim: int = 512
    presets: Sequence[str] = ("flat", "ivfpq", "hnsw")
    out_dir: PathLike = "results/speed"
    device: str = "auto"
    cache_dir: Optional[PathLike] = None


def run_speed_bench(config: SpeedBenchConfig, *, echo: Echo = print, progress: Progress = True) -> Tuple[Path, Path]:
    """Extraction images/s per descriptor (and proxy); index build time, memory, QPS, latency and recall@10.

    Writes the index suite's CSV and markdown to `config.out_dir`; returns their paths.
    """
    from benchmarks.report import table_of_rows
    from benchmarks.speed import extraction_speed, format_extraction_table, proxy_speed
    from benchmarks.speed_suite import format_speed_suite, index_speed_suite, write_speed_suite
    from retrieval.batching import resolve_device

    if config.descriptors:
        rows = extraction_speed(
            list(config.descriptors),
            n_images=config.images,
            device=resolve_device(config.device),
            cache_dir=resolve_cache_dir(config.cache_dir),
        )
        echo(format_extraction_table(rows))
        echo("")
    if config.proxies:
        proxy_rows = proxy_speed(
            list(config.proxies),
            n_images=min(config.images, 32),
            device=resolve_device(config.device),
            cache_dir=resolve_cache_dir(config.cache_dir),
        )
        echo(
            "proxy stages alone\n" + table_of_rows(proxy_rows).to_string(index=False, float_format=lambda v: f"{v:.1f}")
        )
        echo("")
    frame = index_speed_suite(
        sizes=tuple(config.sizes), dim=config.dim, presets=tuple(config.presets), progress=_reporter(progress)
    )
    csv_path, md_path = write_speed_suite(frame, config.out_dir)
    echo(format_speed_suite(frame))
    echo(f"wrote {csv_path} and {md_path}")
    return csv_path, md_path
