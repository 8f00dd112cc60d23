"""python -m llm.plot: the curves drawn are metrics.jsonl's (the last record of a replayed step),
one legend entry per run, an image is written; a mistake is one line and exit status 2."""

import json
import shutil

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from llm import plot


@pytest.fixture
def resumed_run(tiny_run, tmp_path):
    """tiny_run with steps 5 and 6 logged again (as after a resume), at other values."""
    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": 5.0, "learning_rate": 0.5}) + "\n")
        f.write(json.dumps({"step": 6, "loss": 6.0, "learning_rate": 0.5, "eval_loss": 2.0}) + "\n")
    return run


def test_curves_are_the_runs_records(tiny_run, resumed_run):
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    runs = {"a": plot.read_run(tiny_run), "b": plot.read_run(resumed_run)}
    fig = plot.draw(runs)
    axes = {ax.get_title(): ax for ax in fig.axes}
    for field, _, title in plot.PANELS:
        a, b = (line.get_xydata() for line in axes[title].lines)
        expected = [(r["step"], r[field]) for r in records if field in r]
        np.testing.assert_array_equal(a, expected)
        if field == "eval_loss":
            np.testing.assert_array_equal(b, [expected[0], (6, 2.0)])
    b_loss = axes["train loss"].lines[1].get_xydata()
    np.testing.assert_array_equal(b_loss[:, 0], [1, 2, 3, 4, 5, 6])  # one point per step
    np.testing.assert_array_equal(b_loss[4:, 1], [5.0, 6.0])  # the replayed records
    b_throughput = axes["throughput"].lines[1].get_xydata()
    np.testing.assert_array_equal(b_throughput[:, 0], [1, 2, 3, 4])  # not logged again
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "step (optimizer updates)" and ax.get_ylabel()
    plt.close(fig)


def test_cli_writes_the_figure(run_module, tiny_run, resumed_run, tmp_path):
    out = tmp_path / "curves.png"
    result = run_module("llm.plot", f"--workdir={tiny_run}", f"--out={out}", str(resumed_run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}:") and "2 run(s)" in result.stdout
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (900, 1350)  # 9 x 6 inches at 150 dpi
    assert image[..., :3].std() > 0.05  # not blank


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/nonexistent/run", "--out=OUT"], "/nonexistent/run/metrics.jsonl not found"),
        (["--out=OUT"], "pass --workdir=DIR"),
        (["--workdir=RUN", "--out=curves.txt"], "name a file ending in one of"),
        (["--workdir=EMPTY", "--out=OUT"], "has no complete record yet"),
    ],
)
def test_mistakes_are_one_line(run_module, tiny_run, tmp_path, args, message):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')  # cut by a kill
    out = tmp_path / "x.png"
    args = [
        a.replace("RUN", str(tiny_run)).replace("EMPTY", str(tmp_path)).replace("OUT", str(out))
        for a in args
    ]
    result = run_module("llm.plot", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()
