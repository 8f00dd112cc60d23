"""llm.mup_check: at tiny widths, a few Adam steps make sp's activations grow with width while
muP's stay flat; the command writes its figure and statistics, and refuses bad input in a line."""

import numpy as np
import pytest

from llm import config as config_lib
from llm import mup_check

WIDTHS = [32, 64, 128]


@pytest.fixture(scope="module")
def results(tiny_config_shared):
    config = config_lib.with_overrides(tiny_config_shared, {"optimizer.learning_rate": 1e-2})
    return mup_check.coordinate_check(config, WIDTHS, steps=3)


def test_mup_is_flat_with_width_and_sp_grows(results):
    fitted = mup_check.slopes(results)  # after the last step
    for kind in ("attention", "mlp", "residual", "logits"):
        assert abs(fitted["mup"][kind]) < 0.5, (kind, fitted)
        assert fitted["sp"][kind] > 1.0, (kind, fitted)
    for p in ("sp", "mup"):  # the embedding is input-like in both: its size never depends on width
        assert abs(fitted[p]["embedding"]) < 0.1


def test_history_has_each_step_and_width(results):
    for by_width in results.values():
        assert list(by_width) == WIDTHS
        for history in by_width.values():
            assert len(history) == 4  # initialization, then 3 steps
            assert all(np.isfinite(list(h.values())).all() for h in history)
    # At initialization muP's hidden outputs are width-independent and sp's grow (constant std).
    assert mup_check.slopes(results, step=0)["sp"]["attention"] > 0.8


def test_plot_is_written(tmp_path, results):
    path = mup_check.plot(results, tmp_path / "coord_check.png", note="test")
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--widths=64"], "two or more"),
        (["--widths=64,128", "--config.model.mup_readout=zeros"], "mup_readout='zeros'"),
    ],
)
def test_bad_input_is_one_line(run_module, args, message):
    result = run_module("llm.mup_check", "--steps=1", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
