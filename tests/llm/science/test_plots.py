"""llm.science.plots: the one figure style, and the scaling plots of the committed study: what
their legends, ranges and notes say; `llm.scaling --replot` redraws them from fit.json."""

import json
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from llm.science import plots, run_table, scaling

REPO = pathlib.Path(__file__).resolve().parents[3]
RESULTS = REPO / "experiments" / "scaling" / "results"


@pytest.mark.parametrize(
    "x, text",
    [(4e12, r"$4\times10^{12}$"), (1e12, "$10^{12}$"), (5e11, r"$5\times10^{11}$"),
     (1.6e13, r"$1.6\times10^{13}$"), (9.99e11, "$10^{12}$")],
)  # fmt: skip
def test_power_of_ten(x, text):
    assert plots.power_of_ten(x) == text


def test_save_writes_the_style_and_the_note(tmp_path):
    fig, ax = plots.figure(size=(4, 3))
    ax.plot([1, 2], [3, 4])
    assert not ax.spines["top"].get_visible() and ax.xaxis.get_gridlines()[0].get_visible()
    path = plots.save(fig, tmp_path / "f.png", note="one seed")
    assert matplotlib.image.imread(path).shape[:2] == (450, 600)  # 4 x 3 inches at 150 dpi
    assert fig._supxlabel.get_text() == "one seed"
    assert not plt.fignum_exists(fig.number)


@pytest.fixture(scope="module")
def drawn():
    """The committed study's three figures, kept instead of written: {file name: (fig, note)}."""
    figures = {}
    original = plots.save
    plots.save = lambda fig, path, note=None: figures.setdefault(
        pathlib.Path(path).name, (fig, note)
    )
    try:
        result = json.loads((RESULTS / "fit.json").read_text())
        final = run_table.final_rows(run_table.read_runs(RESULTS / "runs.csv"))
        predicted = scaling.predict_loss(result["approach3"], final["params"], final["tokens"])
        plots.plot_all(final, run_table.budgets(final), predicted, result, pathlib.Path("unused"))
    finally:
        plots.save = original
    yield result, figures
    for fig, _ in figures.values():
        plt.close(fig)


def _legend(fig) -> list[str]:
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_isoflop_legend(drawn):
    result, figures = drawn
    fig, note = figures["isoflop.png"]
    labels = _legend(fig)
    bracketed = [b for b in result["approach2"]["budgets"] if not b["extrapolated"]]
    assert len(bracketed) == 3 and "fitted parabola's minimum" in labels
    assert "C = $10^{12}$ FLOPs (minimum not bracketed: no star)" in labels
    assert r"C = $8\times10^{12}$ FLOPs" in labels
    assert not any("e+" in label for label in labels)
    stars = [c for c in fig.axes[0].collections if c.get_offsets().shape == (1, 2)]
    assert len(stars) == len(bracketed)
    assert note == "one seed per run"


def test_frontier_marks_the_data_and_stops_10x_past(drawn):
    result, figures = drawn
    fig, note = figures["frontier.png"]
    high = max(b["budget"] for b in result["approach2"]["budgets"])
    for ax in fig.axes:
        solid, dashed = (line.get_xdata() for line in ax.lines)
        assert max(solid) <= high * 1.01 < max(dashed) <= 10 * high
        assert min(dashed) == max(solid)  # the extrapolation continues the line
        (span,) = [p for p in ax.patches if p.get_label() == "budgets trained"]
        np.testing.assert_allclose(span.get_x() + span.get_width(), high)
    assert {"budgets trained", "approach 3, extrapolated"} <= set(_legend(fig))
    assert note == "one seed per run"


def test_predicted_names_the_diagonal(drawn):
    _, figures = drawn
    fig, note = figures["predicted_vs_observed.png"]
    assert "y = x (perfect prediction)" in _legend(fig)
    assert note == "one seed per run"


def _scaling(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm.scaling", f"--runs={RESULTS / 'runs.csv'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_replot_redraws_without_fitting(tmp_path):
    shutil.copy(RESULTS / "fit.json", tmp_path)
    done = _scaling(f"--out={tmp_path}", "--replot")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "fit.json").read_bytes() == (RESULTS / "fit.json").read_bytes()
    for name in ("isoflop.png", "frontier.png", "predicted_vs_observed.png"):
        assert matplotlib.image.imread(tmp_path / name).shape[0] > 300

    missing = _scaling(f"--out={tmp_path / 'none'}", "--replot")
    assert missing.returncode == 2 and missing.stderr.startswith("error: --replot reads"), (
        missing.stderr
    )
