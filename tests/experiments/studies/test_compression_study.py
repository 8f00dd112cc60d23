"""The compression study's summary: gaps within a seed, mean and std over the seeds that have
the run (seeds merged from several invocations may hold different runs)."""

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
