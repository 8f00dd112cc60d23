"""Scaling-law fits on a table of runs: Chinchilla approaches 1-3 (Hoffmann et al. 2022).

    python -m llm.scaling --runs=runs.csv --out=/tmp/fits [--holdout]   (the command: llm/scaling.py)

The runs: a table of llm.science.run_table (one row per evaluated checkpoint). N is the
`--n_column` count (total parameters, as Chinchilla counts), D tokens, C flops.

  approach1: the lower envelope of the loss-vs-compute curves gives N*(C), D*(C).
  approach2: a parabola of final loss in log N per IsoFLOP budget gives N*(C); D* = C / (6 N*).
  approach3: L(N, D) = E + A/N^alpha + B/D^beta fitted to final losses with a Huber loss on log
      residuals from a grid of L-BFGS starts (Besiroglu et al. 2024), bootstrap 95% intervals.

Exponents a, b are those of N* ∝ C^a and D* ∝ C^b. Intervals of approaches 1 and 2 are t intervals
of the log-log regression (envelope points are correlated, so approach 1's are optimistic).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
from scipy import optimize, stats

from llm.science.run_table import Table, budgets, final_rows, run_ids, select

HUBER_DELTA = 1e-3
# Chinchilla's initialization grid for (log A, log B, log E, alpha, beta).
INIT_GRID = (
    np.arange(0, 30, 5),
    np.arange(0, 30, 5),
    np.arange(-1, 1.5, 0.5),
    *[np.arange(0, 2.5, 0.5)] * 2,
)


def _interval(value: float, lo: float, hi: float) -> dict:
    return {"value": float(value), "ci95": [float(lo), float(hi)]}


def _summary(value: float, samples: np.ndarray) -> dict:
    """A point estimate with the 95% percentile interval of its bootstrap samples (if any)."""
    if len(samples) == 0:
        return {"value": float(value)}
    return _interval(value, *np.percentile(samples, [2.5, 97.5]))


def power_law(x: np.ndarray, y: np.ndarray) -> dict:
    """y = coef · x^exponent by least squares in log-log, with a 95% t interval on the exponent."""
    fit = stats.linregress(np.log(x), np.log(y))
    dof = len(x) - 2
    half = stats.t.ppf(0.975, dof) * fit.stderr if dof > 0 else math.nan
    return {
        "exponent": _interval(fit.slope, fit.slope - half, fit.slope + half),
        "coef": float(np.exp(fit.intercept)),
    }


def _allocation(n_opt: np.ndarray, d_opt: np.ndarray, flops: np.ndarray) -> dict:
    """Exponents a, b (and coefficients) of N* ∝ C^a, D* ∝ C^b over compute-optimal points."""
    if len(np.unique(flops)) < 2:
        return {"skipped": "fewer than two compute levels"}
    n_law, d_law = power_law(flops, n_opt), power_law(flops, d_opt)
    return {
        "a": n_law["exponent"],
        "b": d_law["exponent"],
        "n_coef": n_law["coef"],
        "d_coef": d_law["coef"],
    }


def approach1(table: Table, n_column: str = "params", grid_size: int = 30) -> dict:
    """Lower envelope of the training curves on log-spaced compute levels between the runs' ends."""
    ids = run_ids(table)
    curves = []
    for run in np.unique(ids):
        rows = select(table, ids == run)
        order = np.argsort(rows["flops"])
        curves.append({k: np.log(rows[k][order]) for k in ("flops", "loss", "tokens", n_column)})
    ends = [c["flops"][-1] for c in curves]
    points = []
    for log_c in np.linspace(min(ends), max(ends), grid_size):
        best = None
        for c in curves:
            if c["flops"][0] <= log_c <= c["flops"][-1]:
                loss = np.interp(log_c, c["flops"], c["loss"])
                if best is None or loss < best[0]:
                    tokens = np.interp(log_c, c["flops"], c["tokens"])
                    best = (loss, c[n_column][-1], tokens)
        if best is not None:
            points.append(
                {
                    "flops": np.exp(log_c),
                    "n_opt": np.exp(best[1]),
                    "d_opt": np.exp(best[2]),
                    "loss": np.exp(best[0]),
                }
            )
    column = {k: np.array([p[k] for p in points]) for k in ("flops", "n_opt", "d_opt")}
    return {**_allocation(column["n_opt"], column["d_opt"], column["flops"]), "points": points}


def approach2(final: Table, n_column: str = "params") -> dict:
    """Per budget, loss = p2 x² + p1 x + p0 in x = log N; its vertex is N*(C); D* = C / (6 N*).

    The exponents are fitted to the vertices inside each budget's range of model sizes only.
    """
    per_budget, skipped = [], []
    c = budgets(final)
    for budget in np.unique(c):
        rows = select(final, c == budget)
        x = np.log(rows[n_column])
        if len(np.unique(x)) < 3:
            skipped.append({"budget": budget, "reason": "fewer than three model sizes"})
            continue
        p2, p1, p0 = np.polyfit(x, rows["loss"], 2)
        if p2 <= 0:
            skipped.append({"budget": budget, "reason": "parabola opens downward"})
            continue
        x_opt = -p1 / (2 * p2)
        per_budget.append(
            {
                "budget": budget,
                "n_opt": np.exp(x_opt),
                "d_opt": budget / (6 * np.exp(x_opt)),
                "loss_opt": p0 - p1**2 / (4 * p2),
                "parabola": [p2, p1, p0],
                "extrapolated": bool(x_opt < x.min() or x_opt > x.max()),
            }
        )
    # A vertex outside the sizes trained is a guess: it is reported, not fitted.
    inside = [b for b in per_budget if not b["extrapolated"]]
    skipped += [
        {"budget": b["budget"], "reason": "optimum outside the model sizes trained"}
        for b in per_budget
        if b["extrapolated"]
    ]
    column = {k: np.array([b[k] for b in inside]) for k in ("budget", "n_opt", "d_opt")}
    return {
        **_allocation(column["n_opt"], column["d_opt"], column["budget"]),
        "budgets": per_budget,
        "skipped_budgets": skipped,
    }


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))


def _objective(theta, log_n, log_d, log_loss):
    """Sum of Huber(log L_pred - log L_obs) and its gradient; theta = (log A, log B, log E, α, β)."""
    log_a, log_b, log_e, alpha, beta = theta
    terms = (log_a - alpha * log_n, log_b - beta * log_d, log_e)
    log_pred = np.logaddexp(np.logaddexp(terms[0], terms[1]), log_e)
    r = log_pred - log_loss
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    w = [dr * np.exp(t - log_pred) for t in terms]  # chain rule through the softmax
    grad = [w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] @ log_n), -(w[1] @ log_d)]
    return _huber(r).sum(), np.array(grad)


def fit_parametric(
    log_n, log_d, log_loss, starts: int = 16, extra: np.ndarray | None = None
) -> np.ndarray:
    """Best L-BFGS-B optimum of the Huber objective from the `starts` best grid points (+ `extra`).

    The grid is Chinchilla's; each point is scored at once and only the best are refined. L-BFGS
    runs on log N and log D centred on their means (A and α decouple), which is ~5x faster.
    """
    grid = np.array(list(itertools.product(*INIT_GRID)))
    log_a, log_b, log_e, alpha, beta = (g[:, None] for g in grid.T)
    log_pred = np.logaddexp(np.logaddexp(log_a - alpha * log_n, log_b - beta * log_d), log_e)
    inits = grid[np.argsort(_huber(log_pred - log_loss).sum(1))[:starts]]
    if extra is not None:
        inits = np.vstack([inits, extra])
    shift = np.zeros((5, 5))
    shift[0, 3], shift[1, 4] = log_n.mean(), log_d.mean()
    to_centred = np.eye(5) - shift  # (log A, log B) -> (log A - α mean log N, log B - β mean log D)
    args = (log_n - log_n.mean(), log_d - log_d.mean(), log_loss)
    best = None
    for x0 in inits:
        res = optimize.minimize(
            _objective, to_centred @ x0, args=args, jac=True, method="L-BFGS-B",
            options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-12},
        )  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    return np.linalg.solve(to_centred, best.x)


def _derived(theta: np.ndarray) -> dict[str, np.ndarray]:
    """E, A, B, α, β and the compute-optimal allocation (C = 6ND) of parameter vector(s) `theta`."""
    log_a, log_b, log_e, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
    log_g = (np.log(alpha * np.exp(log_a - log_b) / beta)) / (alpha + beta)
    return {
        "E": np.exp(log_e),
        "A": np.exp(log_a),
        "B": np.exp(log_b),
        "alpha": alpha,
        "beta": beta,
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
        "G": np.exp(log_g),
    }


def compute_optimal(params: dict, flops) -> tuple:
    """N*, D* = C / (6 N*) at compute C of the parametric law: N* = G · (C / 6)^a.

    `params` holds G and a as arrays (`_derived`) or as approach-3 summaries ({"value": ...}).
    """
    g, a = (params[k]["value"] if isinstance(params[k], dict) else params[k] for k in ("G", "a"))
    n_opt = g * (np.asarray(flops) / 6) ** a
    return n_opt, np.asarray(flops) / (6 * n_opt)


def predict_loss(fit: dict, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """L(N, D) of an approach-3 result."""
    p = {k: fit[k]["value"] for k in ("E", "A", "B", "alpha", "beta")}
    return p["E"] + p["A"] / np.asarray(n) ** p["alpha"] + p["B"] / np.asarray(d) ** p["beta"]


def approach3(
    final: Table, n_column: str = "params", bootstrap: int = 200, seed: int = 0, starts: int = 16
) -> dict:
    """Parametric fit with bootstrap (runs resampled with replacement) 95% percentile intervals;
    skipped (saying why) when the runs cannot determine the law's five parameters."""
    sizes, lengths = (len(np.unique(final[k])) for k in (n_column, "tokens"))
    if len(final["loss"]) < 5 or sizes < 2 or lengths < 2:
        return {
            "skipped": f"{len(final['loss'])} runs with {sizes} model sizes and {lengths} token "
            "counts; L(N, D) needs at least 5 runs, 2 sizes and 2 token counts"
        }
    log_n, log_d, log_loss = (np.log(final[k]) for k in (n_column, "tokens", "loss"))
    theta = fit_parametric(log_n, log_d, log_loss, starts)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        i = rng.integers(0, len(log_n), len(log_n))
        samples.append(fit_parametric(log_n[i], log_d[i], log_loss[i], 2, extra=theta))
    point, boot = _derived(theta), _derived(np.array(samples).reshape(-1, 5))
    result = {k: _summary(point[k], boot[k]) for k in point}
    residuals = np.log(predict_loss(result, final[n_column], final["tokens"])) - log_loss
    result["residuals"] = {
        "rmse_log": float(np.sqrt(np.mean(residuals**2))),
        "max_abs_log": float(np.abs(residuals).max()),
        "runs": len(log_n),
    }
    result["bootstrap"] = {"fits": bootstrap, "seed": seed}
    # The compute-optimal frontier from the smallest budget to 100x the largest.
    result["frontier"] = []
    for c in np.geomspace(final["flops"].min(), 100 * final["flops"].max(), 12):
        (n_point, d_point), (n_boot, d_boot) = compute_optimal(point, c), compute_optimal(boot, c)
        result["frontier"].append(
            {
                "flops": float(c),
                "n_opt": _summary(n_point, n_boot),
                "d_opt": _summary(d_point, d_boot),
            }
        )
    return result


def holdout(table: Table, n_column: str = "params", **kwargs) -> dict:
    """Fits approaches 2 and 3 without the largest budget; predictions for that budget's runs."""
    final = final_rows(table)
    c = budgets(final)
    top = c.max()
    if len(np.unique(c)) < 3:
        return {"skipped": f"{len(np.unique(c))} budgets; predicting one needs at least 3"}
    train = select(final, c < top)
    test = select(final, c == top)
    fit2, fit3 = approach2(train, n_column), approach3(train, n_column, **kwargs)
    predicted = predict_loss(fit3, test[n_column], test["tokens"])
    errors = np.log(predicted) - np.log(test["loss"])
    best = np.argmin(test["loss"])
    return {
        "budget": float(top),
        "fit_budgets": sorted(float(b) for b in np.unique(c[c < top])),
        "runs": [
            {"run": r, "n": float(n), "tokens": float(d), "loss": float(l), "predicted": float(p)}
            for r, n, d, l, p in zip(
                run_ids(test), test[n_column], test["tokens"], test["loss"], predicted
            )
        ],
        "rmse_log": float(np.sqrt(np.mean(errors**2))),
        "max_abs_log": float(np.abs(errors).max()),
        "n_opt_measured_best_run": float(test[n_column][best]),
        "n_opt_approach2": float(fit2["n_coef"] * top ** fit2["a"]["value"])
        if "a" in fit2
        else None,
        "n_opt_approach3": float(compute_optimal(fit3, top)[0]),
    }


def fit_all(table: Table, n_column: str = "params", bootstrap: int = 200, seed: int = 0) -> dict:
    """The three approaches on one table of runs."""
    final = final_rows(table)
    return {
        "n_column": n_column,
        "runs": len(final["loss"]),
        "approach1": approach1(table, n_column),
        "approach2": approach2(final, n_column),
        "approach3": approach3(final, n_column, bootstrap=bootstrap, seed=seed),
    }


def to_json(value) -> str:
    """JSON with numpy scalars as numbers and non-finite numbers as null."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    return json.dumps(clean(value), indent=2)
