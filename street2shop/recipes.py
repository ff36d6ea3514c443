"""Named pipelines (recipes), defined here and nowhere else.

A recipe names a proxy, a descriptor, an index preset, the re-ranking depth, and the trainings it needs
(in dependency order: a parser, then a descriptor trained behind that parser). `street2shop index
--recipe NAME` indexes with it; `street2shop build --recipe NAME` trains what it needs first.

Trained parts are spelled with a run placeholder, ``hp@{parser}``: ``{parser}`` becomes
``RUNS/parser/final.pt`` (RUNS: `--runs`, default ``runs/NAME``), where `build` trains it.

Measured numbers (mAP@20 on VITON's validation split, studio photos; speed = query images per second
through proxy + descriptor on this project's 2-core CPU; see each recipe's ``measured``) are filled in
from `street2shop bench --recipes ...` runs and quoted in the README.

Example:
    >>> get_recipe("fast").descriptor
    'colorhist'
    >>> get_recipe("best").specs("runs/best")["proxy"]
    'hp@runs/best/parser/final.pt'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from index.bank_norm import DEFAULT_BANK_BETA, DEFAULT_BANK_SIZE

DEFAULT_PROXY = "none"
DEFAULT_DESCRIPTOR = "gem"
DEFAULT_PRESET = "flat"
# Each street tn branch: catalog vectors pooled with blurred copies, queries averaged with their mirror image.
STREET_BRANCH_OPTIONS = "catalog_blur=(2.0, 4.0);query_flip=true"


@dataclass(frozen=True)
class Training:
    """One training a recipe needs: `street2shop train` of `kind` `name` into RUNS/`run`.

    `behind`: the run of a proxy this descriptor is trained behind (tn learns the parser's cut-outs);
    its final.pt goes in as the training option ``proxy=<proxy name>@RUNS/<behind>/final.pt``.
    """

    kind: str  # "proxy" or "descriptor"
    name: str
    run: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    behind: Optional[Tuple[str, str]] = None  # (proxy name, run), e.g. ("hp", "parser")
    seed: Optional[int] = None  # this training's seed (None: build's --seed), e.g. to vary an ensemble's branches


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    proxy: str
    descriptor: str
    preset: str = DEFAULT_PRESET
    rerank: int = 0
    trainings: Tuple[Training, ...] = ()
    measured: str = "not measured yet"
    # Query-bank normalisation (index.bank_norm): the data sets whose training-split query photos form the bank,
    # "{data}" the training data (build) or the catalog's data set (index), "{data_street}" its street variant;
    # how many photos of each (0: all) and the inverted softmax's beta.
    query_bank: Tuple[str, ...] = ()
    bank_size: int = DEFAULT_BANK_SIZE
    bank_beta: float = DEFAULT_BANK_BETA

    def bank_sources(self, data: str) -> Tuple[str, ...]:
        """The query bank's data set specs for data set `data` (e.g. viton:ROOT -> viton:ROOT, viton-street:ROOT).

        Raises:
            ValueError: the bank wants street photos, and `data` has no street variant (only viton:ROOT has).
        """
        street = street_variant(data)
        if street is None and any("{data_street}" in template for template in self.query_bank):
            raise ValueError(
                f"recipe {self.name!r} builds its query bank from street versions of the training photos, and {data!r} "
                "has none (viton:ROOT has: viton-street:ROOT): give the bank's data sets with --query-bank SPEC "
                "(training-split query photos like the ones you will search with)"
            )
        return tuple(template.format(data=data, data_street=street) for template in self.query_bank)

    def run_paths(self, runs: os.PathLike) -> Dict[str, str]:
        """{run: RUNS/run/final.pt} of every training: what the ``{run}`` placeholders stand for."""
        return {t.run: str(Path(runs) / t.run / "final.pt") for t in self.trainings}

    def specs(self, runs: os.PathLike) -> Dict[str, Any]:
        """proxy, descriptor, preset, rerank with every ``{run}`` placeholder made RUNS/run/final.pt."""
        paths = self.run_paths(runs)
        return {
            "proxy": self.proxy.format(**paths),
            "descriptor": self.descriptor.format(**paths),
            "preset": self.preset,
            "rerank": self.rerank,
        }

    def training_settings(self, training: Training, runs: os.PathLike) -> Dict[str, Any]:
        """A training's `--set` settings, ``{run}`` placeholders in text values made RUNS/run/final.pt, and the
        proxy it trains behind as ``proxy=NAME@RUNS/run/final.pt``."""
        paths = self.run_paths(runs)
        settings = {k: v.format(**paths) if isinstance(v, str) else v for k, v in training.settings.items()}
        if training.behind is not None:
            proxy_name, proxy_run = training.behind
            settings["proxy"] = f"{proxy_name}@{paths[proxy_run]}"
        return settings


RECIPES: Dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="no-training",
            summary="hp with its untrained GrabCut fallback, then gem (ImageNet EfficientNet-Lite0): no checkpoint",
            proxy="hp",
            descriptor="gem",
            measured="mAP@20 0.540 on 300 VITON validation products (studio photos); 1.4 query images/s "
            "(GrabCut: 586 ms an image, 1 CPU thread)",
        ),
        Recipe(
            name="fast",
            summary="no proxy, colorhist (256-d HSV histogram): the cheapest good one, nothing to train",
            proxy="none",
            descriptor="colorhist",
            measured="mAP@20 0.349 on 300 VITON validation products (studio photos); 638 query images/s (1 CPU thread)",
        ),
        Recipe(
            name="best",
            summary="hp with a trained garment parser, then tn trained behind that parser",
            proxy="hp@{parser}",
            descriptor="tn@{tn}",
            trainings=(
                Training("proxy", "hp", "parser"),
                Training("descriptor", "tn", "tn", behind=("hp", "parser")),
            ),
            measured="mAP@20 0.630 [0.611, 0.649] on all 1,820 VITON validation products (studio photos); 0.833 on 300",
        ),
        Recipe(
            name="street",
            summary="for street photos: hp with a parser trained on street copies too at the photo's full 256 x 192, "
            "then a fusion of four tn trained on street copies (Lite0 fine-tuned, Lite0 head only, Lite2 fine-tuned at "
            "twice the weight, and Lite0 fine-tuned with the contrastive InfoNCE loss behind the 256 x 192 parser), "
            "catalog vectors pooled with blurred copies, queries with their mirror image, scored with query-bank "
            "normalisation against the street versions of all training photos",
            # The first three branches learnt from the cut-outs of the 128 x 96 street parser (parser_street): that is
            # how they were trained and measured. Queries go through the 256 x 192 one (parser_street_hr), whose masks
            # are closer to the true garment on street photos (README, the street parser at full resolution); the
            # InfoNCE branch learnt from that one's cut-outs.
            proxy="hp@{parser_street_hr}",
            # weights fixed by a grid over {0, 1, 2} per branch on half the validation queries, never fitted on
            # training pairs: there they go to the branch that trained on those very pairs (README, fusion; InfoNCE)
            descriptor="fused[branches="
            + "|".join(
                f"tn[{STREET_BRANCH_OPTIONS}]@{{{run}}}"
                for run in ("tn_street", "tn_street_head", "tn_street_lite2", "tn_street_nce")
            )
            + ";weights=(1, 1, 2, 1)]",
            trainings=(
                Training("proxy", "hp", "parser_street", {"street_copies": 1}),
                Training(
                    "proxy", "hp", "parser_street_hr", {"street_copies": 2, "image_size": (256, 192), "epochs": 7}
                ),
                Training("descriptor", "tn", "tn_street_head", {"street_copies": 1}, behind=("hp", "parser_street")),
                Training(
                    "descriptor",
                    "tn",
                    "tn_street",
                    {"street_copies": 3, "finetune_last_blocks": 2, "epochs": 24},
                    behind=("hp", "parser_street"),
                ),
                Training(
                    "descriptor",
                    "tn",
                    "tn_street_lite2",
                    {"backbone": "lite2", "street_copies": 3, "finetune_last_blocks": 2, "epochs": 24},
                    behind=("hp", "parser_street"),
                ),
                Training(
                    "descriptor",
                    "tn",
                    "tn_street_nce",
                    {
                        "street_copies": 3,
                        "finetune_last_blocks": 2,
                        "epochs": 24,
                        "loss": "infonce",
                        "temperature": 0.05,
                    },
                    behind=("hp", "parser_street_hr"),
                ),
            ),
            # Query-bank normalisation against the street versions of every training-split photo (README, query bank).
            query_bank=("{data_street}",),
            bank_size=0,
            bank_beta=15.0,
            measured="mAP@20 0.763 [0.745, 0.780] (studio photos) and 0.507 [0.489, 0.528] (viton-street) on all 1,820 "
            "VITON validation products; trainings 882 + 2,766 + 1,229 + 4,281 + 3,861 + ~4,135 s on this 2-core CPU",
        ),
    )
}


def street_variant(data: str) -> Optional[str]:
    """The street-condition variant of a data set spec: viton:ROOT -> viton-street:ROOT (itself for one already),
    None for a format without one."""
    scheme, _, argument = str(data).partition(":")
    if scheme.strip().lower() in ("viton", "viton-street"):
        return f"viton-street:{argument}"
    return None


def list_recipes() -> list:
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe of that name; ValueError listing the valid names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(list_recipes())}")
    return RECIPES[name]


def default_runs(recipe: str) -> Path:
    """Where `build --recipe NAME` trains and `index --recipe NAME` looks: runs/NAME."""
    return Path("runs") / recipe


def resolve_recipe(
    recipe: Optional[str],
    *,
    proxy: Optional[str] = None,
    descriptor: Optional[str] = None,
    preset: Optional[str] = None,
    rerank: Optional[int] = None,
    runs: Optional[os.PathLike] = None,
    query_bank: Optional[Sequence[str]] = None,
    bank_data: Optional[str] = None,
    query_bank_size: Optional[int] = None,
    bank_beta: Optional[float] = None,
) -> Dict[str, Any]:
    """`index`'s pipeline parts: the recipe's (or the defaults), each overridden by an option given.

    `query_bank` (data set specs) replaces the recipe's query bank, whose sources are otherwise made from
    `bank_data` (`Recipe.bank_sources`; the training data of `build`, the catalog's data set of `index`).
    `query_bank_size` and `bank_beta` replace the recipe's (`Recipe.bank_size`, `Recipe.bank_beta`).

    Returns:
        {"recipe", "proxy", "descriptor", "preset", "rerank", "query_bank", "query_bank_size", "bank_beta"}.

    Raises:
        ValueError: an unknown recipe.
        FileNotFoundError: a checkpoint the recipe needs is missing (with the command that trains it).
    """
    given = {"proxy": proxy, "descriptor": descriptor, "preset": preset, "rerank": rerank}
    bank = tuple(query_bank or ())
    if recipe is None:
        defaults = {"proxy": DEFAULT_PROXY, "descriptor": DEFAULT_DESCRIPTOR, "preset": DEFAULT_PRESET, "rerank": 0}
        chosen_parts = {key: given[key] if given[key] is not None else defaults[key] for key in defaults}
        return {"recipe": None, **chosen_parts, **_bank_parts(bank, query_bank_size, bank_beta, None)}
    chosen = get_recipe(recipe)
    chosen_parts = _recipe_parts(chosen, given, runs)
    if not bank and chosen.query_bank:
        if bank_data is None:
            raise ValueError(f"recipe {recipe!r} scores with a query bank: name its data set (--query-bank SPEC)")
        bank = chosen.bank_sources(bank_data)
    return {"recipe": recipe, **chosen_parts, **_bank_parts(bank, query_bank_size, bank_beta, chosen)}


def _recipe_parts(recipe: Recipe, given: Mapping[str, Any], runs: Optional[os.PathLike]) -> Dict[str, Any]:
    """The recipe's proxy, descriptor, preset and rerank with its checkpoints under `runs` (default runs/NAME),
    each replaced by a `given` one that is not None.

    Raises:
        FileNotFoundError: a checkpoint the recipe needs is missing (with the command that trains it).
    """
    runs = Path(runs) if runs is not None else default_runs(recipe.name)
    parts = recipe.specs(runs)
    for training in recipe.trainings:
        part = "proxy" if training.kind == "proxy" else "descriptor"
        checkpoint = runs / training.run / "final.pt"
        if given.get(part) is None and not checkpoint.exists():
            raise FileNotFoundError(
                f"recipe {recipe.name!r} needs {checkpoint} ({training.kind} {training.name}): train it with "
                f"`street2shop build --recipe {recipe.name} --train-data DATA --catalog CATALOG --out DIR --runs "
                f"{runs}`, or give --{part} {training.name}@YOUR/final.pt"
            )
    return {key: given[key] if given.get(key) is not None else parts[key] for key in parts}


def _bank_parts(
    bank: Tuple[str, ...], size: Optional[int], beta: Optional[float], recipe: Optional[Recipe]
) -> Dict[str, Any]:
    """The query bank's sources, size and beta: each given one, else the recipe's, else the defaults."""
    default_size = recipe.bank_size if recipe is not None else DEFAULT_BANK_SIZE
    default_beta = recipe.bank_beta if recipe is not None else DEFAULT_BANK_BETA
    return {
        "query_bank": bank,
        "query_bank_size": default_size if size is None else int(size),
        "bank_beta": default_beta if beta is None else float(beta),
    }


def recipe_query_bank(names: Sequence[str], data: str) -> Optional[Dict[str, Any]]:
    """The query bank the named recipes score with on data set `data`, for `bench --recipes`:
    {"query_bank", "query_bank_size", "bank_beta"}, or None when none of them has one.

    Raises:
        ValueError: two of them score with different banks (one bench applies one bank to every row), or
            `data` has no variant the bank needs (`Recipe.bank_sources`).
    """
    with_bank = [recipe for recipe in map(get_recipe, names) if recipe.query_bank]
    if not with_bank:
        return None
    if len({(r.query_bank, r.bank_size, r.bank_beta) for r in with_bank}) > 1:
        raise ValueError(
            f"recipes {', '.join(r.name for r in with_bank)} score with different query banks, and one bench applies "
            "one bank to every row: bench them apart, or give the bank with --query-bank SPEC"
        )
    recipe = with_bank[0]
    return _bank_parts(recipe.bank_sources(data), None, None, recipe)


def recipe_combinations(names, runs: Optional[os.PathLike] = None) -> list:
    """(proxy spec, descriptor spec) of each named recipe, for `bench --recipes` (one grid row each).

    `runs` (one folder for all, else runs/NAME each) holds the checkpoints of recipes that need training.
    """
    pairs = []
    for name in names:
        parts = _recipe_parts(get_recipe(name), {}, runs)  # its query bank is the bench's (`recipe_query_bank`)
        pairs.append((parts["proxy"], parts["descriptor"]))
    return pairs
