"""A user's own CSV set: boxes on catalog and query rows, several images per product, several relevant products
per query, and a pairs.csv that `street2shop train` and `bench` use (synthetic images, tiny settings)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval.datasets import load_dataset
from retrieval.io import read_image
from street2shop.cli import cli

PAD = 16  # white margin the boxed copies are pasted into


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    """A CSV set built from a synthetic set: 8 products of three images each (the photo boxed inside a white
    canvas, a flipped copy, the photo itself), queries with and without boxes, and a pairs.csv with boxes."""
    from retrieval.synthetic import make_synthetic_dataset

    synthetic = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", n_products=12, seed=1)
    data = load_dataset(f"viton:{synthetic}", split="train")
    folder = tmp_path_factory.mktemp("user")
    (folder / "photos").mkdir()
    catalog, queries, pairs = [], [], []
    products = data.catalog.head(8)
    for product_id, image in zip(products["product_id"], products["image"]):
        photo = np.asarray(Image.open(image).convert("RGB"))
        h, w = photo.shape[:2]
        canvas = np.full((h + 2 * PAD, w + 2 * PAD, 3), 255, np.uint8)
        canvas[PAD : PAD + h, PAD : PAD + w] = photo
        Image.fromarray(canvas).save(folder / "photos" / f"{product_id}-boxed.png")
        Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(folder / "photos" / f"{product_id}-flipped.png")
        catalog += [
            (product_id, f"photos/{product_id}-boxed.png", PAD, PAD, PAD + w, PAD + h),
            (product_id, f"photos/{product_id}-flipped.png", "", "", "", ""),
            (product_id, image, "", "", "", ""),
        ]
    train = data.train[data.train["product_id"].isin(set(products["product_id"]))]
    for n, row in enumerate(data.queries[data.queries["product_id"].isin(set(products["product_id"]))].itertuples()):
        box = (0, 0, 10_000, 10_000) if n % 2 else ("", "", "", "")  # clipped to the photo: the whole photo
        queries.append((row.query_id, row.image, row.product_id, *box))
    first = data.queries["query_id"].iloc[0]
    other = next(p for p in products["product_id"] if p != data.queries["product_id"].iloc[0])
    queries.append((first, data.queries["image"].iloc[0], other, "", "", "", ""))  # a second relevant product
    for row in train.itertuples():
        photo = read_image(row.person_image)
        pairs.append((row.person_image, row.product_image, row.product_id, 0, 0, photo.shape[1], photo.shape[0] - 4))
    box = ["x0", "y0", "x1", "y1"]
    pd.DataFrame(catalog, columns=["product_id", "image", *box]).to_csv(folder / "catalog.csv", index=False)
    pd.DataFrame(queries, columns=["query_id", "image", "product_id", *box]).to_csv(folder / "queries.csv", index=False)
    pd.DataFrame(pairs, columns=["person_image", "product_image", "product_id", *box]).to_csv(
        folder / "pairs.csv", index=False
    )
    return folder


def _spec(folder):
    return f"csv:{folder / 'catalog.csv'},{folder / 'queries.csv'},{folder / 'pairs.csv'}"


def test_boxes_several_images_several_relevant_products_and_pairs(user_set, tmp_path):
    data = load_dataset(_spec(user_set), cache_dir=tmp_path / "cache")
    catalog = data.catalog
    assert catalog["product_id"].nunique() == 8 and len(catalog) == 24
    assert data.describe().startswith(f"{_spec(user_set)}: 8 products (24 images)")
    boxed = catalog.iloc[0]
    assert boxed["image"].startswith(str(tmp_path / "cache" / "crops")) and boxed["source_image"].endswith("boxed.png")
    # the crop of the boxed canvas is exactly the product photo
    np.testing.assert_array_equal(read_image(boxed["image"]), read_image(catalog.iloc[2]["image"]))
    assert catalog.iloc[1]["image"] == str(user_set / "photos" / f"{boxed['product_id']}-flipped.png")
    assert np.isnan(catalog.iloc[1]["x0"])
    queries = data.queries
    assert queries["query_id"].iloc[0] in set(queries["query_id"][queries["query_id"].duplicated()])
    train = data.train
    assert len(train) > 0 and train["pair_id"].iloc[0] == "pair-1" and train["parse"].isna().all()
    person = read_image(train["person_image"].iloc[0])
    original = read_image(pd.read_csv(user_set / "pairs.csv")["person_image"].iloc[0])
    np.testing.assert_array_equal(person, original[:-4])  # the person side is its box's crop


def test_csv_errors_name_the_file_and_the_fix(user_set, tmp_path):
    table = pd.read_csv(user_set / "catalog.csv", dtype=str, keep_default_na=False)
    table.drop(columns="y1").to_csv(tmp_path / "three.csv", index=False)
    with pytest.raises(ValueError, match=r"three\.csv has box column\(s\) \['x0', 'y0', 'x1'\] but not \['y1'\]"):
        load_dataset(f"csv:{tmp_path / 'three.csv'}", cache_dir=tmp_path / "cache")
    table.loc[1, "x0"] = "3"
    table.to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(ValueError, match=r"partial\.csv: row 2 after the header has only some of x0,y0,x1,y1"):
        load_dataset(f"csv:{tmp_path / 'partial.csv'}", cache_dir=tmp_path / "cache")
    pairs = pd.read_csv(user_set / "pairs.csv", dtype=str, keep_default_na=False).assign(parse="some.png")
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(ValueError, match=r"pairs\.csv: row 1 after the header has both a box and a parse map"):
        load_dataset(f"csv:{user_set / 'catalog.csv'},,{tmp_path / 'pairs.csv'}", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="expected csv:CATALOG.csv"):
        load_dataset(f"csv:{user_set / 'catalog.csv'},")


def test_train_tn_and_bench_it_on_the_users_csv(user_set, tmp_path, monkeypatch):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    spec = _spec(user_set)
    run = tmp_path / "tn"
    tiny = ["image_size=64,48", "dim=16", "chunk_pairs=8", "val_fraction=0.25", "extract_batch_size=8"]
    trained = CliRunner().invoke(
        cli,
        ["train", "descriptor", "tn", "--dataset", spec, "--out", str(run), "--epochs", "1", "--batch-size", "4"]
        + [arg for setting in tiny for arg in ("--set", setting)]
        + ["--device", "cpu"],
        catch_exceptions=False,
    )
    assert trained.exit_code == 0, trained.output
    assert (run / "final.pt").exists() and "training pairs" in trained.output
    out = tmp_path / "bench"
    args = [
        "bench",
        "--dataset",
        spec,
        "--descriptors",
        f"colorhist,tn[image_size=64,48;dim=16]@{run / 'final.pt'}",
        "--protocol-draws",
        "0",
    ]
    args += ["--bootstrap", "10", "--out", str(out), "--device", "cpu"]
    # the pairs are of the products the queries ask for: a score of memorisation, refused unless asked for
    refused = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert refused.exit_code == 2 and "trained on 8 of the 8 products" in refused.output
    assert "--allow-train-overlap" in refused.output
    result = CliRunner().invoke(cli, args + ["--allow-train-overlap"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "results.csv")
    assert summary["gallery"].tolist() == [8, 8] and summary["gallery_images"].tolist() == [24, 24]
    assert (summary["mAP@20"] > 0).all()
    report = (out / "report.md").read_text()
    assert "8 products (24 images)" in report and "## Top-k accuracy" in report and "| acc@1 |" in report
    # acc@k from per_query ranks, in a plain loop: the query with two relevant products counts once
    per_query = pd.read_csv(out / "per_query.csv")
    for descriptor, rows in per_query.groupby("descriptor"):
        hits = [1.0 if 0 < rank <= 5 else 0.0 for rank in rows["rank"]]
        assert summary.set_index("descriptor").loc[descriptor, "acc@5"] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.parametrize("command", [["train", "parsing"], ["train", "paintnet"]])
def test_proxies_refuse_a_set_without_parse_maps_and_say_what_can_train(user_set, tmp_path, monkeypatch, command):
    monkeypatch.setenv("STREET2SHOP_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        cli, command + ["--dataset", _spec(user_set), "--out", str(tmp_path / "run"), "--epochs", "1"]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    name = "hp" if command[1] == "parsing" else "paintnet"
    assert f"{name} learns from parse maps" in result.output and "none of its 8 training pairs has one" in result.output
    assert (
        "the descriptors can (delf, fused, l2net, lfnet, tn" in result.output and "dtgan, hp, paintnet" in result.output
    )
    assert f"use it here as {name}@RUN/final.pt" in result.output
    assert not (tmp_path / "run" / "final.pt").exists()
