"""The post-training study's table and figures from its committed results.json: one unjoined point
per method at (trainable parameters, loss) and (parameters + optimizer MiB, loss), the DPO curve
from step 0, and a table row per method."""

import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from experiments.studies import post_training
from llm.science import plots

RESULTS = pathlib.Path(__file__).resolve().parents[3] / "experiments" / "results" / "post_training"


def test_figures_and_table_follow_the_results(monkeypatch, tmp_path):
    result = json.loads((RESULTS / "results.json").read_text())
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path, note=None: kept.append((fig, note)))
    post_training.write_results(result, tmp_path)
    (sft, sft_note), (dpo, dpo_note) = kept
    size, memory = sft.axes
    assert len(size.lines) == len(memory.lines) == len(result["sft"]) == 5
    for r, a, b in zip(result["sft"], size.lines, memory.lines):
        assert a.get_label() == r["method"] and a.get_linestyle() == "None"
        np.testing.assert_allclose(a.get_xydata(), [[r["trainable_params"], r["eval_loss"]]])
        mib = (r["param_bytes"] + r["optimizer_bytes"]) / 2**20
        np.testing.assert_allclose(b.get_xydata(), [[mib, r["eval_loss"]]])
    assert "MiB" in memory.get_xlabel() and "nats" in size.get_ylabel()
    assert "one seed" in sft_note and "one seed" in dpo_note
    accuracy = dpo.axes[0].lines[0].get_xydata()
    assert accuracy[0].tolist() == [0.0, 0.0]  # step 0: the policy is the reference
    np.testing.assert_allclose(accuracy[1:, 1], [c["accuracy"] for c in result["dpo"]["curve"][1:]])
    table = (tmp_path / "results.md").read_text()
    for r in result["sft"]:
        assert f"| {r['method']} |" in table
    # LoRA r=8's optimizer state (adapters only) is a small fraction of full fine-tuning's
    full, r8 = result["sft"][0], result["sft"][1]
    assert r8["optimizer_bytes"] < full["optimizer_bytes"] / 10
    for fig, _ in kept:
        plt.close(fig)
