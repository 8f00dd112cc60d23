"""The IsoFLOP study under muP against sp: do the fitted exponents move when every width trains at
a learning rate transferred from a proxy, and do the fits agree better with N counted without the
embedding table (most of these tiny models)?

    B="(5e11, 1e12)"  # the grid both parametrizations run (the committed study: 1e12 to 8e12)
    python -m experiments.studies.sweep --sweep=experiments/scaling/isoflop_small.py \
        --workdir=/tmp/isoflop_sp --sweep.budgets="$B"
    python -m experiments.studies.sweep --sweep=experiments/scaling/isoflop_mup.py \
        --workdir=/tmp/isoflop_mup --sweep.budgets="$B"
    python -m experiments.studies.mup_isoflop --sp_runs=/tmp/isoflop_sp/runs.csv \
        --mup_runs=/tmp/isoflop_mup/runs.csv --budgets=5e11,1e12

Fits approaches 1-3 (llm.science.scaling) with N = total and N = non-embedding parameters to the
sp and mup runs on --budgets, and sets them beside the committed study's fits (--committed_fits:
`python -m llm.scaling` outputs, one per N column). The sp runs are compared with the committed
ones they share (do they still reproduce?). Writes to --out: results.json (every fit),
results.md (the tables), sp_runs.csv and mup_runs.csv, exponents.png and isoflop.png (`--replot`
redraws them from results.json). One seed per run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import pathlib
import shutil

import numpy as np
from absl import app, flags

from llm import config as config_lib
from llm.science import run_table, scaling

N_COLUMNS = ("params", "non_embedding_params")
APPROACHES = ("approach1", "approach2", "approach3")
MARKERS = "os^"  # one per set of runs in the exponent plot


def restrict(table: run_table.Table, budgets: list[float]) -> run_table.Table:
    """The rows of `table` whose run has one of `budgets` and has finished (a row with `final`
    true, where the table says)."""
    keep = np.isclose(table["budget"][:, None], np.array(budgets)[None, :], rtol=1e-6).any(axis=1)
    if "final" in table:
        finished = set(table["run"][table["final"] == "True"])
        keep &= np.isin(table["run"], list(finished))
    return run_table.select(table, keep)


def fit_grid(tables: dict[str, run_table.Table], bootstrap: int, seed: int) -> dict:
    """fit_all of each table (name -> runs) with each N column, in parallel processes:
    {name: {n_column: fit}}."""
    jobs = [(name, col) for name in tables for col in N_COLUMNS]
    with concurrent.futures.ProcessPoolExecutor(len(jobs)) as pool:
        fits = pool.map(
            functools.partial(scaling.fit_all, bootstrap=bootstrap, seed=seed),
            [tables[name] for name, _ in jobs],
            [col for _, col in jobs],
        )
        results = {name: {} for name in tables}
        for (name, col), fit in zip(jobs, fits, strict=True):
            results[name][col] = fit
    return results


def exponent(fit: dict, approach: str, key: str = "a") -> dict | None:
    """{"value", "ci95"} of exponent `key` of one approach's fit, or None where it was skipped."""
    entry = fit[approach].get(key)
    return entry if isinstance(entry, dict) and "value" in entry else None


def reproduction(committed: run_table.Table, rerun: run_table.Table) -> dict:
    """The largest |loss difference| over the (run, step) rows the two tables share."""
    old = {(r, s): x for r, s, x in zip(committed["run"], committed["step"], committed["loss"])}
    diffs = [abs(x - old[(r, s)]) for r, s, x in zip(rerun["run"], rerun["step"], rerun["loss"])
             if (r, s) in old]  # fmt: skip
    return {"rows": len(diffs), "max_abs_loss_difference": max(diffs) if diffs else None}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "skipped"
    low, high = entry.get("ci95", (None, None))
    return f"{entry['value']:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def tables_md(results: dict) -> str:
    """The exponent table (a of N* ∝ C^a per approach, α and β of approach 3) and the agreement
    table (spread of a over approaches; |a_mup - a_sp| per approach on the shared grid)."""
    lines = ["| runs | N | a: approach 1 | a: approach 2 | a: approach 3 | α | β |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name, by_column in results["fits"].items():
        for col, fit in by_column.items():
            cells = [_cell(exponent(fit, a)) for a in APPROACHES]
            cells += [_cell(fit["approach3"].get(k)) for k in ("alpha", "beta")]
            lines.append(f"| {name} | {col} | " + " | ".join(cells) + " |")
    lines += ["", "| N | spread of a over approaches: sp | mup | abs(a_mup - a_sp): 1 | 2 | 3 |"]
    lines.append("|---|---|---|---|---|---|")
    for col, row in results["agreement"].items():
        cells = [row["spread"][p] for p in ("sp", "mup")]
        cells += [row["mup_minus_sp"][a] for a in APPROACHES]
        text = ["—" if c is None else f"{c:.3f}" for c in cells]
        lines.append(f"| {col} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def agreement(sp: dict, mup: dict) -> dict:
    """Per N column: the spread (max - min) of a over the approaches of each parametrization, and
    |a_mup - a_sp| per approach (None where a fit was skipped)."""
    out = {}
    for col in N_COLUMNS:
        fits = {"sp": sp[col], "mup": mup[col]}
        a = {p: {ap: exponent(fit, ap) for ap in APPROACHES} for p, fit in fits.items()}
        values = {p: [e["value"] for e in row.values() if e] for p, row in a.items()}
        out[col] = {
            "spread": {p: max(v) - min(v) if len(v) > 1 else None for p, v in values.items()},
            "mup_minus_sp": {
                ap: abs(a["mup"][ap]["value"] - a["sp"][ap]["value"])
                if a["mup"][ap] and a["sp"][ap]
                else None
                for ap in APPROACHES
            },
        }
    return out


def plot(results: dict, finals: dict[str, run_table.Table], out: pathlib.Path) -> None:
    """exponents.png: a per approach with its 95% interval, per N column and set of fits;
    isoflop.png: final loss against N per budget of `finals` (sp and mup: their last rows)."""
    from llm.science import plots  # matplotlib only when plotting

    fig, axes = plots.figure(1, len(N_COLUMNS), size=(5 * len(N_COLUMNS), 3.8))
    names = list(results["fits"])
    for ax, col in zip(axes, N_COLUMNS, strict=True):
        for i, name in enumerate(names):
            for j, ap in enumerate(APPROACHES):
                e = exponent(results["fits"][name][col], ap)
                if e is None:
                    continue
                x = j + (i - (len(names) - 1) / 2) * 0.2
                if e.get("ci95") and None not in e["ci95"]:  # a bootstrap interval need not
                    ax.vlines(x, *e["ci95"], color=plots.COLORS[i])  # contain its point
                ax.plot([x], [e["value"]], MARKERS[i], color=plots.COLORS[i])
            ax.plot([], [], MARKERS[i], color=plots.COLORS[i], label=name)  # one legend entry
        ax.set_xticks(range(len(APPROACHES)), ["approach 1", "approach 2", "approach 3"])
        ax.set(title=f"N = {col}", ylabel="a in N* ∝ C^a (95% interval)", ylim=(-0.5, 1.5))
        ax.axhline(0.5, color="0.7", lw=0.8, zorder=0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(names))
    note = "one seed per run; bars: 95% intervals (t: approaches 1, 2; bootstrap: 3); gray: a = 0.5"
    plots.save(fig, out / "exponents.png", note=note)

    fig, axes = plots.figure(1, len(N_COLUMNS), size=(5 * len(N_COLUMNS), 3.8))
    for ax, col in zip(axes, N_COLUMNS, strict=True):
        for k, budget in enumerate(sorted(set(finals["sp"]["budget"]))):
            for name in ("sp", "mup"):
                t = restrict(finals[name], [budget])
                order = np.argsort(t[col])
                label = f"{name}, C = {plots.power_of_ten(budget)}"
                style = "o-" if name == "sp" else "s--"
                ax.plot(t[col][order], t["loss"][order], style, color=plots.COLORS[k], label=label)
        ax.set(xscale="log", xlabel=f"N ({col})", ylabel="final eval loss (nats/token)")
        ax.set_title("IsoFLOP profiles")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")
    plots.save(fig, out / "isoflop.png", note="one seed per run; a line joins one budget's runs")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not (f.sp_runs and f.mup_runs and f.budgets):
        raise app.UsageError("--sp_runs=, --mup_runs= (runs.csv files), --budgets= are required.")
    budgets, out = [float(b) for b in f.budgets], pathlib.Path(f.out)
    sp, mup = (restrict(run_table.read_runs(path), budgets) for path in (f.sp_runs, f.mup_runs))
    finals = {"sp": run_table.final_rows(sp), "mup": run_table.final_rows(mup)}
    if f.replot:
        plot(json.loads((out / "results.json").read_text()), finals, out)
        return
    committed = {}
    for path in f.committed_fits:
        fit = json.loads(pathlib.Path(path).read_text())
        committed[fit["n_column"]] = fit
    results = {"budgets": budgets, "fits": {"sp, committed (4 budgets)": committed}}
    results["fits"] |= fit_grid({"sp": sp, "mup": mup}, f.bootstrap, f.seed)
    results["agreement"] = agreement(results["fits"]["sp"], results["fits"]["mup"])
    results["sp_reproduction"] = reproduction(run_table.read_runs(f.committed_runs), sp)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(scaling.to_json(results) + "\n")
    (out / "results.md").write_text(tables_md(results))
    for name, path in (("sp", f.sp_runs), ("mup", f.mup_runs)):
        if pathlib.Path(path).resolve() != (out / f"{name}_runs.csv").resolve():
            shutil.copyfile(path, out / f"{name}_runs.csv")
    plot(results, finals, out)
    print((out / "results.md").read_text())
    print(f"sp rerun against the committed runs: {results['sp_reproduction']}")


def define_flags() -> None:
    flags.DEFINE_string("sp_runs", None, "runs.csv of the sp sweep (experiments.studies.sweep).")
    flags.DEFINE_string("mup_runs", None, "runs.csv of the muP sweep.")
    flags.DEFINE_string(
        "committed_runs", "experiments/scaling/results/runs.csv", "The committed study's runs."
    )
    flags.DEFINE_list(
        "committed_fits",
        [f"experiments/scaling/results/{d}fit.json" for d in ("", "non_embedding/")],
        "The committed study's fit.json files (llm.scaling), one per N column.",
    )
    flags.DEFINE_list("budgets", None, "The budgets (FLOPs) both are fitted on, e.g. 1e12,2e12.")
    flags.DEFINE_string("out", "experiments/results/mup/isoflop", "Where the results go.")
    flags.DEFINE_integer("bootstrap", 200, "Bootstrap fits for approach 3's intervals.")
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
    flags.DEFINE_bool("replot", False, "Redraw the figures from --out's results.json; no fits.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
