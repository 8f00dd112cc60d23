"""Fit scaling laws to a table of runs (llm.science.scaling):

python -m llm.scaling --runs=runs.csv --out=/tmp/fits [--holdout]
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from llm import config as config_lib
from llm.science import scaling


def define_flags() -> None:
    flags.DEFINE_string("runs", None, "CSV of runs (one row per evaluated checkpoint).")
    flags.DEFINE_string("out", None, "Directory for fit.json and the plots.")
    flags.DEFINE_bool("holdout", False, "Also fit without the largest budget and predict it.")
    flags.DEFINE_integer("bootstrap", 200, "Bootstrap fits for approach 3's intervals.")
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
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
        table = scaling.read_runs(f.runs)
    except (OSError, ValueError) as e:  # a missing, unreadable or malformed CSV
        print(f"error: --runs={f.runs}: {e}", file=sys.stderr)
        sys.exit(2)
    kwargs = {"bootstrap": f.bootstrap, "seed": f.seed}
    result = scaling.fit_all(table, f.n_column, **kwargs)
    if f.holdout:
        result["holdout"] = scaling.holdout(table, f.n_column, **kwargs)
    if f.out:
        from llm.science import plots  # matplotlib only when plotting

        out = pathlib.Path(f.out)
        out.mkdir(parents=True, exist_ok=True)
        final = scaling.final_rows(table)
        predicted = scaling.predict_loss(result["approach3"], final[f.n_column], final["tokens"])
        paths = plots.plot_all(final, scaling.budgets(final), predicted, result, out)
        result["plots"] = [str(p) for p in paths]
        (out / "fit.json").write_text(scaling.to_json(result))
    print(scaling.to_json(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
