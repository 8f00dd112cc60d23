"""The one plotting style of every figure (`figure`, `save`), and the plots of the scaling-law fits
of llm.scaling: IsoFLOP curves, frontier, predicted vs observed."""

from __future__ import annotations

import pathlib

import matplotlib
import matplotlib.pyplot as plt  # no backend forced: Agg without a display, notebooks keep theirs
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase

from llm.science.run_table import Table

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


def power_of_ten(x: float) -> str:
    """4e12 -> "4×10¹²" in mathtext (1e12 -> "10¹²"), for labels of FLOPs and token counts."""
    mantissa, exponent = f"{x:.1e}".split("e")  # rounded first: 9.99e11 -> 1.0e+12
    mantissa, exponent = float(mantissa), int(exponent)
    head = "" if mantissa == 1 else f"{mantissa:g}\\times"
    return f"${head}10^{{{exponent}}}$"


def plot_isoflop(
    final: Table, c: np.ndarray, fit2: dict, n_column: str, path: pathlib.Path
) -> None:
    """Final loss vs N per budget `c`, with each budget's fitted parabola and its vertex."""
    fig, ax = figure(size=(9, 4))
    fitted = {b["budget"]: b for b in fit2["budgets"]}
    for budget, color in zip(np.unique(c), plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(c))))):
        rows = {k: v[c == budget] for k, v in final.items()}
        label = f"C = {power_of_ten(budget)} FLOPs"
        b = fitted.get(budget)
        if b is not None and b["extrapolated"]:  # a vertex outside the sizes trained: no optimum
            label += " (minimum not bracketed: no star)"
        ax.scatter(rows[n_column], rows["loss"], color=color, label=label)
        if b is not None:
            x = np.linspace(np.log(rows[n_column]).min(), np.log(rows[n_column]).max(), 100)
            ax.plot(np.exp(x), np.polyval(b["parabola"], x), color=color)
            if not b["extrapolated"]:
                ax.scatter([b["n_opt"]], [b["loss_opt"]], color=color, marker="*", s=150, zorder=3)
    if any(not b["extrapolated"] for b in fitted.values()):
        ax.scatter([], [], color="0.3", marker="*", s=150, label="fitted parabola's minimum")
    ax.set(
        xscale="log",
        xlabel=f"N ({n_column})",
        ylabel="final eval loss (nats/token)",
        title="IsoFLOP profiles",
    )
    fig.legend(loc="outside right upper")
    save(fig, path, note="one seed per run")


def plot_frontier(result: dict, path: pathlib.Path) -> None:
    """N*(C) and D*(C) of the three approaches; approach 3 with its bootstrap 95% band, dashed
    and lighter beyond the budgets trained (shaded), up to 10x past them."""
    fig, axes = figure(1, 2, size=(10, 4))
    points = {
        "approach 1 (envelope)": result["approach1"].get("points", []),
        "approach 2 (IsoFLOP)": [
            {"flops": b["budget"], **b}
            for b in result["approach2"]["budgets"]
            if not b["extrapolated"]
        ],
    }
    trained = [b["budget"] for b in result["approach2"]["budgets"]]  # every budget of the runs
    low, high = min(trained), max(trained)
    frontier = [f for f in result["approach3"]["frontier"] if f["flops"] <= 10 * high]
    flops = np.array([f["flops"] for f in frontier])
    inside = flops <= high * 1.01
    beyond = flops >= flops[inside].max()  # joins the solid part
    for ax, key in zip(axes, ("n_opt", "d_opt")):
        ax.axvspan(low, high, color="#fbeec9", zorder=0, label="budgets trained")
        for label, pts in points.items():
            if pts:
                ax.scatter([p["flops"] for p in pts], [p[key] for p in pts], s=12, label=label)
        values = np.array([f[key]["value"] for f in frontier])
        ax.plot(flops[inside], values[inside], color="k", label="approach 3 (L(N, D))")
        ax.plot(flops[beyond], values[beyond], "k--", label="approach 3, extrapolated")
        if "ci95" in frontier[0][key]:
            lo, hi = np.array([f[key]["ci95"] for f in frontier]).T
            ax.fill_between(flops, lo, hi, where=inside, color="k", alpha=0.15,
                            label="approach 3, 95% bootstrap")  # fmt: skip
            ax.fill_between(flops, lo, hi, where=beyond, color="k", alpha=0.06)
        ylabel = {"n_opt": "N* (parameters)", "d_opt": "D* (tokens)"}[key]
        ax.set(xscale="log", yscale="log", xlabel="C (training FLOPs)", ylabel=ylabel)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3)
    fig.suptitle("Compute-optimal allocation")
    save(fig, path, note="one seed per run")


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
            color=COLORS[1],
            label=f"held out (fit without C = {power_of_ten(result['holdout']['budget'])})",
        )
    lims = [observed.min(), observed.max()]
    ax.plot(lims, lims, color="k", lw=0.8, label="y = x (perfect prediction)")
    ax.set(
        xlabel="observed final loss (nats/token)",
        ylabel="predicted final loss (nats/token)",
        title="L(N, D) fit",
    )
    ax.legend()
    save(fig, path, note="one seed per run")


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
