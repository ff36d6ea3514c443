"""Reproduce a benchmark grid from scratch: train every model it needs, cache the checkpoints by config.

Checkpoints never go into git, so a new machine has none. `ensure_trained` turns the grid's specs into
specs with trained weights: a bare trainable name ("paintnet", "tn") is trained on the dataset's training
pairs, under a time budget, into a run directory keyed by everything that decides the result; a later
call with the same config finds final.pt there and reuses it.

    <cache_root>/checkpoints/<NAME>-<key>/   the `train_on` run directory: last.pt (an interrupted run
                                             resumes from it), final.pt (present = done), losses.csv, ...
                                             plus reproduce.json: what the key hashes, the wall time.

Specs:
    "gem", "none"                     not trainable: passed through unchanged.
    "gem[backbone=lite2]"             not trainable, built with those options: passed through unchanged.
    "tn@runs/tn/final.pt"             already trained: passed through unchanged.
    "paintnet"                        trained (or reused) -> "paintnet@<cache>/checkpoints/paintnet-<key>/final.pt"
    "paintnet[use_perceptual=False]"  an ablation: the options in brackets (`;`-separated KEY=VALUE, read
                                      by `retrieval.specs.parse_spec`) go to the model, and the key differs.

Options whose key is in the model's `default_conf` build the model (`create_proxy(name, **conf)`); the
others go to its `train_on` (epochs, max_pairs, lr, ...): `model_options` splits them, as for
`street2shop train --set`. `grid_specs` turns what a user wrote (globs, text values) into such specs.

A descriptor trained behind a proxy names it in its `proxy` option: `tn[proxy=hp]` trains (or reuses) hp
first, with the settings of a bare "hp" of the proxy grid (one training serves both), and trains tn behind
that parser; `tn[proxy=hp@runs/parser/final.pt]` uses the given one.

Dependencies: a proxy with a `parser` option (PaintNet and its ablations) segments the garment with the
hp proxy's trained parser. When such a proxy is trained and no parser is given, hp is trained (or
reused) first and its final.pt becomes the `parser` option; an "hp@path" spec in the same list is used
instead. `parser=None` in a spec's options asks for GrabCut, without a parser.

Example:
    >>> data = load_dataset("viton:../shared/data/viton", split="val")                      # doctest: +SKIP
    >>> proxies, rows = ensure_trained(["none", "paintnet"], "proxy", data, cache, budget_minutes=30)  # doctest: +SKIP
    >>> proxies                                                                              # doctest: +SKIP
    ['none', 'paintnet@/home/me/.cache/street2shop/checkpoints/paintnet-3f2a9c0d1e4b/final.pt']
    >>> print(format_trainings(rows))                                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from generation.proxies import proxy_training_options
from retrieval.files import write_text_atomic
from retrieval.specs import expand_specs, parse_spec, typed_specs

log = logging.getLogger("street2shop.reproduce")

KINDS = ("descriptor", "proxy")
PARSER_PROXY = "hp"  # the proxy whose final.pt is the `parser` option of the others
PARSER_OPTION = "parser"
PROXY_OPTION = "proxy"  # the training option naming the proxy a descriptor trains behind (`tn[proxy=hp]`)
KEY_LENGTH = 12  # hex digits of the sha1: plenty for a handful of configs per model
META_FILE = "reproduce.json"
RESERVED_OPTIONS = frozenset({"seed", "progress", "time_budget_s"})  # train_on arguments ensure_trained sets

Progress = Union[bool, Callable[[str], None]]


def model_class(kind: str, name: str):
    """The registered descriptor or proxy class of that name (unknown names: ValueError listing the valid ones)."""
    if kind == "proxy":
        from generation.proxies import PROXIES, list_proxies

        list_proxies()  # registers the built-in proxies
        return PROXIES.get(name)
    if kind != "descriptor":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from retrieval.descriptors import DESCRIPTORS, list_descriptors

    list_descriptors()  # registers the built-in descriptors
    return DESCRIPTORS.get(name)


def names_a_training(kind: str, spec: str) -> bool:
    """Whether `spec` names a model to train: a trainable model without a checkpoint ("tn", "tn[dim=256]").

    Untrainable models ("gem[backbone=lite2]") and trained ones ("tn[dim=256]@final.pt") are built as given, and so
    is a model whose training only chooses options that the spec gives (`fused[branches=...;weights=(1, 1)]`).

    Example:
        >>> [names_a_training("descriptor", s) for s in ("tn[dim=256]", "gem[backbone=lite2]", "tn@a.pt")]
        [True, False, False]
    """
    parsed = parse_spec(spec)
    cls = model_class(kind, parsed.name)
    # a model whose training only sets options (a fusion's weights) is complete when they are given
    given = any(parsed.options.get(key) is not None for key in getattr(cls, "options_a_training_sets", ()))
    return parsed.checkpoint is None and bool(getattr(cls, "trainable", False)) and not given


def registered_names(kind: str) -> List[str]:
    """The registered descriptors or proxies, what a spec's NAME or glob is matched against."""
    if kind == "proxy":
        from generation.proxies import list_proxies

        return list_proxies()
    from retrieval.descriptors import list_descriptors

    return list_descriptors()


def option_defaults(kind: str, name: str) -> Dict[str, Any]:
    """Every option a model of that name takes, with its default: its training options, then its config."""
    from retrieval.training import training_defaults

    cls = model_class(kind, name)
    defaults = training_defaults(cls) if getattr(cls, "trainable", False) else {}
    return {**defaults, **getattr(cls, "default_conf", {})}


def grid_specs(patterns: Union[str, Sequence[str]], kind: str, source: str) -> List[str]:
    """Names, globs, NAME@checkpoint and NAME[KEY=VALUE;...] of one kind -> the grid's specs: globs expanded
    (`retrieval.specs.expand_specs`), bracketed options typed by the model's defaults (`typed_specs`).

    Raises:
        ValueError: a glob or name that matches nothing, an option of the wrong type or unknown; messages
            start with `source` (e.g. '--proxies').
    """
    expanded = expand_specs(patterns, registered_names(kind), kind)
    return typed_specs(expanded, lambda name: option_defaults(kind, name), source)


def model_options(kind: str, name: str, options: Mapping[str, Any], source: str = "--set") -> Tuple[Dict, Dict]:
    """Options of one model -> (its config, its training options), through `retrieval.training.split_options`.

    Keys of the model's `default_conf` build it, keys of its trainer's config train it; others are refused.
    """
    from retrieval.training import split_options

    return split_options(name, getattr(model_class(kind, name), "default_conf", {}), options, source)


def train_named(
    kind: str,
    name: str,
    dataset,
    out_dir: os.PathLike,
    settings: Mapping[str, Any],
    options: Optional[Mapping[str, Any]] = None,
    *,
    device: Union[str, torch.device] = "auto",
    seed: int = 0,
    progress: bool = True,
    time_budget_s: Optional[float] = None,
):
    """Build descriptor or proxy NAME and train it into `out_dir` (what `street2shop train` does); its final.pt.

    `settings` (`--set`, typed by `option_defaults`) are split by `model_options`: the model's config
    builds it, the rest join `options` (epochs, lr, ...) as training options and override them. Everything
    is seeded with `seed` before the model is built, so it also decides the initial weights. `dataset` is
    a RetrievalSet with training pairs, or None where a pair archive (`pairs=`) stands in.
    """
    from retrieval.batching import resolve_device
    from retrieval.training import seed_everything

    model_conf, training = model_options(kind, name, settings)
    seed_everything(seed)
    model = _create_model(kind, name, model_conf).to(resolve_device(device) if isinstance(device, str) else device)
    return model.train_on(
        dataset,
        Path(out_dir),
        seed=seed,
        progress=progress,
        time_budget_s=time_budget_s,
        **proxy_training_options({**(options or {}), **training}, model),  # proxy=hp@RUN: trainers take the object
    )


def ensure_trained(
    specs: Sequence[str],
    kind: str,
    dataset,
    cache_root: os.PathLike,
    budget_minutes: Optional[float] = None,
    device: Union[str, torch.device] = "auto",
    seed: int = 0,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: Progress = True,
) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Train (or reuse from the cache) every trainable model of `specs`; return specs with checkpoints.

    Args:
        specs: grid specs of one kind (see the module docstring for the spellings).
        kind: "descriptor" or "proxy".
        dataset: a RetrievalSet; its training pairs (`dataset.train`) are what the models train on.
        cache_root: checkpoints go under `<cache_root>/checkpoints/`.
        budget_minutes: time budget of each training (None: the model's own default).
        device: "auto", "cpu", "cuda" or a torch.device to train on; a reused checkpoint loads anywhere.
        seed: the training seed (part of the key).
        options: model name -> options for every spec of that name (e.g. {"paintnet": {"max_pairs": 500}});
            a spec's bracketed options override them.
        progress: True prints what is trained or reused (stderr) and shows the trainers' progress bars; a
            callable gets those lines instead (e.g. click.echo); False keeps quiet (the log still has them).

    Returns:
        (resolved, rows): `resolved` is `specs` in order, each trainable bare spec replaced by
        "NAME@<cache_root>/checkpoints/<NAME>-<key>/final.pt"; `rows` has one dict per distinct training,
        dependencies (the parser) first: kind, name, spec, options, key, checkpoint, trained (False when
        reused from the cache), wall_s (seconds of the call that finished the training, read back from
        reproduce.json when reused; None when unrecorded) and train_pairs.

    Raises:
        ValueError: an unknown kind or name, or a dataset without training pairs when something must be trained.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    say = _reporter(progress)
    planner = _Planner(
        kind,
        dataset,
        Path(cache_root) / "checkpoints",
        budget_minutes,
        device,
        seed,
        {name: dict(conf) for name, conf in (options or {}).items()},
        progress,
        say,
    )
    # Untrainable specs go to the grid unchanged, their options with them ("gem[backbone=lite2]").
    parsed = [(p.name, p.checkpoint, dict(p.options)) for p in map(parse_spec, specs)]

    # Dependency first, explicitly: a proxy that takes a parser gets hp's final.pt as its `parser`.
    parser_checkpoint = None
    if kind == "proxy" and any(
        checkpoint is None
        and planner.is_trainable(name)
        and planner.takes_parser(name)
        and PARSER_OPTION not in planner.merged_options(name, spec_options)
        for name, checkpoint, spec_options in parsed
    ):
        parser_checkpoint = planner.parser_checkpoint(parsed)

    resolved = []
    for spec, (name, checkpoint, spec_options) in zip(specs, parsed):
        if checkpoint is not None or not planner.is_trainable(name):
            resolved.append(spec)
            continue
        merged = planner.merged_options(name, spec_options)
        if kind == "descriptor":
            merged = planner.with_trained_proxy(merged)
        if parser_checkpoint is not None and planner.takes_parser(name) and PARSER_OPTION not in merged:
            merged[PARSER_OPTION] = str(parser_checkpoint)
        row = planner.ensure(name, merged, spec)
        resolved.append(f"{name}@{row['checkpoint']}")
    return resolved, planner.rows


def checkpoint_key(ingredients: Mapping[str, Any]) -> str:
    """sha1 (KEY_LENGTH hex digits) of the JSON of everything that decides a training's result."""
    text = json.dumps(ingredients, sort_keys=True, default=_jsonable)
    return hashlib.sha1(text.encode()).hexdigest()[:KEY_LENGTH]


def format_trainings(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per training of `ensure_trained`: kind, name, trained or reused, wall time, pairs, checkpoint."""
    if not rows:
        return "nothing to train"
    lines = []
    for row in rows:
        wall = "?" if row["wall_s"] is None else f"{row['wall_s']:.0f} s"
        state = "trained" if row["trained"] else "reused"
        lines.append(
            f"{row['kind']:<10} {row['spec']:<32} {state:<7} {wall:>8}  {row['train_pairs']:>6} pairs  "
            f"{row['checkpoint']}"
        )
    return "\n".join(lines)


class _Planner:
    """State of one `ensure_trained` call: the registry of its kind, the settings, the trainings done."""

    def __init__(self, kind, dataset, checkpoints: Path, budget_minutes, device, seed, options, progress, say):
        self.kind, self.dataset, self.checkpoints = kind, dataset, checkpoints
        self.budget_minutes, self.device, self.seed = budget_minutes, device, seed
        self.options, self.progress, self.say = options, progress, say
        self.rows: List[Dict[str, Any]] = []
        self._done: Dict[str, Dict[str, Any]] = {}  # key -> row: a model asked for twice trains once

    # ---- the registry ------------------------------------------------------------------------
    def model_class(self, name: str, kind: Optional[str] = None):
        return model_class(kind or self.kind, name)

    def is_trainable(self, name: str, kind: Optional[str] = None) -> bool:
        return bool(getattr(self.model_class(name, kind), "trainable", False))

    def takes_parser(self, name: str) -> bool:
        return PARSER_OPTION in getattr(self.model_class(name, "proxy"), "default_conf", {})

    def merged_options(self, name: str, spec_options: Mapping[str, Any]) -> Dict[str, Any]:
        return {**self.options.get(name, {}), **spec_options}

    # ---- the parser dependency ----------------------------------------------------------------
    def parser_checkpoint(self, parsed) -> Path:
        """hp's final.pt for the proxies that take a parser: an 'hp@path' of the specs, else trained here."""
        given = [checkpoint for name, checkpoint, _ in parsed if name == PARSER_PROXY and checkpoint]
        if given:
            self.say(f"parser: using {given[0]} (the {PARSER_PROXY}@... of the specs)")
            return Path(given[0])
        if not self.is_trainable(PARSER_PROXY, "proxy"):
            raise ValueError(f"proxy {PARSER_PROXY!r} is not trainable: no parser to give the proxies that need one")
        self.say(f"parser: the {PARSER_OPTION!r} option of the proxies needs {PARSER_PROXY}, trained (or reused) first")
        # Same options as a bare "hp" of the specs, so that one training serves both.
        row = self.ensure(PARSER_PROXY, dict(self.options.get(PARSER_PROXY, {})), PARSER_PROXY, kind="proxy")
        return Path(row["checkpoint"])

    # ---- the proxy a descriptor trains behind ---------------------------------------------------
    def with_trained_proxy(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """`options` with a bare trainable proxy name in its `proxy` (`tn[proxy=hp]`) replaced by that proxy's
        final.pt, trained (or reused) first: a descriptor trains behind the proxy it will serve with, and the
        key is the one of the grid's own bare proxy, so one training serves both."""
        proxy = options.get(PROXY_OPTION)
        if not isinstance(proxy, str) or any(mark in proxy for mark in "@[") or proxy == "none":
            return dict(options)
        if not self.is_trainable(proxy, "proxy"):
            return dict(options)
        self.say(f"{PROXY_OPTION}={proxy}: trained (or reused) first, so that the descriptor trains behind it")
        row = self.ensure(proxy, dict(self.options.get(proxy, {})), proxy, kind="proxy")
        return {**options, PROXY_OPTION: f"{proxy}@{row['checkpoint']}"}

    # ---- one training ------------------------------------------------------------------------
    def ensure(self, name: str, options: Mapping[str, Any], spec: str, kind: Optional[str] = None) -> Dict[str, Any]:
        """Reuse `<checkpoints>/<name>-<key>/final.pt` or train it there; return its row."""
        kind = kind or self.kind
        reserved = RESERVED_OPTIONS & set(options)
        if reserved:
            raise ValueError(
                f"{sorted(reserved)} of {spec!r} are set by ensure_trained (seed=, progress=, "
                "budget_minutes=), not per model"
            )
        conf, train_options = model_options(kind, name, options, source=spec)
        model = _build_model(kind, name, conf, self.seed)
        ingredients = {
            "kind": kind,
            "name": name,
            "conf": conf,
            "train_options": train_options,
            "dataset": _dataset_identity(self.dataset),
            "seed": self.seed,
            "budget_minutes": self.budget_minutes,
            # name, full config and initial weights (pretrained backbones, a loaded parser): a changed
            # default or architecture retrains instead of reusing a checkpoint that no longer fits.
            "fingerprint": model.fingerprint() if hasattr(model, "fingerprint") else None,
        }
        key = checkpoint_key(ingredients)
        if key in self._done:
            return self._done[key]
        run_dir = self.checkpoints / f"{name}-{key}"
        final = run_dir / "final.pt"
        train_pairs = _train_pairs(self.dataset, train_options)
        if final.exists():
            meta = _read_meta(run_dir)
            self.say(f"{kind} {spec}: reusing the cached checkpoint {final} (key {key}; delete the folder to retrain)")
            row = self._row(
                kind, name, spec, options, key, final, False, meta.get("wall_s"), meta.get("train_pairs", train_pairs)
            )
        else:
            row = self._train(model, kind, name, spec, options, key, ingredients, train_options, run_dir, train_pairs)
        self._done[key] = row
        self.rows.append(row)
        return row

    def _train(
        self, model, kind, name, spec, options, key, ingredients, train_options, run_dir: Path, train_pairs: int
    ) -> Dict[str, Any]:
        from retrieval.batching import resolve_device

        if self.dataset.train is None or len(self.dataset.train) == 0:
            raise ValueError(f"{self.dataset.name} has no training pairs to train {kind} {name} on")
        resumed = (run_dir / "last.pt").exists()
        budget = "its default budget" if self.budget_minutes is None else f"a budget of {self.budget_minutes:g} min"
        self.say(
            f"{kind} {spec}: {'resuming' if resumed else 'training'} on {train_pairs} pairs with {budget} -> {run_dir}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_meta(run_dir, {"key": key, "ingredients": ingredients, "finished": False})
        device = resolve_device(self.device) if isinstance(self.device, str) else self.device
        started = time.perf_counter()
        final = model.to(device).train_on(
            self.dataset,
            run_dir,
            seed=self.seed,
            progress=bool(self.progress),
            time_budget_s=None if self.budget_minutes is None else 60.0 * self.budget_minutes,
            **proxy_training_options(train_options, model),
        )
        wall_s = time.perf_counter() - started
        # Done means final.pt in the keyed folder: that is what the next call looks for.
        expected = run_dir / "final.pt"
        if not expected.exists() or Path(final).resolve() != expected.resolve():
            raise RuntimeError(f"{kind} {name}.train_on returned {final}, but {expected} is what it should write")
        _write_meta(
            run_dir,
            {
                "key": key,
                "ingredients": ingredients,
                "finished": True,
                "wall_s": wall_s,
                "train_pairs": train_pairs,
                "device": str(device),
            },
        )
        self.say(f"{kind} {spec}: trained in {wall_s:.0f} s -> {expected}")
        return self._row(kind, name, spec, options, key, expected, True, wall_s, train_pairs)

    @staticmethod
    def _row(kind, name, spec, options, key, checkpoint, trained, wall_s, train_pairs) -> Dict[str, Any]:
        return {
            "kind": kind,
            "name": name,
            "spec": spec,
            "options": dict(options),
            "key": key,
            "checkpoint": str(checkpoint),
            "trained": trained,
            "wall_s": wall_s,
            "train_pairs": train_pairs,
        }


def _build_model(kind: str, name: str, conf: Mapping[str, Any], seed: int):
    """The untrained model, initialised under `seed` so that its fingerprint (part of the key) is stable."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's generator alone
        torch.manual_seed(seed)
        return _create_model(kind, name, conf)


def _create_model(kind: str, name: str, conf: Mapping[str, Any]):
    if kind == "proxy":
        from generation.proxies import create_proxy

        return create_proxy(name, **conf)
    from retrieval.descriptors import create_descriptor

    return create_descriptor(name, **conf)


def _dataset_identity(dataset) -> Dict[str, Any]:
    """The dataset's name without its evaluation split, and a digest of its training pairs.

    The split ("[val]", "[test]") chooses queries, not training pairs, so it stays out of the key; a
    relative root is resolved; the digest catches a regenerated or edited set behind the same name.
    """
    name = re.sub(r"\s*\[[^\]]*\]$", "", str(dataset.name))
    scheme, sep, where = name.partition(":")
    if sep and where and Path(where).exists():  # "viton:../data" and "viton:/abs/data" are one set
        name = f"{scheme}:{Path(where).resolve()}"
    train = dataset.train
    if train is None or len(train) == 0:
        return {"name": name, "train_pairs": 0, "digest": None}
    digest = hashlib.sha1()
    columns = [c for c in ("pair_id", "product_id", "person_image", "product_image") if c in train.columns]
    for values in zip(*(train[c].astype(str) for c in columns)):
        digest.update("\t".join(Path(v).name if c.endswith("image") else v for c, v in zip(columns, values)).encode())
        digest.update(b"\n")
    return {"name": name, "train_pairs": len(train), "digest": digest.hexdigest()[:16]}


def _train_pairs(dataset, train_options: Mapping[str, Any]) -> int:
    """How many pairs the training sees: all of them, or `max_pairs` of them."""
    available = 0 if dataset.train is None else len(dataset.train)
    limit = train_options.get("max_pairs")
    return available if limit is None else min(available, int(limit))


def _read_meta(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((run_dir / META_FILE).read_text())
    except (OSError, ValueError):  # a final.pt without its note (copied in by hand): still reusable
        return {}


def _write_meta(run_dir: Path, meta: Mapping[str, Any]) -> None:
    """reproduce.json, written atomically: a reader never sees half a file."""
    write_text_atomic(run_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def _reporter(progress: Progress) -> Callable[[str], None]:
    """progress -> a function that reports one line (always logged too)."""

    def say(message: str) -> None:
        log.info(message)
        if callable(progress):
            progress(message)
        elif progress:
            print(message, file=sys.stderr, flush=True)

    return say
