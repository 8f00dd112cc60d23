"""The compression study's summary: gaps within a seed, mean and std over the seeds that have
the run (seeds merged from several invocations may hold different runs)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments.studies import compression


def test_summary_takes_gaps_within_seeds_over_the_seeds_that_have_the_run():
    # fmt: off
    per_seed = [
        {"float32": {"eval_loss": 5.9}, "nm_2_4": {"eval_loss": 5.6}, "ptq_int4": {
            "eval_loss": 5.91, "memory_after": 7, "disk_after": 5}},
        {"float32": {"eval_loss": 6.3}, "nm_2_4": {"eval_loss": 6.2}},
        {"float32": {"eval_loss": 5.8}, "nm_2_4": {"eval_loss": 5.9}, "ptq_int4": {
            "eval_loss": 5.8, "memory_after": 4, "disk_after": 3}},
        {"student_scratch": {"eval_loss": 6.0, "steps": 150},
         "student_distilled": {"eval_loss": 5.7, "steps": 150}},
    ]
    # fmt: on
    s = compression.summarize(per_seed)
    gaps = np.array([5.6 - 5.9, 6.2 - 6.3, 5.9 - 5.8])
    assert s["nm_2_4"]["n"] == 3
    assert s["nm_2_4"]["gap_mean"] == pytest.approx(gaps.mean())
    assert s["nm_2_4"]["gap_std"] == pytest.approx(gaps.std(ddof=1))
    assert s["nm_2_4"]["mean"] == pytest.approx(np.mean([5.6, 6.2, 5.9]))
    assert s["ptq_int4"]["n"] == 2 and s["ptq_int4"]["gap_mean"] == pytest.approx(0.005)
    assert s["ptq_int4"]["memory_after"] == 4  # bytes from the last seed (the newest code)
    assert s["float32"]["gap_std"] == 0.0 and s["float32"]["n"] == 3
    # the students' baseline is the scratch student; one seed: no spread
    assert s["student_distilled"]["gap_mean"] == pytest.approx(-0.3)
    assert s["student_distilled"]["n"] == 1 and s["student_distilled"]["std"] == 0.0


WRITE_RESULTS = """
import json, pathlib, sys
from experiments.studies import compression as c
c.define_flags()
c.FLAGS(["compression"])
rows = {k: {"eval_loss": 6.0 + i / 10, "memory_after": 2**21, "disk_after": 2**20}
        for i, k in enumerate(c.QUANT_ROWS)}
rows.update({k: {"eval_loss": 6.2} for k in c.PRUNE_ROWS if k != "float32"})
rows.update({k: {"eval_loss": 6.5 - i / 10, "steps": 150, "curve": [[50, 7.0], [150, 6.5 - i / 10]]}
             for i, k in enumerate(c.STUDENT_ROWS)})
c.write_results({0: rows, 1: rows}, pathlib.Path(sys.argv[1]), "the command", 60.0)
"""


def test_results_are_written_with_their_tables_and_figures(tmp_path):
    """write_results from two seeds' rows: results.json, results.md (a row per variant, the
    gap within the seed) and the three figures."""
    done = subprocess.run(
        [sys.executable, "-c", WRITE_RESULTS, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    assert (
        "| PTQ int4 weights (groups of 128) | 2 | 6.500 ± 0.000 | 0.500 ± 0.000 | 2.00 | 1.00 |"
        in table
    )
    assert "Date: " in table and "seeds 0, 1" in table
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]
    for name in ("quantization", "pruning", "distillation"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
