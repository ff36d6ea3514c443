"""Every CLI error is one line ("error: ..." or click's usage error) with a non-zero exit; -v adds the traceback."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from street2shop.cli import cli
from street2shop.engine import DESCRIPTOR_FILE, build_index

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return load_viton(synthetic_root, split="val")


@pytest.fixture(scope="module")
def index_dir(dataset, tmp_path_factory):
    """A tiny colorhist index of the synthetic catalog."""
    directory = tmp_path_factory.mktemp("index") / "idx"
    build_index(dataset.catalog, create_descriptor("colorhist"), directory, progress=False)
    return directory


@pytest.fixture(scope="module")
def photo(dataset):
    return str(dataset.queries["image"].iloc[0])


def _one_error_line(result, exit_code=2, verbose=False):
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    if verbose:
        assert "Traceback" in result.output
    else:
        assert "Traceback" not in result.output and len(lines) == 1, result.output
    return errors[0]


def _usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Invalid value" in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# ---- counts: click refuses them, naming the value given ------------------------------------------
def test_query_k_below_one_is_refused_with_the_value_given(index_dir, photo):
    runner = CliRunner()
    _usage_error(runner.invoke(cli, ["query", "--index", str(index_dir), photo, "--k", "-1"]), "-1", ">=1")
    _usage_error(
        runner.invoke(cli, ["query", "--index", str(index_dir), photo, "--k", "0"]), "0 is not in the range x>=1"
    )
    _usage_error(runner.invoke(cli, ["query", "--index", str(index_dir), photo, "--rerank", "-1"]), "--rerank", "x>=0")


def test_searcher_refuses_k_below_one_naming_it(index_dir, photo):
    from street2shop.engine import Searcher

    with pytest.raises(ValueError, match=r"k must be >= 1, got -1"):
        Searcher(index_dir, device="cpu").search([photo], k=-1)
    with pytest.raises(ValueError, match=r"rerank must be >= 0"):
        Searcher(index_dir, device="cpu", rerank=-2)


@pytest.mark.parametrize(
    "args, option",
    [
        (["index", "--catalog", "synthetic:8", "--out", "X", "--batch-size", "0"], "--batch-size"),
        (["index", "--catalog", "synthetic:8", "--out", "X", "--fit-max-images", "0"], "--fit-max-images"),
        (["bench", "--batch-size", "0"], "--batch-size"),
        (["bench", "--rerank", "-1"], "--rerank"),
        (["bench", "--limit", "-1"], "--limit"),
        (["bench", "--protocol-gallery", "0"], "--protocol-gallery"),
        (["bench", "--bootstrap", "-5"], "--bootstrap"),
        (["bench", "--train-budget", "0"], "--train-budget"),
        (["bench-generation", "--proxies", "hp", "--samples", "-1"], "--samples"),
        (["train", "paintnet", "--out", "X", "--epochs", "-1"], "--epochs"),
        (["train", "paintnet", "--out", "X", "--batch-size", "0"], "--batch-size"),
        (["train", "paintnet", "--out", "X", "--lr", "0"], "--lr"),
        (["demo", "--products", "0"], "--products"),
        (["export-pairs", "--out", "X.npz", "--size", "0"], "--size"),
        (["bench-speed", "--images", "0"], "--images"),
        (["bench-speed", "--sizes", "10,x"], "--sizes"),
    ],
)
def test_counts_are_validated_by_click(args, option, tmp_path, monkeypatch):
    import benchmarks.speed
    import retrieval.datasets

    # Refused by click, before the command body: were one let through, it would fail here, not run for minutes.
    for module, name in ((retrieval.datasets, "load_dataset"), (benchmarks.speed, "extraction_speed")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{option} was not validated by click"))
    args = [str(tmp_path / a) if a in ("X", "X.npz") else a for a in args]
    _usage_error(CliRunner().invoke(cli, args), option)


def test_bench_k_reports_the_value_given(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--k", "-1", "--out", str(tmp_path)])
    _usage_error(result, "every k must be >= 1, got '-1'")


def test_train_with_a_bracketed_spec_names_the_set_options(tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "descriptor", "tn[backbone=lite2;dim=256]", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert "street2shop train descriptor tn --set backbone=lite2 --set dim=256" in result.output
    assert not (tmp_path / "run").exists()
    # a nested spec keeps its own ';' inside its option
    result = CliRunner().invoke(
        cli, ["train", "descriptor", "fused[branches=tn[dim=8;pooling=gem]|gem;weights=(1, 2)]", "--out", "x"]
    )
    assert result.exit_code == 2
    assert "train descriptor fused --set branches=tn[dim=8;pooling=gem]|gem --set weights=(1, 2)`" in result.output


def test_train_seed_seeds_the_model_and_never_moves_the_split(synthetic_root, tmp_path, monkeypatch):
    """`--seed` used to seed the split too: a second seed then trained on most of seed 0's validation products."""
    import benchmarks.reproduce

    seen = []

    def fake_train(kind, name, data, out_dir, settings, options=None, **kwargs):
        seen.append((data.name, sorted(data.train["product_id"]), kwargs["seed"]))
        return tmp_path / "final.pt"

    monkeypatch.setattr(benchmarks.reproduce, "train_named", fake_train)
    base = ["train", "descriptor", "tn", "--dataset", f"viton:{synthetic_root}", "--out", str(tmp_path / "run")]
    for extra in ([], ["--seed", "3"], ["--split-seed", "2"]):
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code == 0, result.output
    (name0, products0, seed0), (name3, products3, seed3), (name_split, products_split, _) = seen
    assert (seed0, seed3) == (0, 3) and name3 == name0 and products3 == products0  # same split, other model seed
    assert name_split.endswith("[val, split seed 2]") and products_split != products0


# ---- index --out is checked before any work --------------------------------------------------
def test_index_out_with_foreign_files_is_refused_before_loading_data(tmp_path, monkeypatch):
    import retrieval.datasets

    monkeypatch.setattr(
        retrieval.datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded data before checking --out")
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _one_error_line(CliRunner().invoke(cli, ["index", "--catalog", "synthetic:8", "--out", str(out)]))
    assert "notes.txt" in line and "empty or new directory" in line
    assert (out / "notes.txt").read_text() == "mine"


def test_engine_ray_without_the_extra_names_the_install_command(tmp_path, monkeypatch):
    """Without Ray (here: `import ray` made to fail), --engine ray is refused before any data loads, exit 2."""
    import retrieval.datasets

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    monkeypatch.setattr(
        retrieval.datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded data before checking the engine")
    )
    args = ["index", "--catalog", "synthetic:8", "--engine", "ray", "--out", str(tmp_path / "out")]
    line = _one_error_line(CliRunner().invoke(cli, args))
    assert "'distributed' extra" in line and 'pip install -e ".[distributed]"' in line


def test_address_without_engine_ray_is_refused(tmp_path):
    args = ["index", "--catalog", "synthetic:8", "--address", "auto", "--out", str(tmp_path / "out")]
    assert "--engine ray" in _one_error_line(CliRunner().invoke(cli, args))


def test_build_index_checks_its_destination_before_extracting(dataset, tmp_path, monkeypatch):
    import street2shop.engine as engine

    monkeypatch.setattr(engine, "extract_features", lambda *a, **k: pytest.fail("extracted before checking out_dir"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.csv").write_text("x")
    with pytest.raises(FileExistsError, match=r"a\.csv"):
        build_index(dataset.catalog, create_descriptor("colorhist"), foreign, progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        build_index(dataset.catalog, create_descriptor("colorhist"), a_file, progress=False)


def test_an_existing_index_may_be_rebuilt_in_place(dataset, index_dir, tmp_path):
    from index import check_index_destination

    check_index_destination(index_dir)  # a saved index's own files: no error
    check_index_destination(tmp_path / "new")


# ---- damaged index files ----------------------------------------------------------------------
def test_corrupt_descriptor_state_is_a_clean_error(dataset, tmp_path, photo):
    import shutil

    import torch

    from street2shop.engine import load_descriptor_state

    directory = tmp_path / "idx"
    build_index(dataset.catalog, create_descriptor("colorhist"), directory, progress=False)
    metadata = json.loads((directory / "manifest.json").read_text())["metadata"]
    saved = directory / DESCRIPTOR_FILE
    shutil.copy(saved, tmp_path / "good.pt")
    saved.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=r"descriptor\.pt cannot be read as a descriptor state .*rebuild the index"):
        load_descriptor_state(metadata, directory, torch.device("cpu"))
    # Through the CLI: one line naming the file (the checksum or the load catches it), no traceback.
    line = _one_error_line(CliRunner().invoke(cli, ["query", "--index", str(directory), photo]))
    assert "descriptor.pt" in line and "rebuild" in line


def test_unreadable_descriptor_state_is_a_clean_error(dataset, tmp_path, monkeypatch):
    import torch

    import street2shop.engine as engine

    directory = tmp_path / "idx"
    build_index(dataset.catalog, create_descriptor("colorhist"), directory, progress=False)
    metadata = json.loads((directory / "manifest.json").read_text())["metadata"]
    for error in (
        pickle.UnpicklingError("invalid load key, 'x'."),
        PermissionError(13, "Permission denied"),
        EOFError(),
    ):

        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(engine.torch, "load", load)
        with pytest.raises(
            ValueError, match=rf"{DESCRIPTOR_FILE} cannot be read as a descriptor state \({type(error).__name__}"
        ):
            engine.load_descriptor_state(metadata, directory, torch.device("cpu"))


# ---- the central handler: expected, OS, unexpected, interrupted ----------------------------------
def _failing_searcher(monkeypatch, error):
    import street2shop.engine as engine

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine, "Searcher", fail)


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            PermissionError(13, "Permission denied", "/data/idx/descriptor.pt"),
            "error: /data/idx/descriptor.pt: Permission denied",
        ),
        (
            IsADirectoryError(21, "Is a directory", "/data/idx/index.faiss"),
            "error: /data/idx/index.faiss: Is a directory",
        ),
        (OSError(39, "Directory not empty", "/a", None, "/b"), "error: /a -> /b: Directory not empty"),
        (pickle.UnpicklingError("invalid load key, 'x'."), "error: invalid load key, 'x'."),
        (KeyError("3 product ids are not in the index: 'a'"), "error: 3 product ids are not in the index: 'a'"),
        (RuntimeError("two\nlines"), "error: two lines"),
    ],
)
def test_expected_errors_are_one_line_exit_2(index_dir, photo, monkeypatch, error, expected):
    _failing_searcher(monkeypatch, error)
    line = _one_error_line(CliRunner().invoke(cli, ["query", "--index", str(index_dir), photo]))
    assert line == expected


def test_unexpected_errors_name_their_type_and_hint_at_v(index_dir, photo, monkeypatch):
    _failing_searcher(monkeypatch, ZeroDivisionError("division by zero"))
    runner = CliRunner()
    line = _one_error_line(runner.invoke(cli, ["query", "--index", str(index_dir), photo]), exit_code=1)
    assert line == "error: ZeroDivisionError: division by zero (run with -v for the traceback)"
    verbose = runner.invoke(cli, ["-v", "query", "--index", str(index_dir), photo])
    line = _one_error_line(verbose, exit_code=1, verbose=True)
    assert (
        line == "error: ZeroDivisionError: division by zero"
        and "ZeroDivisionError" in verbose.output.split("error:")[0]
    )


def test_expected_errors_show_the_traceback_with_v(index_dir, photo, monkeypatch):
    _failing_searcher(monkeypatch, ValueError("bad thing: fix it"))
    result = CliRunner().invoke(cli, ["-v", "query", "--index", str(index_dir), photo])
    assert _one_error_line(result, verbose=True) == "error: bad thing: fix it"


def test_ctrl_c_exits_130_with_a_short_line(index_dir, photo, monkeypatch):
    _failing_searcher(monkeypatch, KeyboardInterrupt())
    result = CliRunner().invoke(cli, ["query", "--index", str(index_dir), photo])
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output


def test_os_error_from_a_command_is_clean(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = _one_error_line(CliRunner().invoke(cli, ["bench", "--out", str(a_file / "sub")]))
    assert str(a_file / "sub") in line


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point (not CliRunner): exit 2, one line on stderr, no traceback without -v."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "street2shop", "index", "--catalog", "synthetic:8", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ")
    assert "notes.txt" in done.stderr and "Traceback" not in done.stderr


# ---- query --format json: one entry per photo argument ------------------------------------------
def test_duplicate_query_photos_give_one_entry_each(index_dir, dataset):
    first, second = (str(p) for p in dataset.queries["image"].iloc[:2])
    result = CliRunner().invoke(
        cli,
        ["query", "--index", str(index_dir), first, second, first, "--k", "3", "--format", "json", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert [entry["query"] for entry in entries] == [first, second, first]
    assert all([r["rank"] for r in entry["results"]] == [1, 2, 3] for entry in entries)
    assert entries[0]["results"] == entries[2]["results"]


# ---- bench re-runs into the same --out ------------------------------------------------------------
def test_bench_rerun_leaves_no_stale_outputs_and_keeps_foreign_files(synthetic_root, tmp_path):
    out = tmp_path / "res"
    (out / "rank").mkdir(parents=True)
    stale = [
        out / "protocol_draws.csv",
        out / "protocol_draws.parquet",
        out / "generation.csv",
        out / "trainings.csv",
        out / "rank" / "index.html",
        out / "rank" / "rank_007.png",
    ]
    for path in stale:
        path.write_text("from an earlier run")
    foreign = [out / "notes.txt", out / "rank" / "my_picture.png", out / "results.txt"]
    for path in foreign:
        path.write_text("mine")
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--dataset",
            f"viton:{synthetic_root}",
            "--descriptors",
            "colorhist",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--protocol-draws",
            "0",
            "--bootstrap",
            "0",
            "--generation-samples",
            "0",
            "--rank-pictures",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [path for path in stale if path.exists()] == []
    assert all(path.read_text() == "mine" for path in foreign)
    report = (out / "report.md").read_text()
    files = report.split("## Files")[1]
    assert "protocol_draws.csv" not in files and "rank/index.html" not in files and "results.csv" in files
    assert all((out / name.strip("- `")).exists() for name in files.split("\n") if name.startswith("- `"))


def test_remove_previous_bench_outputs_only_removes_bench_names(tmp_path):
    from benchmarks.runner import remove_previous_bench_outputs

    (tmp_path / "rank").mkdir()
    ours = [
        tmp_path / "results.csv",
        tmp_path / "report.md",
        tmp_path / "rank" / "rank_000.png",
        tmp_path / "rank" / "index.html",
    ]
    theirs = [tmp_path / "results.csv.bak", tmp_path / "rank_000.png", tmp_path / "data.parquet"]
    for path in ours + theirs:
        path.write_text("x")
    assert sorted(remove_previous_bench_outputs(tmp_path)) == sorted(ours)
    assert all(path.exists() for path in theirs) and not (tmp_path / "rank").exists()
