"""The one plotting style of every figure (`figure`, `save`), and the plots of the scaling-law fits
of llm.scaling: IsoFLOP curves, frontier, predicted vs observed."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase

Table = dict[str, np.ndarray]  # llm.scaling's table of runs (columns)

# Okabe-Ito: distinguishable with colour-blindness and in greyscale print.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.prop_cycle": matplotlib.cycler(color=COLORS),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.5,
    "lines.markersize": 5,
    "legend.frameon": False,
    "savefig.dpi": 150,
}
FORMATS = tuple(FigureCanvasBase.get_supported_filetypes())  # file suffixes `save` can write


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6, 4)):
    """A new figure with `nrows` x `ncols` axes in the house style: (fig, ax or array of axes).
    Its layout makes room for titles, labels and a legend placed at loc="outside ..."."""
    plt.rcParams.update(STYLE)
    return plt.subplots(nrows, ncols, figsize=size, layout="constrained")


def save(fig, path: str | pathlib.Path, *, note: str | None = None) -> pathlib.Path:
    """Writes `fig` to `path` (its suffix picks the format) and closes it; `note` (e.g. "one seed
    per point") goes along the bottom edge, in grey."""
    if note:
        fig.supxlabel(note, x=0.01, ha="left", fontsize=7, color="0.4")
    fig.savefig(path)
    plt.close(fig)
    return pathlib.Path(path)


def plot_isoflop(
    final: Table, c: np.ndarray, fit2: dict, n_column: str, path: pathlib.Path
) -> None:
    """Final loss vs N per budget `c`, with each budget's fitted parabola and its vertex."""
    fig, ax = figure()
    fitted = {b["budget"]: b for b in fit2["budgets"]}
    for budget, color in zip(np.unique(c), plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(c))))):
        rows = {k: v[c == budget] for k, v in final.items()}
        ax.scatter(rows[n_column], rows["loss"], color=color, label=f"C = {budget:.2g}")
        if budget in fitted:
            b = fitted[budget]
            x = np.linspace(np.log(rows[n_column]).min(), np.log(rows[n_column]).max(), 100)
            ax.plot(np.exp(x), np.polyval(b["parabola"], x), color=color)
            if not b["extrapolated"]:  # a vertex outside the sizes trained is not an optimum
                ax.scatter([b["n_opt"]], [b["loss_opt"]], color=color, marker="*", s=150, zorder=3)
    ax.set(xscale="log", xlabel=f"N ({n_column})", ylabel="final loss", title="IsoFLOP profiles")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_frontier(result: dict, path: pathlib.Path) -> None:
    """N*(C) and D*(C) of the three approaches; approach 3 with its bootstrap 95% band."""
    fig, axes = figure(1, 2, size=(10, 4))
    points = {
        "approach 1 (envelope)": result["approach1"].get("points", []),
        "approach 2 (IsoFLOP)": [
            {"flops": b["budget"], **b}
            for b in result["approach2"]["budgets"]
            if not b["extrapolated"]
        ],
    }
    frontier = result["approach3"]["frontier"]
    flops = np.array([f["flops"] for f in frontier])
    for ax, key in zip(axes, ("n_opt", "d_opt")):
        for label, pts in points.items():
            if pts:
                ax.scatter([p["flops"] for p in pts], [p[key] for p in pts], s=12, label=label)
        ax.plot(flops, [f[key]["value"] for f in frontier], color="k", label="approach 3 (L(N, D))")
        if "ci95" in frontier[0][key]:
            lo, hi = np.array([f[key]["ci95"] for f in frontier]).T
            ax.fill_between(flops, lo, hi, color="k", alpha=0.15, label="approach 3, 95% bootstrap")
        ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=key.replace("_opt", "*"))
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal allocation")
    save(fig, path)


def plot_predicted(
    observed: np.ndarray, predicted: np.ndarray, result: dict, path: pathlib.Path
) -> None:
    """Approach 3's predicted final loss against the observed one (held-out runs marked)."""
    fig, ax = figure(size=(5, 5))
    ax.scatter(observed, predicted, s=15, label="fitted runs")
    if "holdout" in result:
        runs = result["holdout"]["runs"]
        ax.scatter(
            [r["loss"] for r in runs],
            [r["predicted"] for r in runs],
            marker="x",
            color="C3",
            label=f"held out (fit without C = {result['holdout']['budget']:.2g})",
        )
    lims = [observed.min(), observed.max()]
    ax.plot(lims, lims, color="k", lw=0.8)
    ax.set(xlabel="observed loss", ylabel="predicted loss", title="L(N, D) fit")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_all(
    final: Table, c: np.ndarray, predicted: np.ndarray, result: dict, out: pathlib.Path
) -> list[pathlib.Path]:
    """Writes isoflop.png, frontier.png and predicted_vs_observed.png to `out`.

    `final` holds each run's final row, `c` its budget and `predicted` approach 3's loss.
    """
    paths = [out / "isoflop.png", out / "frontier.png", out / "predicted_vs_observed.png"]
    plot_isoflop(final, c, result["approach2"], result["n_column"], paths[0])
    plot_frontier(result, paths[1])
    plot_predicted(final["loss"], predicted, result, paths[2])
    return paths
