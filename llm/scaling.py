"""Fit scaling laws to a table of runs (llm.science.scaling):

python -m llm.scaling --runs=runs.csv --out=/tmp/fits [--holdout]
python -m llm.scaling --runs=runs.csv --out=/tmp/fits --replot   # redraw from /tmp/fits/fit.json
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from llm import config as config_lib
from llm.science import run_table, scaling

APPROACHES = {
    "approach1": "envelope of the loss-vs-compute curves",
    "approach2": "IsoFLOP parabolas",
    "approach3": "parametric L(N, D), bootstrap intervals",
}


def _value(entry: dict) -> str:
    low, high = entry.get("ci95", (None, None))
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
    return f"{entry['value']:.3f}{interval}"


def summary(result: dict, flops: float) -> str:
    """A few lines a reader can take in: each approach's exponents and N*, D* at `flops`."""
    lines = [
        f"{result['runs']} runs, N = {result['n_column']}; allocations at C = {flops:.3g} FLOPs"
    ]
    for name, meaning in APPROACHES.items():
        fit = result[name]
        if "a" not in fit:
            lines.append(f"{name} ({meaning}): {fit.get('skipped', 'no fit')}")
            continue
        if name == "approach3":
            n_opt, d_opt = (float(x) for x in scaling.compute_optimal(fit, flops))
            p = {k: fit[k]["value"] for k in ("E", "A", "B", "alpha", "beta")}
            law = (
                f"; L = {p['E']:.3g} + {p['A']:.3g} / N^{p['alpha']:.3f} "
                f"+ {p['B']:.3g} / D^{p['beta']:.3f}"
            )
        else:
            n_opt = fit["n_coef"] * flops ** fit["a"]["value"]
            d_opt = fit["d_coef"] * flops ** fit["b"]["value"]
            law = ""
        lines.append(
            f"{name} ({meaning}): a = {_value(fit['a'])}, b = {_value(fit['b'])}; "
            f"N* = {n_opt:.3g}, D* = {d_opt:.3g}{law}"
        )
    if "holdout" in result and "skipped" in result["holdout"]:
        lines.append(f"holdout: {result['holdout']['skipped']}")
    elif "holdout" in result:
        h = result["holdout"]
        lines.append(
            f"holdout (budget {h['budget']:.3g} predicted from the others): RMSE of log loss "
            f"{h['rmse_log']:.4f}, worst {h['max_abs_log']:.4f}"
        )
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("runs", None, "CSV of runs (one row per evaluated checkpoint).")
    flags.DEFINE_string("out", None, "Directory for fit.json and the plots.")
    flags.DEFINE_bool("holdout", False, "Also fit without the largest budget and predict it.")
    flags.DEFINE_integer("bootstrap", 200, "Bootstrap fits for approach 3's intervals.")
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
    flags.DEFINE_bool("replot", False, "Redraw the plots of --out's fit.json without fitting.")
    flags.DEFINE_enum(
        "n_column", "params", ["params", "non_embedding_params", "active_params"], "N."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.runs:
        raise app.UsageError("--runs=FILE.csv is required.")
    try:
        table = run_table.read_runs(f.runs)
    except (OSError, ValueError) as e:  # a missing, unreadable or malformed CSV
        print(f"error: --runs={f.runs}: {e}", file=sys.stderr)
        sys.exit(2)
    out = pathlib.Path(f.out) if f.out else pathlib.Path(f.runs).parent
    if f.replot:
        try:
            result = json.loads((out / "fit.json").read_text())
        except (OSError, ValueError) as e:
            print(f"error: --replot reads --out's fit.json: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        kwargs = {"bootstrap": f.bootstrap, "seed": f.seed}
        result = scaling.fit_all(table, f.n_column, **kwargs)
        if f.holdout:
            result["holdout"] = scaling.holdout(table, f.n_column, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    final = run_table.final_rows(table)
    if f.out and "skipped" in result["approach3"]:
        print("no plots: they show approach 3's fit, which was skipped")
    elif f.out:
        from llm.science import plots  # matplotlib only when plotting

        n_column = result["n_column"]
        predicted = scaling.predict_loss(result["approach3"], final[n_column], final["tokens"])
        paths = plots.plot_all(final, run_table.budgets(final), predicted, result, out)
        result["plots"] = [str(p) for p in paths]
    if not f.replot:
        (out / "fit.json").write_text(scaling.to_json(result))
    print(summary(result, float(final["flops"].max())))
    print(f"the whole result: {out / 'fit.json'}" + (" and plots" if f.out else ""))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
