"""The muP IsoFLOP comparison: budgets selected, the sp rerun compared row by row with the
committed runs, exponents set side by side and their agreement computed, figures drawn."""

import numpy as np
import pytest

from experiments.studies import mup_isoflop


def table(losses, budgets=(5e11, 1e12, 2e12), widths=(32, 64)) -> dict:
    """Two widths per budget, two evaluations per run; `losses` in that order."""
    rows = [
        (b, w, step, f"c{b:.0e}_w{w}".replace("+", ""))
        for b in budgets
        for w in widths
        for step in (1, 2)
    ]
    b, w, step, run = map(np.array, zip(*rows))
    return {
        "budget": b,
        "params": 4096.0 * w,
        "non_embedding_params": 12.0 * w * w,
        "tokens": step * b / (6 * 4096.0 * w),
        "flops": step * b / 2,
        "loss": np.asarray(losses, float),
        "step": step.astype(float),
        "run": run,
    }


def fit(a1, a3, alpha) -> dict:
    """A fit_all result as llm.science.scaling writes it; approach 2 skipped."""
    return {
        "approach1": {"a": {"value": a1, "ci95": [a1 - 0.1, a1 + 0.1]}},
        "approach2": {"skipped": "no bracketed optimum"},
        "approach3": {
            "a": {"value": a3, "ci95": [a3 - 0.2, a3 + 0.3]},
            "alpha": {"value": alpha, "ci95": [alpha - 0.1, alpha + 0.1]},
            "beta": {"value": 0.3},
        },
    }


def test_restrict_and_reproduction():
    losses = np.linspace(6, 4, 12)
    committed = table(losses)
    rerun = mup_isoflop.restrict(table(losses + 0.01 * np.arange(12)), [5e11, 2e12])
    assert sorted(set(rerun["budget"])) == [5e11, 2e12] and len(rerun["loss"]) == 8
    result = mup_isoflop.reproduction(committed, rerun)
    assert result["rows"] == 8  # the rows they share, matched by run and step
    assert result["max_abs_loss_difference"] == pytest.approx(0.11)  # the last 2e12 row
    unfinished = {**committed, "final": np.where(committed["step"] == 2, "True", "False")}
    unfinished["final"][-1] = "False"  # the last run (2e12, w64) has not reached its last step
    kept = mup_isoflop.restrict(unfinished, [1e12, 2e12])
    assert sorted(set(kept["run"])) == ["c1e12_w32", "c1e12_w64", "c2e12_w32"]


def test_agreement_and_tables():
    sp = {"params": fit(0.6, 0.5, 0.7), "non_embedding_params": fit(0.9, 0.55, 0.4)}
    mup = {"params": fit(0.3, 0.45, 0.9), "non_embedding_params": fit(0.5, 0.5, 0.5)}
    agree = mup_isoflop.agreement(sp, mup)
    assert agree["params"]["spread"] == pytest.approx({"sp": 0.1, "mup": 0.15})
    assert agree["params"]["mup_minus_sp"]["approach1"] == pytest.approx(0.3)
    assert agree["params"]["mup_minus_sp"]["approach2"] is None  # skipped in both
    assert agree["non_embedding_params"]["mup_minus_sp"]["approach3"] == pytest.approx(0.05)
    results = {"fits": {"sp": sp, "mup": mup}, "agreement": agree}
    lines = mup_isoflop.tables_md(results).splitlines()
    assert "| sp | params | 0.600 [0.50, 0.70] | skipped | 0.500 [0.30, 0.80] | 0.700" in lines[2]
    assert lines[3].endswith("| 0.300 |")  # beta without an interval
    assert lines[-2] == "| params | 0.100 | 0.150 | 0.300 | — | 0.050 |"


def test_figures_are_written(tmp_path):
    sp, mup = (mup_isoflop.restrict(table(np.linspace(6, 4, 12) + d), [5e11, 1e12])
               for d in (0.0, -0.1))  # fmt: skip
    finals = {name: {k: v[t["step"] == 2] for k, v in t.items()} for name, t in
              (("sp", sp), ("mup", mup))}  # fmt: skip
    fits = {"params": fit(0.6, 0.5, 0.7), "non_embedding_params": fit(0.9, 0.55, 0.4)}
    mup_isoflop.plot({"fits": {"sp": fits, "mup": fits}}, finals, tmp_path)
    for png in ("exponents.png", "isoflop.png"):
        assert (tmp_path / png).stat().st_size > 10_000
