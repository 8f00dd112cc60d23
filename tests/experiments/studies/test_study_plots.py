"""The study drivers redraw their committed figures from their committed results (--replot): the
MoE figure's ticks and names, the passkey figure's intervals (against scipy's Wilson interval)."""

import csv
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from experiments.studies import moe_vs_dense, mup_transfer
from llm.science import plots, probes

RESULTS = pathlib.Path(__file__).resolve().parents[3] / "experiments" / "results"


@pytest.mark.parametrize("trials", [16, 5])
def test_wilson_interval_matches_scipy(trials):
    successes = np.arange(trials + 1)
    low, high = probes.wilson_interval(successes / trials, trials)
    for k, lo, hi in zip(successes, low, high):
        expected = stats.binomtest(int(k), trials).proportion_ci(0.95, method="wilson")
        np.testing.assert_allclose([lo, hi], [expected.low, expected.high], atol=1e-4)
    assert high[0] > 0 and low[-1] < 1  # not empty at 0 or 1, unlike p +- SE


def test_moe_figure_names_its_series_and_ticks(monkeypatch):
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path, note=None: kept.append((fig, note)))
    with (RESULTS / "moe_vs_dense" / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    moe_vs_dense.plot(rows, pathlib.Path("unused"))
    ((fig, note),) = kept
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense", "MoE: 8 experts, top-2"]
    np.testing.assert_allclose(ax.get_xticks(), [5e11, 1e12, 2e12, 4e12])
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        r"$5\times10^{11}$",
        "$10^{12}$",
        r"$2\times10^{12}$",
        r"$4\times10^{12}$",
    ]
    assert len(ax.xaxis.get_minorticklocs()) == 0  # no minor labels to collide
    dense = ax.lines[0].get_xydata()
    expected = sorted(
        (float(r["flops"]), float(r["eval_loss"])) for r in rows if r["model"] == "dense"
    )
    np.testing.assert_array_equal(dense, expected)
    assert note == "one seed per point"
    plt.close(fig)


@pytest.mark.parametrize(
    "study, out_flag, figures",
    [
        ("moe_vs_dense", "--out", ["loss_vs_flops.png"]),
        ("sparse_vs_dense", "--out_dir", ["position_loss.png", "passkey.png"]),
        ("long_context", "--out_dir", ["position_loss.png", "passkey.png"]),
    ],
)
def test_replot_from_committed_results(tmp_path, study, out_flag, figures):
    out = tmp_path / study
    shutil.copytree(RESULTS / study, out, ignore=shutil.ignore_patterns("*.png"))
    done = subprocess.run(
        [sys.executable, "-m", f"experiments.studies.{study}", "--replot", f"{out_flag}={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in figures:
        committed = matplotlib.image.imread(RESULTS / study / name)
        assert matplotlib.image.imread(out / name).shape == committed.shape


def test_mup_transfer_figure_has_a_curve_per_width(monkeypatch):
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path, note=None: kept.append((fig, note)))
    with (RESULTS / "mup" / "transfer" / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    mup_transfer.plot(rows, pathlib.Path("unused"))
    ((fig, note),) = kept
    assert [ax.get_title() for ax in fig.axes] == ["sp", "mup"]
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["width 64", "width 128", "width 256"]
        assert ax.get_xlabel() == "log2 learning rate"
        first = ax.lines[0].get_xydata()
        expected = sorted(
            (np.log2(float(r["learning_rate"])), float(r["eval_loss"]))
            for r in rows
            if r["parametrization"] == ax.get_title() and r["width"] == "64"
        )
        np.testing.assert_allclose(first, expected)
    assert note == "one seed per point"
    plt.close(fig)
