"""Checkpoints written before the one-way architecture change still resume, and the same seed
still gives the same losses: both against a run recorded with the code of commit 512206c
(tests/llm/fixtures/run_before_refactor)."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llm.training.metrics import last_per_step, read_metrics

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "run_before_refactor"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
RECORDED = {int(step): values for step, values in EXPECTED["metrics"].items()}


def _train(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """Runs the recorded command (8 CPU devices, from conftest's XLA_FLAGS) in `workdir`."""
    command = [sys.executable, "-m", "llm.train", "--config=experiments/default.py"]
    command += [f"--workdir={workdir}", *EXPECTED["overrides"]]
    root = pathlib.Path(__file__).parents[3]
    result = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return last_per_step(read_metrics(workdir))


def _assert_matches(metrics: dict[int, dict[str, float]], steps: range) -> None:
    assert sorted(metrics) == list(steps)
    for step in steps:
        for name, value in RECORDED[step].items():
            # Bit for bit on the machine that recorded it; 1e-6 leaves room for another CPU's
            # vector width in XLA's reductions.
            np.testing.assert_allclose(metrics[step][name], value, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("mode", ["resume", "fresh"])
def test_same_losses_as_before(tmp_path, mode):
    workdir = tmp_path / "run"
    if mode == "resume":  # the checkpoint of step 3, written by the old code
        shutil.copytree(FIXTURE, workdir, ignore=shutil.ignore_patterns("*.md", "expected.json"))
    metrics = _train(workdir)
    _assert_matches(metrics, range(4, 7) if mode == "resume" else range(1, 7))
