"""Named recipes: one definition each, index --recipe, build (trainings in dependency order, resumable),
bench --recipes (one grid row each), and the fit data that index and bench say they used."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from street2shop import Pipeline
from street2shop.cli import cli
from street2shop.recipes import (
    RECIPES,
    Recipe,
    Training,
    get_recipe,
    recipe_combinations,
    recipe_query_bank,
    resolve_recipe,
)


def _invoke(*arguments):
    return CliRunner().invoke(cli, [str(a) for a in arguments])


def test_recipes_name_their_parts_and_trainings():
    assert {"no-training", "fast", "best"} <= set(RECIPES)
    assert not get_recipe("no-training").trainings and not get_recipe("fast").trainings
    best = get_recipe("best")
    assert [(t.kind, t.name) for t in best.trainings] == [("proxy", "hp"), ("descriptor", "tn")]
    assert best.trainings[1].behind == ("hp", "parser")
    assert best.specs("r") == {
        "proxy": "hp@r/parser/final.pt",
        "descriptor": "tn@r/tn/final.pt",
        "preset": "flat",
        "rerank": 0,
    }
    with pytest.raises(ValueError, match="recipes: best, fast, no-training, street"):
        get_recipe("nope")
    street = get_recipe("street")
    runs = [t.run for t in street.trainings]
    assert runs == [
        "parser_street",
        "parser_street_hr",
        "tn_street_head",
        "tn_street",
        "tn_street_lite2",
        "tn_street_nce",
    ]  # parsers first
    assert street.training_settings(street.trainings[1], "r") == {
        "street_copies": 2,
        "image_size": (256, 192),
        "epochs": 7,
    }
    behind = {"proxy": "hp@r/parser_street/final.pt"}  # tn learns from the 128 x 96 parser's cut-outs
    assert [street.training_settings(t, "r") for t in street.trainings[2:]] == [
        {"street_copies": 1, **behind},
        {"street_copies": 3, "finetune_last_blocks": 2, "epochs": 24, **behind},
        {"backbone": "lite2", "street_copies": 3, "finetune_last_blocks": 2, "epochs": 24, **behind},
        {
            "street_copies": 3,
            "finetune_last_blocks": 2,
            "epochs": 24,
            "loss": "infonce",
            "temperature": 0.05,
            "proxy": "hp@r/parser_street_hr/final.pt",  # the InfoNCE branch learns the 256 x 192 parser's
        },
    ]
    branch = "tn[catalog_blur=(2.0, 4.0);query_flip=true]@r/{}/final.pt"
    assert street.specs("r")["descriptor"] == (
        f"fused[branches={branch.format('tn_street')}|{branch.format('tn_street_head')}|"
        f"{branch.format('tn_street_lite2')}|{branch.format('tn_street_nce')};weights=(1, 1, 2, 1)]"
    )
    assert street.specs("r")["proxy"] == "hp@r/parser_street_hr/final.pt"  # queries go through the 256 x 192 one


def test_a_recipe_whose_checkpoints_are_missing_says_how_to_train_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="street2shop build --recipe best"):
        resolve_recipe("best", runs=tmp_path)
    for run in ("parser", "tn"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "final.pt").write_bytes(b"x")
    assert resolve_recipe("best", runs=tmp_path)["descriptor"] == f"tn@{tmp_path}/tn/final.pt"
    # an option given wins over the recipe's part
    assert resolve_recipe("fast", descriptor="gem")["descriptor"] == "gem"
    assert resolve_recipe(None) == {
        "recipe": None,
        "proxy": "none",
        "descriptor": "gem",
        "preset": "flat",
        "rerank": 0,
        "query_bank": (),
        "query_bank_size": 1500,
        "bank_beta": 10.0,
    }
    assert recipe_combinations(["fast", "no-training"]) == [("none", "colorhist"), ("hp", "gem")]


def test_a_recipe_query_bank_comes_from_the_data_and_its_street_variant():
    street = get_recipe("street")
    assert street.bank_sources("viton:/data/v") == ("viton-street:/data/v",)
    assert street.bank_sources("viton-street:/data/v") == ("viton-street:/data/v",)
    with pytest.raises(ValueError, match="has none .*--query-bank SPEC"):
        street.bank_sources("csv:shop.csv")
    assert get_recipe("best").bank_sources("csv:shop.csv") == ()
    assert resolve_recipe(None, query_bank=("viton:x",))["query_bank"] == ("viton:x",)
    assert resolve_recipe("fast", bank_data="viton:x")["query_bank"] == ()
    given = resolve_recipe("fast", query_bank=("csv:q.csv",), bank_data="viton:x")
    assert given["query_bank"] == ("csv:q.csv",)  # an explicit bank replaces the recipe's (none here)
    # recipe street's bank: every street training photo (0: all), beta 15; options given replace them
    parts = resolve_recipe("street", proxy="hp", descriptor="gem", bank_data="viton:/d")  # given: no checkpoints
    assert (parts["query_bank"], parts["query_bank_size"], parts["bank_beta"]) == (("viton-street:/d",), 0, 15.0)
    parts = resolve_recipe("street", proxy="hp", descriptor="gem", bank_data="viton:/d", query_bank_size=9, bank_beta=5)
    assert (parts["query_bank_size"], parts["bank_beta"]) == (9, 5.0)


def test_index_with_a_recipe_records_it(synthetic_root, tmp_path):
    out = tmp_path / "idx"
    result = _invoke(
        "index", "--catalog", f"viton:{synthetic_root}", "--recipe", "fast", "--out", out, "--device", "cpu",
        "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Pipeline.load(out, device="cpu").describe()["recipe"] == "fast"
    assert _invoke("recipes").output.count("measured:") == len(RECIPES)


def test_index_and_bench_say_what_they_fitted_on(synthetic_root, tmp_path):
    out = tmp_path / "idx"
    result = _invoke(
        "index", "--catalog", f"viton:{synthetic_root}", "--split", "val", "--descriptor", "rmac", "--out", out,
        "--fit-data", f"viton:{synthetic_root}", "--fit-max-images", "8", "--device", "cpu",
        "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitting rmac on" in result.output and "training pairs (4 product + 4 person photos)" in result.output
    record = Pipeline.load(out, device="cpu").record
    assert record["fit_data"].endswith("training pairs (4 product + 4 person photos)")
    bench = _invoke(
        "bench", "--dataset", f"viton:{synthetic_root}", "--recipes", "fast", "--fit-data", f"viton:{synthetic_root}",
        "--out", tmp_path / "bench", "--protocol-draws", "0", "--generation-samples", "0", "--rank-pictures", "0",
        "--bootstrap", "0", "--device", "cpu", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert "fitted on" in bench.output
    rows = pd.read_csv(tmp_path / "bench" / "results.csv")
    assert list(zip(rows["proxy"], rows["descriptor"])) == [("none", "colorhist")]


def test_build_trains_in_dependency_order_skips_finished_runs_then_indexes(synthetic_root, tmp_path, monkeypatch):
    import benchmarks.reproduce

    calls = []

    def fake_train(kind, name, data, out_dir, settings, options=None, **kwargs):
        calls.append((kind, name, Path(out_dir).name, dict(settings), kwargs["seed"]))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "final.pt").write_bytes(b"trained")
        return Path(out_dir) / "final.pt"

    recipe = Recipe(
        name="test-chain",
        summary="two trainings, the second behind the first",
        proxy="none",
        descriptor="colorhist",
        trainings=(
            Training("proxy", "hp", "parser"),
            Training("descriptor", "tn", "tn", behind=("hp", "parser"), seed=7),
        ),
        query_bank=("{data}",),
    )
    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    monkeypatch.setattr(benchmarks.reproduce, "train_named", fake_train)
    runs = tmp_path / "runs"
    arguments = [
        "build", "--recipe", "test-chain", "--train-data", f"viton:{synthetic_root}", "--catalog",
        f"viton:{synthetic_root}", "--runs", runs, "--device", "cpu", "--cache-dir", tmp_path / "cache",
    ]  # fmt: skip
    result = _invoke(*arguments, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    parser_final = runs / "parser" / "final.pt"
    assert calls == [
        ("proxy", "hp", "parser", {}, 0),  # build's --seed
        ("descriptor", "tn", "tn", {"proxy": f"hp@{parser_final}"}, 7),  # the training's own
    ]
    assert result.output.count("trained ") == 2 and "wrote" in result.output
    assert f"training-split photos of viton:{synthetic_root}, beta 10" in result.output  # the recipe's query bank
    assert Pipeline.load(tmp_path / "a", device="cpu").describe()["query_bank"]["sources"] == [
        f"viton:{synthetic_root}"
    ]
    calls.clear()
    result = _invoke(*arguments, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert calls == [] and result.output.count("exists, skipped") == 2


def test_bench_scores_a_recipe_with_its_own_query_bank(synthetic_root, tmp_path, monkeypatch):
    banked = Recipe(
        "banked", "colorhist with a bank", "none", "colorhist", query_bank=("{data}",), bank_size=6, bank_beta=7.0
    )
    monkeypatch.setitem(RECIPES, "banked", banked)
    data = f"viton:{synthetic_root}"
    assert recipe_query_bank(["fast", "banked"], data) == {
        "query_bank": (data,),
        "query_bank_size": 6,
        "bank_beta": 7.0,
    }
    assert recipe_query_bank(["fast"], data) is None
    monkeypatch.setitem(RECIPES, "other", dataclasses.replace(banked, name="other", bank_beta=3.0))
    with pytest.raises(ValueError, match="different query banks"):
        recipe_query_bank(["banked", "other"], data)
    common = ["bench", "--dataset", data, "--recipes", "banked", "--protocol-draws", "0", "--bootstrap", "0"]
    common += ["--rank-pictures", "0", "--generation-samples", "0", "--cache-dir", tmp_path / "cache"]
    result = _invoke(*common, "--out", tmp_path / "b1")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b1" / "config.json").read_text())
    assert (config["query_bank_size"], config["bank_beta"]) == (6, 7.0)
    assert set(pd.read_csv(tmp_path / "b1" / "results.csv")["descriptor"]) == {"colorhist", "colorhist+qb"}
    result = _invoke(*common, "--bank-beta", "2", "--out", tmp_path / "b2")  # an option given wins
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b2" / "config.json").read_text())["bank_beta"] == 2.0
