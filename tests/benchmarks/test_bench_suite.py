"""The benchmark suite: grid statistics, protocols, distractors, resume, report files, generation metrics."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmarks.generation_eval import evaluate_generation, evaluation_pairs, sample_grid
from benchmarks.runner import add_statistics, run_benchmark
from retrieval.datasets import load_dataset
from retrieval.features import FeatureCache
from street2shop.cli import cli


@pytest.fixture
def dataset(synthetic_root):
    return load_dataset(f"viton:{synthetic_root}", split="val")


def test_statistics_against_hand_computed_values():
    """Two proxies on four queries: improvement, paired difference and intervals by hand."""
    per_query = pd.DataFrame(
        {
            "proxy": ["none"] * 4 + ["hp"] * 4,
            "descriptor": "d",
            "index": "flat",
            "AP@1": [1, 0, 0, 0, 1, 1, 0, 0],
            "AP@20": [1.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0],
        }
    )
    summary = pd.DataFrame(
        {"proxy": ["none", "hp"], "descriptor": "d", "index": "flat", "mAP@1": [0.25, 0.5], "mAP@20": [0.375, 0.625]}
    )
    out = add_statistics(summary, per_query, ks=(1, 20), n_resamples=500)
    hp = out.iloc[1]
    assert hp["improvement_pct"] == pytest.approx(100 * (0.625 - 0.375) / 0.375)
    assert hp["diff_vs_none"] == pytest.approx(0.25)
    assert hp["diff_ci_low"] >= 0.0 and hp["diff_ci_high"] <= 0.5  # per-query differences are 0, .5, .5, 0
    assert 0 < hp["p_value"] <= 1
    assert np.isnan(out.iloc[0]["improvement_pct"]) and np.isnan(out.iloc[0]["p_value"])
    assert (out["mAP@20_ci_low"] <= out["mAP@20"]).all() and (out["mAP@20"] <= out["mAP@20_ci_high"]).all()


def test_benchmark_tables_agree(dataset):
    """Summary = mean of the per-query table; distractors enlarge the gallery but never match."""
    plain = run_benchmark(dataset, ["colorhist"], ["none"], ks=(1, 5), progress=False, protocol_draws=3, bootstrap=200)
    harder = run_benchmark(
        dataset, ["colorhist"], ["none"], ks=(1, 5), progress=False, protocol_draws=0, bootstrap=0, distractors=5
    )
    row = plain.summary.iloc[0]
    assert row["mAP@5"] == pytest.approx(plain.per_query["AP@5"].mean())
    assert row["recall@1"] == pytest.approx((plain.per_query["rank"] == 1).mean())
    assert row["mAP@5_ci_low"] <= row["mAP@5"] <= row["mAP@5_ci_high"]
    # the drawn galleries hold every product with queries here, so each draw equals the full gallery
    assert row["paper_mAP@5"] == pytest.approx(row["mAP@5"]) and row["paper_mAP@5_std"] == pytest.approx(0.0)
    assert len(plain.draws) == 3
    assert harder.summary.iloc[0]["gallery"] == len(dataset.catalog) + 5
    assert harder.summary.iloc[0]["mAP@5"] <= row["mAP@5"] + 1e-9, "more products cannot make ranking easier"
    assert harder.per_query["top5"].str.contains("distractor:").any() or harder.summary.iloc[0]["mAP@5"] == row["mAP@5"]


def test_query_bank_rows_rank_by_similarity_minus_offsets_and_refuse_evaluated_photos(dataset, synthetic_root):
    from index.bank_norm import bank_offsets
    from retrieval.datasets import query_bank_photos
    from retrieval.descriptors import create_descriptor
    from retrieval.features import extract_features

    bank = query_bank_photos(f"viton:{synthetic_root}", 10)
    result = run_benchmark(
        dataset, ["colorhist"], ["none"], ks=(1, 5), progress=False, protocol_draws=0, bootstrap=0, query_bank=bank,
        bank_beta=10.0,
    )  # fmt: skip
    assert list(result.summary["descriptor"]) == ["colorhist", "colorhist+qb"]
    # brute force: cosine minus each product's log-mean-exp over the bank, ranked by numpy
    model = create_descriptor("colorhist")
    queries = dataset.queries.drop_duplicates("query_id")
    q = extract_features(model.embed, list(queries["image"]), model.input_spec.size, progress=None)
    g = extract_features(model.embed_catalog, list(dataset.catalog["image"]), model.input_spec.size, progress=None)
    b = extract_features(model.embed, bank, model.input_spec.size, progress=None)
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    corrected = normalise(q) @ normalise(g).T - bank_offsets(g, b, 10.0)[None, :]
    truth = (
        dataset.catalog["product_id"].astype(str).to_numpy()[:, None] == queries["product_id"].astype(str).to_numpy()
    )
    rank = (corrected > np.where(truth.T, corrected, -np.inf).max(axis=1, keepdims=True)).sum(axis=1) + 1
    rows = result.per_query[result.per_query["descriptor"] == "colorhist+qb"].set_index("query_id")
    expected = pd.Series(np.where(rank <= 5, rank, 0), index=queries["query_id"])
    assert (rows.loc[expected.index, "rank"].to_numpy() == expected.to_numpy()).all()
    with pytest.raises(ValueError, match="must come from a training split"):
        run_benchmark(dataset, ["colorhist"], ["none"], progress=False, query_bank=list(queries["image"][:2]))


def test_interrupted_benchmark_resumes_without_recomputing(dataset, tmp_path, monkeypatch):
    """Kill the run after two cached images; the rerun computes only the rest; a third run computes nothing."""
    calls = {"put": 0}
    original_put = FeatureCache.put

    def failing_put(self, key, features):
        if calls["put"] == 2:
            raise KeyboardInterrupt("simulated Ctrl-C")
        calls["put"] += 1
        original_put(self, key, features)

    options = dict(ks=(1, 5), progress=False, cache_dir=tmp_path, chunk_size=2, protocol_draws=0, bootstrap=0)
    monkeypatch.setattr(FeatureCache, "put", failing_put)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(dataset, ["colorhist"], ["none"], **options)
    monkeypatch.setattr(FeatureCache, "put", original_put)

    computed = []
    monkeypatch.setattr(FeatureCache, "put", lambda self, key, f: (computed.append(len(f)), original_put(self, key, f)))
    resumed = run_benchmark(dataset, ["colorhist"], ["none"], **options)
    n_images = len(dataset.catalog) + dataset.queries["query_id"].nunique()
    assert sum(computed) == n_images - 2, "the two images cached before the interruption were reused"
    computed.clear()
    again = run_benchmark(dataset, ["colorhist"], ["none"], **options)
    assert computed == []
    pd.testing.assert_frame_equal(
        resumed.summary.drop(columns=[c for c in resumed.summary if c.endswith("_s")]),
        again.summary.drop(columns=[c for c in again.summary if c.endswith("_s")]),
    )


def test_bench_cli_writes_the_report(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--dataset",
            f"viton:{synthetic_root}",
            "--descriptors",
            "colorh*",
            "--proxies",
            "none,hp",
            "--indexes",
            "flat",
            "--k",
            "1,5",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bootstrap",
            "100",
            "--protocol-draws",
            "2",
            "--generation-samples",
            "4",
            "--rank-pictures",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "report.md",
        "results.csv",
        "results.parquet",
        "per_query.csv",
        "protocol_draws.csv",
        "generation.csv",
        "map_curves.png",
        "heatmap.png",
        "rank/index.html",
        "config.json",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["descriptors"] == ["colorhist"] and "torch" in config["versions"] and "commit" in config["git"]
    report = (out / "report.md").read_text()
    assert "| hp | colorhist | flat |" in report and "(p" in report and "mean product (reference)" in report
    per_query = pd.read_parquet(out / "per_query.parquet")
    assert set(per_query["proxy"]) == {"none", "hp"}
    assert len(list((out / "rank").glob("rank_*.png"))) == 4  # 2 queries x 2 proxies


class _Identity(torch.nn.Module):
    def forward(self, images):
        return images


def test_generation_metrics_identity_and_references(dataset):
    persons, products = evaluation_pairs(dataset, 6)
    table, first = evaluate_generation(
        [("identity", _Identity()), ("copy", _Identity())],
        products,
        products,
        reference_products=products,
        inception=False,
        progress=False,
    )
    identity = table.set_index("method").loc["identity"]
    assert identity["rmse"] == pytest.approx(0.0, abs=1e-6) and identity["ssim"] == pytest.approx(1.0, abs=1e-4)
    mean_row = table.set_index("method").loc["mean product (reference)"]
    assert mean_row["rmse"] > 0.01 and mean_row["ssim"] < 1.0
    grid = sample_grid(first, ["identity"], rows=3)
    assert grid.shape == (3 * 66, 3 * 66, 3) and grid.dtype == np.uint8
    with pytest.raises(ValueError, match="aligned"):
        evaluate_generation([("identity", _Identity())], persons, products[:-1], inception=False, progress=False)


def test_bench_train_trains_missing_checkpoints_once(synthetic_root, tmp_path):
    """`bench --train` on a machine with no checkpoints: hp is trained into the cache, then reused."""
    args = [
        "bench",
        "--dataset",
        f"viton:{synthetic_root}",
        "--descriptors",
        "colorhist",
        "--proxies",
        "none,hp",
        "--k",
        "1,5",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--bootstrap",
        "0",
        "--protocol-draws",
        "0",
        "--generation-samples",
        "0",
        "--rank-pictures",
        "0",
        "--train",
        "--train-budget",
        "0.05",
    ]
    first = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "hp trained" in first.output
    assert list((tmp_path / "cache" / "checkpoints").glob("hp-*/final.pt"))
    second = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert "hp cached" in second.output
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["proxies"][1].startswith("hp@") and config["trainings"][0]["trained"] is False
    unknown = CliRunner().invoke(cli, args[:-3] + ["--proxies", "paintnet[width=0.5]", "--out", str(tmp_path / "c")])
    assert unknown.exit_code == 2 and "add --train" in unknown.output


def test_bench_generation_cli(synthetic_root, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "bench-generation",
            "--dataset",
            f"viton:{synthetic_root}",
            "--proxies",
            "hp",
            "--samples",
            "4",
            "--no-inception",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "generation.csv")
    assert list(table["method"]) == ["hp", "mean product (reference)"]
    assert (tmp_path / "samples.png").exists() and "RMSE" in (tmp_path / "generation.md").read_text()


def test_subset_products_keeps_their_queries(dataset):
    from retrieval.datasets import subset_products

    small = subset_products(dataset, 3, seed=1)
    assert len(small.catalog) == 3 and "[3 products]" in small.name
    assert set(small.queries["product_id"]) <= set(small.catalog["product_id"]) and len(small.queries) >= 3
    assert subset_products(dataset, 0) is dataset


def test_each_proxy_runs_once_per_grid_and_is_cached(dataset, tmp_path, monkeypatch):
    """Two descriptors behind hp: hp sees every query once; a rerun reads its stored outputs."""
    from generation.proxies import create_proxy

    proxy_type = type(create_proxy("hp"))
    original = proxy_type.forward
    seen = []
    monkeypatch.setattr(
        proxy_type, "forward", lambda self, images: (seen.append(len(images)), original(self, images))[1]
    )
    options = dict(ks=(1, 5), progress=False, cache_dir=tmp_path / "features", protocol_draws=0, bootstrap=0)
    first = run_benchmark(dataset, ["colorhist", "sift"], ["none", "hp"], **options)
    n_queries = dataset.queries["query_id"].nunique()
    assert sum(seen) == n_queries
    assert len(list((tmp_path / "proxy-outputs").glob("hp-*/*.png"))) == n_queries
    seen.clear()
    again = run_benchmark(dataset, ["colorhist", "sift"], ["none", "hp"], **options)
    assert seen == []
    assert np.allclose(first.summary["mAP@5"], again.summary["mAP@5"])


def test_train_set_options_are_parsed_and_checked(synthetic_root, tmp_path):
    from retrieval.registry import parse_settings

    assert parse_settings(["width=0.5", "use_perceptual=False", "gan_mode=lsgan", "sp_image_size=(64, 48)"]) == {
        "width": 0.5,
        "use_perceptual": False,
        "gan_mode": "lsgan",
        "sp_image_size": (64, 48),
    }
    result = CliRunner().invoke(
        cli, ["train", "parsing", "--dataset", f"viton:{synthetic_root}", "--out", str(tmp_path), "--set", "nonsense"]
    )
    assert result.exit_code != 0 and "KEY=VALUE" in result.output


def test_run_bench_suite_from_python(synthetic_root, tmp_path):
    """The whole report without the CLI: globs and comma-separated text as on the command line."""
    from benchmarks.suite import BenchConfig, run_bench_suite

    lines = []
    config = BenchConfig(
        dataset=f"viton:{synthetic_root}",
        descriptors="colorh*",
        proxies=("none",),
        ks=(5, 1),
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        protocol_draws=0,
        bootstrap=0,
        generation_samples=0,
        rank_pictures=0,
    )
    out = run_bench_suite(config, echo=lines.append, progress=False)
    assert out == tmp_path / "out" and (out / "report.md").exists() and (out / "results.parquet").exists()
    record = json.loads((out / "config.json").read_text())
    assert record["descriptors"] == ["colorhist"] and record["ks"] == [1, 5]
    assert record["command"] == "python: benchmarks.suite.run_bench_suite"
    assert lines[0].startswith("viton:") and lines[-1].endswith("config.json)")
    with pytest.raises(ValueError, match="add --train"):
        run_bench_suite(dataclasses.replace(config, proxies="paintnet[width=0.5]"), progress=False)
    with pytest.raises(ValueError, match=r"tn\[dim=16\]: options in brackets name a model to train; add --train"):
        run_bench_suite(dataclasses.replace(config, descriptors="tn[dim=16]"), progress=False)
    # an untrainable descriptor with options is built as given, without --train
    options = dataclasses.replace(config, descriptors="gem[p=4;image_size=64,48]", out_dir=tmp_path / "gem")
    record = json.loads((run_bench_suite(options, progress=False) / "config.json").read_text())
    assert record["descriptors"] == ["gem[p=4.0;image_size=(64, 48)]"] and record["trainings"] == []
    # combinations (what --recipes scores) are typed like the grid: spelled as typed, they still find their cell
    spec = "gem[p=4;image_size=64,48]"
    paired = dataclasses.replace(options, descriptors=(spec,), combinations=[("none", spec)], out_dir=tmp_path / "c")
    results = pd.read_parquet(run_bench_suite(paired, progress=False) / "results.parquet")
    assert results["descriptor"].tolist() == ["gem[p=4.0;image_size=(64, 48)]"]


def test_a_checkpoint_trained_on_evaluated_products_is_refused(dataset, tmp_path, caplog):
    """`train_model` stamps final.pt with its training products; the bench refuses a stamp that meets the
    evaluated products, warns with --allow-train-overlap, and warns about checkpoints with no stamp."""
    from retrieval.descriptors import create_descriptor
    from retrieval.training import atomic_torch_save, load_checkpoint

    final = create_descriptor("tn", image_size=(64, 48), dim=32).train_on(
        dataset, tmp_path / "tn", epochs=1, batch_size=4, chunk_pairs=8, val_fraction=0.0, progress=False
    )
    stamp = load_checkpoint(final)["trained_on"]
    assert stamp["products"] == sorted(set(map(str, dataset.train["product_id"])))
    evaluated = sorted(set(map(str, dataset.queries["product_id"])))
    assert not set(stamp["products"]) & set(evaluated)  # the synthetic split keeps them apart
    options = dict(ks=(1,), progress=False, protocol_draws=0, bootstrap=0)
    spec = "tn[image_size=(64, 48);dim=32]@{}"
    run_benchmark(dataset, [spec.format(final)], ["none"], **options)  # held out: scored

    payload = load_checkpoint(final)
    payload["trained_on"]["products"] = stamp["products"] + evaluated[:2]
    leaked = tmp_path / "leaked" / "final.pt"
    leaked.parent.mkdir()
    atomic_torch_save(payload, leaked)
    fused = f"fused[branches=gem|{spec.format(leaked)};weights=(1, 1)]"
    with pytest.raises(ValueError, match=rf"{leaked} was trained on 2 of the {len(evaluated)} products .*--split-seed"):
        run_benchmark(dataset, [fused], ["none"], **options)  # found inside a fusion's branches too
    with caplog.at_level("WARNING", logger="street2shop.bench"):
        run_benchmark(dataset, [spec.format(leaked)], ["none"], allow_train_overlap=True, **options)
    assert "--allow-train-overlap" in caplog.text

    del payload["trained_on"]
    old = tmp_path / "old" / "final.pt"
    old.parent.mkdir()
    atomic_torch_save(payload, old)
    caplog.clear()
    with caplog.at_level("WARNING", logger="street2shop.bench"):
        run_benchmark(dataset, [spec.format(old)], ["none"], **options)
    assert "record no training products" in caplog.text and str(old) in caplog.text
