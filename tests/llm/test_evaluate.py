"""`python -m llm.evaluate`: a checkpoint's eval loss equals the one the trainer logged at that
step; mistakes are one line and exit status 2."""

import json

import pytest

from llm import evaluate
from llm.training.metrics import last_per_step, read_metrics


@pytest.mark.parametrize("step", [3, 6])
def test_the_eval_loss_of_a_step_equals_the_trainers(tiny_run, step):
    result = evaluate.evaluate(f"{tiny_run}@{step}" if step == 3 else str(tiny_run))
    logged = last_per_step(read_metrics(tiny_run))[step]
    assert result["step"] == step
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)


def test_the_command_prints_and_writes_the_result(run_module, tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    done = run_module("llm.evaluate", f"--workdir={tiny_run}@3", "--batches=2", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert done.stdout.startswith(f"step 3: eval loss {result['eval_loss']:.4f}")
    bad = run_module("llm.evaluate", f"--workdir={tiny_run}@4")
    assert bad.returncode == 2 and "no checkpoint of step 4" in bad.stderr, bad.stderr[-2000:]


def test_the_command_runs_lm_eval_tasks(run_module, tiny_run, tmp_path):
    out = tmp_path / "results.json"
    tasks = "--tasks=llm_lab_cloze,llm_lab_passkey_128"
    done = run_module("llm.evaluate", f"--workdir={tiny_run}", "--limit=3", tasks, f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert 0 <= results["results"]["llm_lab_cloze"]["acc,none"] <= 1
    assert results["results"]["llm_lab_passkey_128"]["exact_match,first_number"] == 0  # untrained
    assert results["n-samples"]["llm_lab_cloze"]["effective"] == 3
    assert "|llm_lab_cloze" in done.stdout and "acc_norm" in done.stdout
