"""Bootstrap intervals, paired tests, the 250-product protocol and the report writers."""

import numpy as np
import pandas as pd
import pytest

from benchmarks.protocols import ap_from_rank, relevant_ranks, sampled_gallery_protocol, summarise_draws
from benchmarks.rank_pictures import rank_picture, write_rank_pages
from benchmarks.report import paper_numbers, table4_markdown, trained_vs_untrained, untrained_label
from benchmarks.stats import bootstrap_ci, paired_bootstrap_test, relative_improvement


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    small = rng.random(50)
    large = rng.random(5000)
    low_s, high_s = bootstrap_ci(small)
    low_l, high_l = bootstrap_ci(large)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # width ~ 1/sqrt(Q): 10x the queries, ~1/3.2 the width
    # the interval of a Bernoulli(0.5) mean over 400 queries is about +-1.96 * 0.5 / 20 = +-0.049
    coin = rng.integers(0, 2, size=400).astype(float)
    low, high = bootstrap_ci(coin, n_resamples=4000)
    assert high - low == pytest.approx(2 * 1.96 * 0.5 / 20, rel=0.15)


def test_paired_test_detects_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(1)
    base = rng.random(500)
    better = base + 0.05
    same = base.copy()  # identical systems
    assert paired_bootstrap_test(better, base)["p_value"] < 0.01
    assert paired_bootstrap_test(same, base)["p_value"] == pytest.approx(1.0)
    noisy = base + rng.normal(0, 0.2, size=500)
    assert paired_bootstrap_test(noisy, base)["p_value"] > 0.01
    assert relative_improvement(0.2, 0.1) == pytest.approx(100.0)


def test_relevant_ranks_against_a_loop():
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(30, 8))
    queries = rng.normal(size=(12, 8))
    relevant = rng.integers(0, 30, size=12)
    ranks = relevant_ranks(queries, gallery, relevant, chunk=5)
    for q in range(12):
        scores = gallery @ queries[q]
        assert ranks[q] == 1 + np.sum(scores > scores[relevant[q]])
    assert ap_from_rank(np.array([1, 4, 30]), 20).tolist() == [1.0, 0.25, 0.0]


def test_sampled_gallery_protocol_is_seeded_and_perfect_for_identical_vectors():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(300)]
    draws = sampled_gallery_protocol(vectors, vectors, ids, ids, gallery_size=250, draws=3, seed=0)
    assert len(draws) == 3 and (draws["queries"] == 250).all()
    assert np.allclose(draws["mAP@1"], 1.0)  # each query is its own product
    again = sampled_gallery_protocol(vectors, vectors, ids, ids, gallery_size=250, draws=3, seed=0)
    pd.testing.assert_frame_equal(draws, again)
    summary = summarise_draws(draws)
    assert summary["mAP@20"] == pytest.approx(1.0) and summary["mAP@20_std"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="cannot draw"):
        sampled_gallery_protocol(vectors, vectors, ids, ids, gallery_size=301)


def test_table4_markdown_puts_the_paper_beside_ours():
    summary = pd.DataFrame(
        [
            {
                "proxy": "none",
                "descriptor": "rmac",
                "index": "flat",
                "mAP@1": 0.2,
                "mAP@5": 0.25,
                "mAP@10": 0.27,
                "mAP@20": 0.28,
                "mAP@20_ci_low": 0.26,
                "mAP@20_ci_high": 0.30,
            },
            {
                "proxy": "hp",
                "descriptor": "rmac",
                "index": "flat",
                "mAP@1": 0.3,
                "mAP@5": 0.35,
                "mAP@10": 0.37,
                "mAP@20": 0.38,
                "improvement_pct": 35.7,
                "p_value": 0.001,
            },
        ]
    )
    text = table4_markdown(summary)
    assert "0.1694 / 0.2509" not in text and "0.169 / 0.251 / 0.272 / 0.285" in text  # paper R-MAC row
    assert "+35.7% (p<=0.001)" in text and "[0.260, 0.300]" in text
    assert paper_numbers("none", "tn@runs-tn") == paper_numbers("none", "tn")


def test_paper_row_follows_the_proxy_variant_not_its_label():
    rows = [
        {
            "proxy": label,
            "paper_proxy": paper,
            "descriptor": "rmac",
            "index": "flat",
            "mAP@1": 0.1,
            "mAP@5": 0.1,
            "mAP@10": 0.1,
            "mAP@20": 0.1,
        }
        for label, paper in (("paintnet@gpu-paintnet", "paintnet"), ("paintnet@gpu-wo-sp", None))
    ]
    paper_line, ablation_line = table4_markdown(pd.DataFrame(rows)).splitlines()[2:]
    assert paper_line.endswith("|  | 0.250 / 0.331 / 0.362 / 0.432 |") and ablation_line.endswith("| 0.1000 |  |  |")


def test_rank_pages(tmp_path):
    image = np.full((64, 48, 3), 200, np.uint8)
    picture = rank_picture(image, image, [image] * 5, [False, True, False, False, False], tile=(32, 24))
    assert picture.shape[0] == 32 and picture.dtype == np.uint8
    # the second product is framed green
    assert (picture[0, :, 1] == 170).any()
    # the proxy's crop box is drawn on the query photo (first tile), in the proxy's blue, and nowhere without one
    boxed = rank_picture(image, image, [image] * 5, [False] * 5, tile=(64, 48), crop_box=(10, 10, 40, 50))
    assert (boxed[:, :48] == (60, 60, 200)).all(axis=-1).any() and not (picture[:, :24] == (60, 60, 200)).all(-1).any()
    written = []
    page = write_rank_pages(
        [{"label": "none+gem", "query_id": "q<1>", "picture": picture, "rank": 2}],
        tmp_path,
        "ranks",
        lambda path, img: written.append(path),
    )
    text = page.read_text()
    assert "q&lt;1&gt;" in text and "rank 2" in text and written == [tmp_path / "rank_000.png"]


def test_trained_against_untrained_pairs_queries_by_id():
    assert untrained_label("lfnet@run") == "lfnet" and untrained_label("delf@run+sv") == "delf+sv"
    assert untrained_label("lfnet") is None and untrained_label("delf+sv") is None

    def rows(descriptor, ids, aps):
        return pd.DataFrame({"proxy": "none", "descriptor": descriptor, "index": "flat", "query_id": ids, "AP@20": aps})

    per_query = pd.concat(
        [
            rows("lfnet", ["q1", "q2", "q3", "q4"], [0.0, 0.5, 1.0, 0.0]),
            rows("lfnet@run", ["q4", "q3", "q2", "q1"], [0.5, 1.0, 0.5, 1.0]),  # another order: paired by id
            rows("delf+sv", ["q1", "q2"], [1.0, 1.0]),
            rows("delf@run+sv", ["q1", "q2"], [0.5, 0.5]),
            rows("tn@run", ["q1", "q2"], [1.0, 1.0]),  # no untrained tn in the grid: no row
        ]
    )
    table = trained_vs_untrained(per_query, "AP@20").set_index("descriptor")
    assert sorted(table.index) == ["delf@run+sv", "lfnet@run"]
    lfnet = table.loc["lfnet@run"]
    # hand-computed: untrained mean 1.5/4, trained 3/4, per-query differences (1, 0, 0, 0.5)
    assert lfnet["untrained"] == "lfnet" and lfnet["untrained_map"] == pytest.approx(0.375)
    assert lfnet["trained_map"] == pytest.approx(0.75) and lfnet["diff"] == pytest.approx(0.375)
    assert lfnet["diff_ci_low"] >= 0.0 and lfnet["diff_ci_high"] <= 1.0
    delf = table.loc["delf@run+sv"]
    assert delf["diff"] == pytest.approx(-0.5) and delf["diff_ci_low"] == delf["diff_ci_high"] == pytest.approx(-0.5)
