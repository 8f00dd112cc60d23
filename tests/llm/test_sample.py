"""`python -m llm.sample`: a user's mistake is one line and exit status 2, before any model is
loaded."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p=0"], "error: top_p must be in (0, 1]"),
        (["--max_new_tokens=-5"], "error: max_new_tokens must be >= 1, got -5"),
    ],
)
def test_mistakes_exit_2_with_one_line(tmp_path, flags, message):
    done = subprocess.run(
        [sys.executable, "-m", "llm.sample", f"--workdir={tmp_path / 'none'}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
