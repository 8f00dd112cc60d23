"""python -m llm.checkpoints: a run's steps with size, time and losses, each read back; damage is
named with its file and exit status 1; a usage mistake is one line and exit status 2."""

import json
import shutil
import time

import jax.numpy as jnp
import pytest

from llm import checkpoints
from llm.training import checkpoint
from llm.training.state import TrainState


def test_steps_of_a_run_with_their_losses(run_module, tiny_run):
    started = time.time()
    steps = checkpoints.list_steps(tiny_run)
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert [s.step for s in steps] == [3, 6]
    for s in steps:
        files = [p for p in (tiny_run / "checkpoints" / str(s.step)).rglob("*") if p.is_file()]
        assert s.size == sum(p.stat().st_size for p in files) > 0
        assert s.saved <= started
        assert (s.loss, s.eval_loss) == (by_step[s.step]["loss"], by_step[s.step]["eval_loss"])
        assert s.problem is None

    result = run_module("llm.checkpoints", f"--workdir={tiny_run}")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert (
        rows[0] == f"{tiny_run}: 2 checkpoint step(s), {sum(s.size for s in steps) / 2**20:.2f} MiB"
    )
    assert rows[2].split()[0] == "3" and rows[2].split()[-2:] == [
        f"{by_step[3]['eval_loss']:.4f}",
        "ok",
    ]
    assert rows[3].split()[0] == "6" and rows[3].endswith("ok")


@pytest.mark.parametrize(
    "damage, file",
    [
        ("truncate", "params/d/"),  # an array file cut short
        ("delete", "opt_state/_METADATA"),  # missing metadata
    ],
)
def test_damaged_step_is_named_and_fails(run_module, tiny_run, tmp_path, damage, file):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    target = min((run / "checkpoints" / "6").glob(file + "*"))
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    else:
        target.unlink()
    (run / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()

    result = run_module("llm.checkpoints", f"--workdir={run}")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].endswith("ok") and lines[3].endswith("FAILED")
    assert lines[4].startswith(f"step 6: checkpoint step directory {run}/checkpoints/6 is corrupt")
    assert f"file {target}" in lines[4]
    assert lines[5].startswith("9.orbax-checkpoint-tmp-1: a partial save, not committed")

    # --noverify lists without reading arrays
    listed = run_module("llm.checkpoints", f"--workdir={run}", "--noverify")
    assert listed.returncode == 0 and "FAILED" not in listed.stdout, listed.stdout


def _state(step: int, value: float) -> TrainState:
    return TrainState(
        step=jnp.array(step, jnp.int32),
        params={"w": jnp.full((4, 4), value, jnp.bfloat16)},
        opt_state={"m": jnp.zeros((4,))},
        guard={"skipped": jnp.zeros((), jnp.int32)},
    )


def test_verify_finds_non_finite_values_and_a_wrong_step(tmp_path):
    manager = checkpoint.make_manager(tmp_path, keep=3, async_save=False)
    for step, value in [(1, 1.0), (2, float("nan")), (3, 1.0)]:
        checkpoint.save(manager, _state(step, value))
    checkpoint.wait(manager)
    (tmp_path / "checkpoints" / "3").rename(tmp_path / "checkpoints" / "4")

    problems = {s.step: s.problem for s in checkpoints.list_steps(tmp_path)}
    assert problems[1] is None
    assert problems[2].startswith("non-finite values in params['w']")
    assert problems[4] == "its train state says step 3, not 4."


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/nonexistent/run"], "/nonexistent/run is not a training run"),
        ([], "pass --workdir=DIR"),
        (["--workdir=/tmp", "--nosuchflag"], "nosuchflag"),
    ],
)
def test_usage_mistakes_are_one_line(run_module, args, message):
    result = run_module("llm.checkpoints", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_run_without_checkpoints_is_one_line(run_module, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run_module("llm.checkpoints", f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr == f"error: no checkpoint in {tmp_path}/checkpoints yet.\n"
