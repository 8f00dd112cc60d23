"""Scaling-law fits recover a known law; the CLI writes its outputs; the sweep plans, resumes and
collects its runs."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llm import config as config_lib
from llm.science import flops, run_table, scaling

TRUE = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}


def law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def isoflop_table(noise: float, seed: int = 0, fractions=(1.0,)) -> run_table.Table:
    """9 model sizes x 5 budgets; each run evaluated at `fractions` of its tokens (C = 6ND)."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in np.geomspace(1e17, 1e21, 5):
        for n in np.geomspace(1e7, 1e10, 9):
            for f in fractions:
                d = f * budget / (6 * n)
                loss = law(n, d) * np.exp(rng.normal(0, noise))
                rows.append((n, d, 6 * n * d, loss, budget, f"{budget:.0e}_{n:.0e}"))
    n, d, c, loss, budget, run = map(np.array, zip(*rows))
    return {
        "params": n,
        "non_embedding_params": n,
        "active_params": n,
        "tokens": d,
        "flops": c,
        "loss": loss,
        "budget": budget,
        "run": run,
    }


def test_approach3_recovers_known_law_with_intervals():
    # Intervals are 95% per parameter, so one of the five misses the truth for some noise draws
    # (data seed 0 misses E by 4e-4); this draw covers all five.
    fit = scaling.approach3(isoflop_table(noise=0.001, seed=1), bootstrap=20, seed=0)
    for name, truth in TRUE.items():
        assert fit[name]["value"] == pytest.approx(truth, rel=0.04), name
        lo, hi = fit[name]["ci95"]
        assert lo <= truth <= hi, name
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit["a"]["value"] == pytest.approx(a, rel=0.02)
    assert fit["b"]["value"] == pytest.approx(1 - a, rel=0.02)
    assert fit["residuals"]["rmse_log"] < 0.002


def test_approach2_exact_on_noise_free_parabolas():
    rows = []
    for budget in [1e18, 1e19, 1e20]:
        n_opt = 0.1 * budget**0.5
        for n in n_opt * np.geomspace(0.1, 10, 5):
            rows.append((n, budget / (6 * n), budget, 2 + 0.05 * np.log(n / n_opt) ** 2))
    n, d, c, loss = map(np.array, zip(*rows))
    table = {"params": n, "tokens": d, "flops": c, "loss": loss}  # no budget column: grouped
    fit = scaling.approach2(table)
    for b in fit["budgets"]:
        assert b["n_opt"] == pytest.approx(0.1 * b["budget"] ** 0.5, rel=1e-6)
        assert b["loss_opt"] == pytest.approx(2.0, rel=1e-9)
    assert fit["a"]["value"] == pytest.approx(0.5, abs=1e-6)
    assert fit["b"]["value"] == pytest.approx(0.5, abs=1e-6)


def test_approach2_fits_exponents_to_vertices_inside_the_sizes_trained():
    rows = []
    for budget in [1e18, 1e19, 1e20, 1e21]:
        n_opt = 0.1 * budget**0.5
        # The smallest budget's sizes all lie above its optimum: its vertex is extrapolated.
        grid = np.geomspace(3, 30, 5) if budget == 1e18 else np.geomspace(0.1, 10, 5)
        for n in n_opt * grid:
            rows.append((n, budget / (6 * n), budget, 2 + 0.05 * np.log(n / n_opt) ** 2))
    n, d, c, loss = map(np.array, zip(*rows))
    fit = scaling.approach2({"params": n, "tokens": d, "flops": c, "loss": loss})
    assert [b["extrapolated"] for b in fit["budgets"]] == [True, False, False, False]
    (skipped,) = fit["skipped_budgets"]
    assert skipped["budget"] == pytest.approx(1e18)
    assert skipped["reason"] == "optimum outside the model sizes trained"
    assert fit["a"]["value"] == pytest.approx(0.5, abs=1e-6)


def test_approach1_envelope_follows_compute_optimal_frontier():
    table = isoflop_table(noise=0.0, fractions=np.geomspace(0.05, 1, 8))
    fit = scaling.approach1(table)
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit["a"]["value"] == pytest.approx(a, abs=0.05)
    assert fit["b"]["value"] == pytest.approx(1 - a, abs=0.05)


def test_cli_writes_json_and_plots(tmp_path):
    table = isoflop_table(noise=0.002)
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        writer.writerows(zip(*table.values()))
    out = tmp_path / "fits"
    command = [sys.executable, "-m", "llm.scaling", f"--runs={path}", f"--out={out}"]
    done = subprocess.run(
        [*command, "--holdout", "--bootstrap=3"],
        cwd=pathlib.Path(__file__).parents[3],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "fit.json").read_text())
    lines = done.stdout.splitlines()  # a summary to read, not the JSON
    assert lines[0].startswith(f"{result['runs']} runs, N = params; allocations at C = ")
    for approach in ("approach1", "approach2", "approach3", "holdout"):
        assert sum(line.startswith(approach) for line in lines) == 1, done.stdout
    a3 = result["approach3"]["a"]["value"]
    assert f"a = {a3:.3f} [" in next(line for line in lines if line.startswith("approach3"))
    assert lines[-1] == f"the whole result: {out / 'fit.json'} and plots"
    for approach in ("approach1", "approach2", "approach3"):
        assert {"a", "b"} <= set(result[approach])
    assert set(TRUE) <= set(result["approach3"])
    assert len(result["holdout"]["runs"]) == 9 and result["holdout"]["rmse_log"] < 0.05
    for png in ("isoflop.png", "frontier.png", "predicted_vs_observed.png"):
        assert (out / png).stat().st_size > 1000


def tiny_sweep():
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "base": "experiments/default.py",
            "budgets": (2e9, 4e9),
            "shapes": tuple(
                {"embed_dim": w, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "mlp_dim": w}
                for w in (32, 64)
            ),
            "min_steps": 2,
            "evals_per_run": 2,
            "warmup_fraction": 0.1,
            "learning_rate": 3e-3,
            "parametrization": "sp",
            "mup_base_width": 32,
            "mup_base_head_dim": 32,
            "overrides": {"batch_size": 8, "seq_len": 32, "sample_prompt": ""},
        }
    )


def test_sweep_runs_take_its_parametrization_and_learning_rate(tmp_path):
    from experiments.studies import sweep

    sp = sweep.plan(tiny_sweep())
    mup_sweep = tiny_sweep()
    mup_sweep.update(parametrization="mup", learning_rate=1e-2)
    runs = sweep.plan(mup_sweep)
    assert [r.steps for r in runs] == [r.steps for r in sp]  # muP leaves the FLOPs unchanged
    base = config_lib.load_config("experiments/default.py")
    for run in runs:
        exp = config_lib.resolve(config_lib.with_overrides(base, run.overrides))
        assert exp.optimizer.learning_rate == 1e-2 and exp.model.parametrization == "mup"
        assert exp.model.width_multiplier == run.overrides["model.embed_dim"] / 32
        assert exp.model.mup_base_head_dim == 32
    assert all("model.mup_base_width" not in r.overrides for r in sp)  # sp runs stay sp

    def fake_train(config, workdir):
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        sweep.metrics.MetricsWriter(workdir, tensorboard=False).write(
            config.steps, {"loss": 4.0, "eval_loss": 4.0}
        )

    table = run_table.read_runs(sweep.run_sweep(mup_sweep, str(tmp_path), train_fn=fake_train))
    assert set(table["parametrization"]) == {"mup"} and set(table["learning_rate"]) == {0.01}


def test_a_sweep_mistake_is_one_line_before_anything_is_written(tmp_path):
    from experiments.studies import sweep

    bad = tiny_sweep()
    bad.update(parametrization="mup", mup_base_width=0)
    with pytest.raises(config_lib.ConfigError, match="mup_base_width must be a positive"):
        sweep.run_sweep(bad, str(tmp_path / "sweep"))
    assert not (tmp_path / "sweep").exists()
    done = subprocess.run(
        [sys.executable, "-m", "experiments.studies.sweep"]
        + ["--sweep=experiments/scaling/isoflop_small.py", f"--workdir={tmp_path / 'cli'}"]
        + ["--sweep.parametrization=mu"],
        cwd=pathlib.Path(__file__).parents[3],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 2 and not (tmp_path / "cli").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: a run of --sweep=experiments/scaling/isoflop_small.py")
    assert "parametrization='mu' is not one of" in line


def test_sweep_plans_resumes_and_collects(tmp_path):
    from experiments.studies import sweep

    calls = []

    def fake_train(config, workdir):  # evaluates every eval_every steps with a made-up loss
        calls.append(workdir)
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        writer = sweep.metrics.MetricsWriter(workdir, tensorboard=False)
        for step in range(config.eval_every, config.steps + 1, config.eval_every):
            writer.write(step, {"loss": 5.0, "eval_loss": 5.0 - step / config.steps})
        if config.steps % config.eval_every:
            writer.write(config.steps, {"loss": 4.0, "eval_loss": 4.0})

    runs = sweep.plan(tiny_sweep())
    assert len(runs) == 4 and all(r.steps >= 2 for r in runs)
    for run in runs:  # the budget sets the steps: C = flops per token x tokens
        cfg = config_lib.model_config(
            config_lib.with_overrides(
                config_lib.load_config("experiments/default.py"), run.overrides
            )
        )
        tokens = (run.steps + 1) * 8 * 32
        assert run.steps * 8 * 32 <= run.budget / flops.train_flops_per_token(cfg, 32) < tokens

    csv_path = sweep.run_sweep(tiny_sweep(), str(tmp_path), train_fn=fake_train)
    assert len(calls) == 4
    (tmp_path / runs[0].name / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    sweep.run_sweep(tiny_sweep(), str(tmp_path), train_fn=fake_train)  # reruns the unfinished one
    assert calls[4:] == [str(tmp_path / runs[0].name)]

    table = run_table.read_runs(csv_path)
    assert set(table["run"]) == {r.name for r in runs} and len(table["run"]) >= 8
    final = run_table.final_rows(table)
    # Each run spends its budget, short of one step at most (steps are whole).
    assert np.all(final["flops"] <= final["budget"])
    assert np.all(final["budget"] < final["flops"] * (final["step"] + 1) / final["step"])

    sweep.run_sweep(tiny_sweep(), str(tmp_path / "cluster"), print_commands=True)
    commands = (tmp_path / "cluster" / "commands.sh").read_text().splitlines()
    assert len(commands) == 4 and all(
        c.startswith("python -m llm.train --config=") for c in commands
    )
    assert f"--config.steps={runs[0].steps}" in commands[0]


def _write(path, table):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        writer.writerows(zip(*table.values()))
    return path


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("loss", float("nan"), "column 'loss' must be finite and > 0; line 4 has nan"),
        ("params", -5.0, "column 'params' must be finite and > 0; line 4 has -5.0"),
        ("tokens", 0.0, "column 'tokens' must be finite and > 0; line 4 has 0.0"),
        ("flops", "many", "column 'flops' has a non-number on line 4"),
    ],
)
def test_runs_that_cannot_be_fitted_are_refused(tmp_path, column, value, message):
    table = {k: list(v) for k, v in isoflop_table(noise=0.0).items()}
    table[column][2] = value
    with pytest.raises(ValueError, match=message):
        run_table.read_runs(_write(tmp_path / "runs.csv", table))


def test_too_few_runs_skip_the_parametric_fit_and_the_holdout():
    full = isoflop_table(noise=0.0)
    table = run_table.select(full, np.arange(len(full["loss"])) < 3)  # one budget's first 3 runs
    final = run_table.final_rows(table)
    assert "at least 5 runs" in scaling.approach3(final)["skipped"]
    assert "at least 3" in scaling.holdout(table)["skipped"]
