"""A fusion whose branches read the query behind proxies of their own (``fused[...;proxies=...]``).

The gallery side never goes through a proxy; the query side runs each branch behind its proxy (``same``: the
pipeline's) and fuses the branch vectors. Checked against the plain fusion and a hand-made computation, in the
query embedder, the bench and the weight fitting.
"""

import numpy as np
import pytest
import torch

from benchmarks.runner import run_benchmark
from generation.proxies import Proxy, create_proxy, proxy_training_options, query_embedder
from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.fused import branch_proxy_specs, fuse_vectors
from retrieval.proxy_stage import to_descriptor_input

BRANCHES = "colorhist[image_size=(48, 32)]|colorhist[image_size=(48, 32);bins=(8, 2, 2)]"


class Inverted(Proxy):
    """A stand-in serving proxy: the photo's colours inverted (cheap, and far from the identity)."""

    name = "inverted"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 1.0 - images


def test_proxy_specs_are_one_per_branch_and_recorded_only_when_used():
    assert branch_proxy_specs("same| none", 2) == [None, "none"]
    assert branch_proxy_specs("", 2) == [None, None]
    with pytest.raises(ValueError, match="one per branch"):
        branch_proxy_specs("none", 2)
    plain = create_descriptor(f"fused[branches={BRANCHES}]")
    own = create_descriptor(f"fused[branches={BRANCHES};proxies=same|none]")
    assert not plain.has_branch_proxies and "proxies" not in plain.config()  # old fusions keep fingerprints
    assert own.has_branch_proxies and own.config()["proxies"] == "same|none"
    assert own.fingerprint() != plain.fingerprint()
    rebuilt = create_descriptor("fused", **own.config())
    assert rebuilt.branch_proxies == [None, "none"]


def test_each_branch_reads_the_query_behind_its_own_proxy():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 48)
    fused = create_descriptor(f"fused[branches={BRANCHES};proxies=same|none;weights=[3, 1]]").eval()
    got = query_embedder(fused, Inverted())(images)
    size = tuple(fused.input_spec.size)
    first = fused.branch_vector(fused.branches[0], to_descriptor_input(1.0 - to_descriptor_input(images, size), size))
    second = fused.branch_vector(fused.branches[1], to_descriptor_input(images, size))
    expected = fuse_vectors([first, second], torch.tensor([0.75, 0.25]))
    assert torch.allclose(got, expected, atol=1e-6)
    # without branch proxies both branches read the serving proxy's output, as before
    plain = create_descriptor(f"fused[branches={BRANCHES};weights=[3, 1]]").eval()
    assert not torch.allclose(query_embedder(plain, Inverted())(images), expected, atol=1e-3)


def test_the_bench_runs_each_branch_behind_its_proxy(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    kwargs = dict(bootstrap=0, protocol_draws=0, progress=False, cache_dir=tmp_path / "cache", ks=(1, 5))
    own = f"fused[branches={BRANCHES};proxies=none|none]"
    plain = f"fused[branches={BRANCHES}]"
    result = run_benchmark(data, [own, plain], ["pix2pix", "none"], **kwargs).summary.set_index(["proxy", "descriptor"])
    # branches behind "none" ignore the cell's pix2pix: that row equals the plain fusion without a proxy
    own_label, plain_label = result.index.get_level_values("descriptor").unique()
    columns = ["mAP@1", "mAP@5"]
    assert np.allclose(result.loc[("pix2pix", own_label), columns], result.loc[("none", plain_label), columns])
    assert not np.allclose(result.loc[("pix2pix", plain_label), columns], result.loc[("none", plain_label), columns])


def test_weight_fitting_runs_each_branch_behind_its_proxy(synthetic_root, tmp_path):
    data = load_viton(synthetic_root, split="val")
    spec = f"fused[branches={BRANCHES};proxies=same|none]"
    options = proxy_training_options({"proxy": "pix2pix", "grid_step": 0.5}, create_descriptor(spec))
    assert options["branch_proxies"][0] is None and options["branch_proxies"][1].name == "none"
    fused = create_descriptor(spec)
    with pytest.raises(ValueError, match="branch_proxies"):
        fused.train_on(data, tmp_path / "refused", seed=0, progress=False, proxy=create_proxy("pix2pix"))
    final = fused.train_on(data, tmp_path / "run", seed=0, progress=False, **options)
    loaded = create_descriptor(f"fused@{final}")
    assert loaded.branch_proxies == [None, "none"] and loaded.fingerprint() == fused.fingerprint()


def test_a_fusion_with_its_weights_given_is_benched_as_is():
    from benchmarks.reproduce import names_a_training

    assert not names_a_training("descriptor", f"fused[branches={BRANCHES};weights=(1, 1)]")
    assert names_a_training("descriptor", f"fused[branches={BRANCHES}]")  # its weights are still to be fitted
    assert names_a_training("descriptor", "tn[dim=256]")


def test_a_saved_pipeline_searches_with_each_branch_behind_its_proxy(synthetic_root, tmp_path):
    from street2shop import Pipeline
    from street2shop.engine import build_index

    data = load_viton(synthetic_root, split="val")
    shops = {}
    for name, spec in (("own", f"{BRANCHES};proxies=same|none"), ("plain", BRANCHES)):
        fused = create_descriptor(f"fused[branches={spec};weights=(1, 1)]").eval()
        build_index(data.catalog, fused, tmp_path / name, progress=False)
        shops[name] = Pipeline.load(tmp_path / name, device="cpu")
    assert shops["own"].descriptor.branch_proxies == [None, "none"]
    assert shops["own"]._branch_embedder is not None and shops["plain"]._branch_embedder is None
    # the pipeline's proxy is none, so "same" and "none" read the same photo: both ways must rank alike
    photos = list(data.queries["image"].iloc[:4])
    for own, plain in zip(shops["own"].search(photos, k=3), shops["plain"].search(photos, k=3)):
        assert [h.product_id for h in own.hits] == [h.product_id for h in plain.hits]
        assert [h.score for h in own.hits] == pytest.approx([h.score for h in plain.hits], abs=1e-5)
