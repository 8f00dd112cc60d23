"""llm.accelerator_report: the whole --smoke report where ml_collections and tensorflow_datasets
cannot be imported, a failing kernel reported with its spec, and the budget skipping items."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp

from kernels.attention.block_sizes import BlockSizes
from kernels.attention.specs import CPU_SPECS
from llm import accelerator_checks, accelerator_report
from llm.model.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Imported first by Python (sitecustomize on PYTHONPATH): any import of these packages fails.
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ml_collections", "tensorflow_datasets", "tensorflow"):
            raise ImportError(f"blocked for the test: {name}")
sys.meta_path.insert(0, _Block())
"""


def _blocked_python(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocker'}{os.pathsep}{ROOT}"}
    env["XLA_FLAGS"] = ""  # one CPU device, as on a one-GPU machine: quicker compiles
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smoke_report_runs_without_ml_collections_and_tfds(tmp_path):
    blocked = _blocked_python(tmp_path, "-c", "import ml_collections")
    assert blocked.returncode != 0 and "blocked for the test" in blocked.stderr

    out = tmp_path / "report"
    result = _blocked_python(tmp_path, "-m", "llm.accelerator_report", f"--out={out}", "--smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["smoke"] is True
    assert "NOT performance figures" in report["note"]
    assert set(report["parts"]) == set(accelerator_report.PARTS)
    assert report["environment"]["backend"] == "cpu"
    assert report["environment"]["jax"]

    correctness = report["correctness"]
    assert correctness["failures"] == []
    statuses = {(r["impl"], r["spec"]): r["status"] for r in correctness["results"]}
    for name in accelerator_report.SMOKE_SPECS:  # each spec in both dtypes, on both backends
        for spec in (name, *(f"{name}@{d}" for d in ("float32", "bfloat16"))):
            if ("pallas_gpu", spec) in statuses:
                assert statuses[("pallas_gpu", spec)] in ("pass",) or statuses[
                    ("pallas_gpu", spec)
                ].startswith("unsupported")
                assert statuses[("cudnn", spec)].startswith("unsupported")  # no GPU here
    assert statuses[("pallas_gpu", "gqa4_causal_bf16")] == "pass"
    assert statuses[("pallas_gpu", "gqa4_causal_bf16@float32")] == "pass"
    passed = [r for r in correctness["results"] if r["status"] == "pass"]
    assert all(set(r["worst"]) == {"out", "dq", "dk", "dv"} for r in passed)

    timed = [r for r in report["throughput"]["results"] if "ms" in r]
    assert {(r["impl"], r["mode"]) for r in timed} == {
        (i, m) for i in ("pallas_gpu", "xla", "jax_pallas_triton") for m in ("fwd", "fwd_bwd")
    }
    sweep = report["sweep"]
    assert [r["block_sizes"] for r in sweep["results"]] == [
        None,
        {
            f: 32
            for f in (
                "block_q",
                "block_kv",
                "block_q_dkv",
                "block_kv_dkv",
                "block_q_dq",
                "block_kv_dq",
            )
        },
    ]
    assert all(isinstance(r["fwd_bwd_ms"], float) for r in sweep["results"])
    assert set(sweep["best"]) == {"mha_causal"}
    training = {r["model"]: r for r in report["training"]["results"]}
    assert set(training) == {
        "llama_1b", "default", "moe_8x2", "moe_dense_active", "dense_32k", "sliding_32k"
    }  # fmt: skip
    for row in training.values():
        assert row["status"] == "ok" and row["ms_per_step"] > 0 and row["mfu"] is None
    ratios = report["training"]["ratios"]
    assert ratios["moe_over_dense_active"] > 0
    assert 0 < ratios["sliding_flop_saving"] < 1

    lowp = {r["matmul"]: r for r in report["lowp_matmuls"]["results"]}
    assert set(lowp) == {"bfloat16", "int8", "fp8_e4m3"}
    assert lowp["bfloat16"]["speedup_vs_bf16"] == 1
    assert all(r["ms"] > 0 and r["size"] == 256 for r in lowp.values())

    markdown = (out / "report.md").read_text()
    assert "NOT performance figures" in markdown
    for title in (
        "## Environment",
        "## Compiled correctness",
        "## Attention throughput",
        "## Block",
        "## Low-precision matmuls",
    ):
        assert title in markdown
    assert "## Training step" in markdown and "0 failure(s)" in markdown


def test_failing_kernel_is_reported_with_its_spec(tmp_path, monkeypatch):
    real = accelerator_checks.kernel_fn

    def broken(spec, impl, segment_ids):
        fn = real(spec, impl, segment_ids)
        if spec.name == "gqa4_causal_bf16" and impl == "pallas_gpu":
            return lambda q, k, v: fn(q, k, v) + jnp.asarray(0.5, q.dtype)  # wrong values
        if spec.name == "block_sparse" and impl == "pallas_gpu":
            raise RuntimeError("injected compile failure")
        return fn

    monkeypatch.setattr(accelerator_checks, "kernel_fn", broken)
    report = accelerator_report.run(tmp_path, smoke=True, parts=("correctness",))
    failures = report["correctness"]["failures"]
    assert "pallas_gpu/gqa4_causal_bf16: FAIL" in failures
    assert any(
        f.startswith("pallas_gpu/block_sparse: error: RuntimeError: injected") for f in failures
    )
    assert len(failures) == 2  # the other specs still pass
    row = next(r for r in report["correctness"]["results"] if r["spec"] == "gqa4_causal_bf16")
    assert row["worst"]["out"]["max_abs"] >= 0.4 and row["worst"]["out"]["over_tolerance"] > 1
    assert row["worst"]["dq"]["over_tolerance"] <= 1  # a constant shift leaves the gradients
    markdown = (tmp_path / "report.md").read_text()
    assert "**2 failure(s)**" in markdown and "- FAIL pallas_gpu/gqa4_causal_bf16: FAIL" in markdown


def test_items_over_budget_are_recorded_as_skipped():
    specs = CPU_SPECS[:3]
    result = accelerator_checks.correctness(
        specs, ("pallas_gpu", "cudnn"), accelerator_checks.Budget(0.0)
    )
    assert [(r["spec"], r["impl"], r["status"]) for r in result["results"]] == [
        (s.name, i, "skipped: budget") for s in specs for i in ("pallas_gpu", "cudnn")
    ]
    assert result["failures"] == []


def test_sweep_passes_block_sizes_to_the_kernel():
    """A block size the kernel refuses shows up as that candidate's result, not the defaults'."""
    spec = next(s for s in CPU_SPECS if s.name == "mha_causal")
    result = accelerator_checks.sweep(
        [spec], "pallas_gpu", [BlockSizes.uniform(24, 24)], 1, accelerator_checks.Budget(600.0)
    )
    default, refused = result["results"]
    assert default["block_sizes"] is None and isinstance(default["fwd_bwd_ms"], float)
    assert "powers of two" in refused["fwd_ms"]
    assert result["best"] == {"mha_causal": default}


def test_training_retries_with_remat_when_out_of_memory(monkeypatch):
    tried = []

    def fake_time_step(name, exp, steps):
        tried.append(exp.model.remat)
        if exp.model.remat == "none":
            return {"model": name, "status": "error: XlaRuntimeError: RESOURCE_EXHAUSTED: 9 GiB"}
        return {"model": name, "status": "ok", "remat": exp.model.remat, "ms_per_step": 1.0}

    monkeypatch.setattr(accelerator_checks, "time_step", fake_time_step)
    exp = accelerator_checks.experiment(ModelConfig(max_seq_len=32), 8, 32)
    result = accelerator_checks.training({"llama_1b": exp}, 1, accelerator_checks.Budget(60.0))
    assert tried == ["none", "dots_no_batch"]
    assert result["results"] == [
        {"model": "llama_1b", "status": "ok", "remat": "dots_no_batch", "ms_per_step": 1.0}
    ]
