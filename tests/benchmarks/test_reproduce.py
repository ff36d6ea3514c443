"""benchmarks.reproduce: train what a grid needs once, key the checkpoints by config, reuse them after.

One real (tiny) training of the hp parser on the synthetic set; every other training is replaced by a
fake `train_on` that writes a placeholder final.pt and records its call, so the tests stay fast.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.reproduce import checkpoint_key, ensure_trained, format_trainings
from generation.paintnet import PaintNet
from generation.parsing import HumanParsingProxy
from generation.pix2pix import Pix2PixProxy
from generation.proxies import create_proxy
from retrieval.datasets import load_viton
from retrieval.descriptors.tn import TripletNet

# Small settings (as tests/generation/test_proxies.py's TINY and TINY_TRAINING) so models build and train in seconds.
TINY_HP = {"epochs": 1, "batch_size": 16, "image_size": (32, 32), "val_images": 0}
TINY_PAINTNET = {
    "width": 0.125,
    "sp_image_size": (64, 48),
    "sp_hidden": 16,
    "sp_dim": 16,
    "sp_k": 3,
    "pretrained": False,
    "epochs": 1,
    "max_pairs": 4,
}
TINY = {
    "hp": TINY_HP,
    "paintnet": TINY_PAINTNET,
    "paintnet-wo-sp": {"width": 0.125, "pretrained": False},
    "pix2pix": {"width": 8, "epochs": 1},
}


@pytest.fixture(scope="module")
def data(synthetic_root):
    return load_viton(synthetic_root, split="val")


@pytest.fixture(scope="module")
def trained_hp(data, tmp_path_factory):
    """A cache holding one real tiny hp training: (cache_root, resolved specs, rows)."""
    cache = tmp_path_factory.mktemp("reproduce-cache")
    resolved, rows = ensure_trained(
        ["none", "hp"], "proxy", data, cache, device="cpu", options={"hp": TINY_HP}, progress=False
    )
    return cache, resolved, rows


class FakeTraining:
    """Stands in for `train_on`: records (model name, out_dir, conf, options), writes a placeholder final.pt."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch, *classes):
        fake = self

        def train_on(model, dataset, out_dir, **options):
            fake.calls.append((model.name, Path(out_dir), dict(model.conf), options))
            final = Path(out_dir) / "final.pt"
            final.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"placeholder": True}, final)
            return final

        for cls in classes:
            monkeypatch.setattr(cls, "train_on", train_on)
        return self

    @property
    def names(self):
        return [name for name, *_ in self.calls]


@pytest.fixture
def stub_parser_loading(monkeypatch):
    """PaintNet loads its `parser` at construction: a placeholder final.pt must not be read as one."""
    loaded = []

    def load(path):
        loaded.append(str(path))
        return torch.nn.Identity()

    monkeypatch.setattr("generation.paintnet._load_parser", load)
    return loaded


def test_untrainable_and_trained_specs_pass_through(data, tmp_path, monkeypatch):
    fake = FakeTraining().install(monkeypatch, HumanParsingProxy, PaintNet, TripletNet)
    specs = ["gem", "colorhist", "tn@runs/tn/final.pt", "gem[backbone=lite2;p=4]", "tn[dim=256]@runs/tn/final.pt"]
    assert ensure_trained(specs, "descriptor", data, tmp_path, progress=False) == (specs, [])
    specs = ["none", "paintnet@runs/paintnet/final.pt"]
    assert ensure_trained(specs, "proxy", data, tmp_path, progress=False) == (specs, [])
    assert fake.calls == [] and not (tmp_path / "checkpoints").exists()


def test_bad_requests_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ensure_trained(["gem"], "index", data, tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown proxy"):
        ensure_trained(["nope"], "proxy", data, tmp_path, progress=False)
    with pytest.raises(ValueError, match="time_budget_s"):
        ensure_trained(["hp[time_budget_s=5]"], "proxy", data, tmp_path, progress=False)
    no_pairs = type(data)(name="csv:shop", catalog=data.catalog, queries=data.queries, train=None)
    with pytest.raises(ValueError, match="no training pairs"):
        ensure_trained(["hp"], "proxy", no_pairs, tmp_path, options={"hp": TINY_HP}, progress=False)


def test_trains_once_then_reuses_the_cache(data, trained_hp, monkeypatch):
    cache, resolved, rows = trained_hp
    [row] = rows
    final = Path(row["checkpoint"])
    assert resolved == ["none", f"hp@{final}"]
    assert final.name == "final.pt" and final.exists()
    assert final.parent.parent == cache / "checkpoints" and final.parent.name == f"hp-{row['key']}"
    assert row["trained"] is True and row["wall_s"] > 0 and row["train_pairs"] == len(data.train)
    assert {k: row[k] for k in ("kind", "name", "spec")} == {"kind": "proxy", "name": "hp", "spec": "hp"}
    meta = json.loads((final.parent / "reproduce.json").read_text())
    assert meta["finished"] and meta["key"] == row["key"] == checkpoint_key(meta["ingredients"])

    fake = FakeTraining().install(monkeypatch, HumanParsingProxy)
    said = []
    again, rows_again = ensure_trained(
        ["none", "hp"], "proxy", data, cache, device="cpu", options={"hp": TINY_HP}, progress=said.append
    )
    assert fake.calls == [], "a cached checkpoint must not be trained again"
    assert again == resolved
    [reused] = rows_again
    assert reused["trained"] is False and reused["checkpoint"] == row["checkpoint"]
    assert reused["wall_s"] == pytest.approx(row["wall_s"]), "the recorded wall time of the training that made it"
    assert any("reusing" in line for line in said)
    assert "reused" in format_trainings(rows_again)

    from generation.proxies import create_proxy

    assert isinstance(create_proxy(again[1]), HumanParsingProxy)  # the resolved spec loads as it is


def test_keys_follow_the_config(data, tmp_path, monkeypatch):
    fake = FakeTraining().install(monkeypatch, HumanParsingProxy)

    def checkpoint(spec="hp", **settings):
        settings = {"options": {"hp": TINY_HP}, "progress": False, **settings}
        resolved, _ = ensure_trained([spec], "proxy", data, tmp_path, **settings)
        return resolved[0]

    base = checkpoint()
    variants = [
        checkpoint("hp[epochs=2]"),  # a training option, inline
        checkpoint("hp[grabcut_iterations=2]"),  # a model option
        checkpoint(options={"hp": {**TINY_HP, "lr": 1e-2}}),
        checkpoint(seed=1),
        checkpoint(budget_minutes=0.5),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert checkpoint() == base and len(fake.calls) == 1 + len(variants), "the same config is trained once"
    # model options build the model, the others go to train_on
    by_dir = {out_dir.name: (conf, options) for _, out_dir, conf, options in fake.calls}
    conf, options = by_dir[Path(variants[1].partition("@")[2]).parent.name]
    assert conf["grabcut_iterations"] == 2 and "grabcut_iterations" not in options
    conf, options = by_dir[Path(variants[0].partition("@")[2]).parent.name]
    assert options["epochs"] == 2 and options["image_size"] == (32, 32) and options["seed"] == 0


def test_one_training_serves_repeated_specs(data, tmp_path, monkeypatch):
    fake = FakeTraining().install(monkeypatch, Pix2PixProxy)
    resolved, rows = ensure_trained(
        ["pix2pix", "none", "pix2pix"], "proxy", data, tmp_path, options=TINY, progress=False
    )
    assert resolved[0] == resolved[2] != "pix2pix" and resolved[1] == "none"
    assert len(fake.calls) == 1 and len(rows) == 1


def test_parser_is_trained_before_paintnet(data, tmp_path, monkeypatch, stub_parser_loading):
    fake = FakeTraining().install(monkeypatch, HumanParsingProxy, PaintNet)
    specs = ["none", "paintnet", "paintnet[use_perceptual=False]", "paintnet-wo-sp"]
    resolved, rows = ensure_trained(specs, "proxy", data, tmp_path, options=TINY, progress=False)
    assert fake.names == ["hp", "paintnet", "paintnet", "paintnet-wo-sp"], "hp first: its final.pt is their parser"
    hp_final = rows[0]["checkpoint"]
    assert rows[0]["name"] == "hp" and Path(hp_final).exists()
    for _, _, conf, _ in fake.calls[1:]:
        assert conf["parser"] == hp_final
    assert stub_parser_loading and set(stub_parser_loading) == {hp_final}
    assert resolved[0] == "none" and len(set(resolved[1:])) == 3
    assert [r["spec"] for r in rows] == ["hp", *specs[1:]]
    # the ablation's option reached the model, and an hp of the specs is the same training as the parser
    assert fake.calls[2][2]["use_perceptual"] is False
    _, rows_again = ensure_trained(["hp", "paintnet"], "proxy", data, tmp_path, options=TINY, progress=False)
    assert len(fake.calls) == 4 and [r["trained"] for r in rows_again] == [False, False]


def test_given_parser_is_used_and_none_means_grabcut(data, tmp_path, monkeypatch, stub_parser_loading):
    fake = FakeTraining().install(monkeypatch, HumanParsingProxy, PaintNet)
    ensure_trained(["hp@runs/parser/final.pt", "paintnet"], "proxy", data, tmp_path, options=TINY, progress=False)
    assert fake.names == ["paintnet"] and fake.calls[0][2]["parser"] == "runs/parser/final.pt"
    ensure_trained(["paintnet[parser=None]"], "proxy", data, tmp_path, options=TINY, progress=False)
    assert fake.names == ["paintnet", "paintnet"] and fake.calls[1][2]["parser"] is None


def test_paintnet_with_a_real_parser_reuses_the_cached_hp(data, trained_hp, monkeypatch):
    cache, _, hp_rows = trained_hp
    fake = FakeTraining().install(monkeypatch, PaintNet)
    resolved, rows = ensure_trained(["paintnet"], "proxy", data, cache, device="cpu", options=TINY, progress=False)
    assert [(r["name"], r["trained"]) for r in rows] == [("hp", False), ("paintnet", True)]
    assert fake.calls[0][2]["parser"] == hp_rows[0]["checkpoint"]
    assert resolved[0].startswith("paintnet@" + str(cache / "checkpoints" / "paintnet-"))


def test_a_descriptor_trains_behind_the_proxy_the_grid_trains(data, trained_hp, monkeypatch, tmp_path):
    """tn[proxy=hp]: hp is trained (here: reused, the same key as the grid's bare "hp") and tn trains behind its
    final.pt, the same training as naming that final.pt; another parser is another training."""
    cache, _, hp_rows = trained_hp
    hp_final = hp_rows[0]["checkpoint"]
    other = tmp_path / "other-parser.pt"
    shutil.copy(hp_final, other)
    fake = FakeTraining().install(monkeypatch, TripletNet)
    specs = ["tn[proxy=hp]", f"tn[proxy=hp@{hp_final}]", f"tn[proxy=hp@{other}]"]
    resolved, rows = ensure_trained(specs, "descriptor", data, cache, options={"hp": TINY_HP}, progress=False)
    assert hp_rows[0]["name"] == "hp"
    assert [(r["name"], r["trained"]) for r in rows] == [("hp", False), ("tn", True), ("tn", True)]
    behind = [call[3]["proxy"] for call in fake.calls]  # the Proxy objects tn trained behind
    assert all(proxy.uses_parser for proxy in behind)
    assert behind[0].fingerprint() == create_proxy(f"hp@{hp_final}").fingerprint()
    assert resolved[0] == resolved[1] != resolved[2] and all(spec.startswith("tn@") for spec in resolved)


def test_an_interrupted_training_resumes_in_its_folder(data, tmp_path, monkeypatch):
    fake = FakeTraining()
    interrupted = []

    def interrupt(model, dataset, out_dir, **options):
        interrupted.append(Path(out_dir))
        (Path(out_dir) / "last.pt").write_bytes(b"state")  # what TrainingRun leaves behind mid-run
        raise KeyboardInterrupt

    monkeypatch.setattr(HumanParsingProxy, "train_on", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ensure_trained(["hp"], "proxy", data, tmp_path, options={"hp": TINY_HP}, progress=False)
    assert not (interrupted[0] / "final.pt").exists()
    fake.install(monkeypatch, HumanParsingProxy)
    said = []
    _, rows = ensure_trained(["hp"], "proxy", data, tmp_path, options={"hp": TINY_HP}, progress=said.append)
    assert fake.calls[0][1] == interrupted[0], "the same keyed folder, where last.pt is"
    assert rows[0]["trained"] and any("resuming" in line for line in said)
