"""One command that proves the accelerator path (issue #14):

    python -m llm.accelerator_report --out=DIR            # on a GPU or TPU: at most ~8 minutes
    python -m llm.accelerator_report --out=DIR --smoke    # anywhere: tiny shapes, Pallas interpreted

writes DIR/report.json and DIR/report.md with these parts, each under its own time budget (an item
that would overrun is recorded as "skipped: budget", never dropped):

  environment   device kind and count, jax / jaxlib / flax / libtpu versions, the runtime
                (CUDA) and driver, commit, date, load;
  correctness   the shared kernel specs (kernels/attention/specs.py CPU_SPECS, each in bfloat16
                and float32) on the Pallas backend and cuDNN against the reference: forward and
                dq/dk/dv, the worst error of each; every failure listed with its spec;
  throughput    kernels.benchmark's fwd and fwd+bwd TFLOP/s on BENCHMARK_SPECS (+ head_dim 64)
                of our kernel, cuDNN, the XLA reference, tokamax (if importable) and JAX's own
                Pallas GPU attention (Triton; Mosaic GPU on Hopper), speed-ups against cuDNN and
                the XLA reference, fraction of the bf16 peak;
  sweep         fwd+bwd time of a few Pallas block sizes on the two most important specs, the
                fastest per spec (to become the device kind's defaults in block_sizes.py);
  training      train-step ms, tokens/s and MFU of the ~1B Llama and the default model; MoE 8x2
                over its equal-active dense model; sliding window over dense at 32k against
                their FLOP ratio;
  lowp_matmuls  bfloat16 against the real int8 and fp8 (e4m3) matmuls QAT and PTQ use
                (llm.quant_check), ms and TFLOP/s, with the ratio to bfloat16.

report.json schema (version 1): {"schema": 1, "smoke": bool, "note": str, "environment": {...},
"parts": {part: {"budget_s", "used_s"}}, "correctness": {"tolerances", "results": [{"spec",
"impl", "dtype", "status": "pass" | "FAIL" | "error: ..." | "unsupported: ..." | "skipped:
budget", "worst": {"out"|"dq"|"dk"|"dv": {"max_abs", "over_tolerance"}}}], "failures": [str]},
"throughput": {"peak_bf16_flops", "results": [kernels.benchmark records + "fraction_of_peak"]},
"sweep": {"impl", "results": [{"spec", "block_sizes": BlockSizes fields | null (defaults),
"fwd_ms", "fwd_bwd_ms" (float or a reason) | "status": "skipped: budget"}], "best": {spec:
result}},
"training": {"results": [{"model", "status", "ms_per_step", "tokens_per_second", "mfu", ...}],
"ratios": {"moe_over_dense_active", "sliding_flop_saving", "sliding_time_saving",
"sliding_realized_fraction"}}, "lowp_matmuls": {"results": [{"matmul", "size", "ms", "tflops",
"device", "speedup_vs_bf16"}]}}. A part left out by --parts is absent. With --smoke, or on a CPU,
the figures are of Pallas interpret mode on tiny shapes: not performance figures, and the note
says so. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax

from kernels.attention import specs as specs_lib
from kernels.attention.block_sizes import BlockSizes
from llm import accelerator_checks as checks
from llm import quant_check

PARTS = ("environment", "correctness", "throughput", "sweep", "training", "lowp_matmuls")
# Seconds per part on an accelerator (8 minutes in all, compilation included).
# Time a part leaves unused goes to the parts after it; an overrun is taken from them.
BUDGETS = {"environment": 10, "correctness": 140, "throughput": 130, "sweep": 50, "training": 130,
           "lowp_matmuls": 20}  # fmt: skip
# The block sizes swept on the two most important specs (the defaults are timed too).
SWEEP_SPECS = ("causal_8k", "causal_gqa8_8k")
SWEEP_CANDIDATES = [BlockSizes(*b) for b in ((64, 64, 64, 64, 64, 64), (128, 64, 64, 128, 128, 64),
                                             (128, 128, 64, 128, 128, 64), (64, 128, 128, 128, 64, 128))]  # fmt: skip
# Throughput specs, most telling first (the budget may skip the tail).
THROUGHPUT_ORDER = ("causal_8k", "causal_gqa8_8k", "block_sparse_8k", "window1k_32k",
                    "causal_8k_hd64", "causal_4k", "causal_1k", "causal_16k", "window1k_8k",
                    "causal_2k", "causal_32k")  # fmt: skip
SMOKE_SPECS = ("gqa4_causal_bf16", "block_sparse")


def _throughput_specs(smoke: bool) -> list[specs_lib.AttentionSpec]:
    if smoke:
        return [next(s for s in specs_lib.CPU_SPECS if s.name == "mha_causal")]
    causal_8k = next(s for s in specs_lib.BENCHMARK_SPECS if s.name == "causal_8k")
    hd64 = dataclasses.replace(causal_8k, name="causal_8k_hd64", heads=32, kv_heads=32, head_dim=64)
    by_name = {s.name: s for s in (*specs_lib.BENCHMARK_SPECS, hd64)}
    return [by_name[name] for name in THROUGHPUT_ORDER]


def _kernel_impls() -> tuple[str, ...]:
    """The Pallas backend of this platform (pallas_gpu interpreted on CPU) and cuDNN."""
    return ("pallas_tpu",) if jax.default_backend() == "tpu" else ("pallas_gpu", "cudnn")


def run(out: pathlib.Path, smoke: bool, parts: tuple[str, ...], scale: float = 1.0) -> dict:
    """Runs `parts`, writing out/report.json and out/report.md after each; returns the report.
    `scale` multiplies the time budgets."""
    interpret = smoke or jax.default_backend() == "cpu"
    report = {
        "schema": 1,
        "smoke": smoke,
        "note": (
            "SMOKE / CPU RUN: Pallas in interpret mode on tiny shapes; timings are NOT "
            "performance figures."
            if interpret
            else "Accelerator run at full shapes."
        ),
        "parts": {},
    }
    print(report["note"], flush=True)
    deadline = time.monotonic() + scale * sum(BUDGETS[p] for p in parts)
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        later = scale * sum(BUDGETS[p] for p in parts[i + 1 :])
        budget = checks.Budget(max(0.0, deadline - time.monotonic() - later))
        print(f"== {part} (budget {budget.seconds:.0f} s)", flush=True)
        if part == "environment":
            report[part] = checks.environment()
        elif part == "correctness":
            specs = (
                [s for s in specs_lib.CPU_SPECS if s.name in SMOKE_SPECS]
                if smoke
                else specs_lib.CPU_SPECS
            )
            report[part] = checks.correctness(checks.with_dtypes(specs), _kernel_impls(), budget)
        elif part == "throughput":
            jax_own = ("jax_pallas_triton", "jax_pallas_mosaic")
            impls = (
                ("pallas_gpu", "xla", "jax_pallas_triton")
                if interpret
                else (*_kernel_impls(), "xla", "tokamax", *jax_own)
            )
            report[part] = checks.throughput(
                _throughput_specs(smoke), impls, 1 if interpret else 5, budget
            )
        elif part == "sweep":
            specs = _throughput_specs(smoke)
            if not smoke:
                specs = [s for s in specs if s.name in SWEEP_SPECS]
            candidates = [BlockSizes.uniform(32, 32)] if smoke else SWEEP_CANDIDATES
            report[part] = checks.sweep(
                specs, _kernel_impls()[0], candidates, 1 if interpret else 3, budget
            )
        elif part == "training":
            impl = None if interpret else _kernel_impls()[0]
            report[part] = checks.training(checks.models(smoke, impl), 1 if smoke else 5, budget)
        elif part == "lowp_matmuls":
            records = quant_check.lowp_matmuls(256 if interpret else 8192, 1 if interpret else 10)
            bf16_ms = records[0]["ms"]  # the first record is bfloat16's
            results = [{**r, "speedup_vs_bf16": bf16_ms / r["ms"]} for r in records]
            report[part] = {"results": results}
        report["parts"][part] = {"budget_s": budget.seconds, "used_s": round(budget.used(), 1)}
        print(f"   {part}: {budget.used():.0f} s of {budget.seconds:.0f}", flush=True)
        # Written after each part: a run cut short keeps what it measured.
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "report.md").write_text(markdown(report))
    return report


def _fmt(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else ("" if x is None else str(x))


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    lines = ["# Accelerator report", "", f"**{report['note']}**", ""]
    env = report.get("environment", {})
    if env:
        lines += ["## Environment", "", "| field | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in env.items()]
    if corr := report.get("correctness"):
        failures = corr["failures"]
        lines += ["", "## Compiled correctness (kernel vs reference, forward and dq/dk/dv)", ""]
        lines += [f"**{len(failures)} failure(s)**" + (":" if failures else ".")]
        lines += [f"- FAIL {f}" for f in failures]
        lines += ["", "| impl | spec | dtype | status | out | dq | dk | dv |", "| --- " * 8 + "|"]
        for r in corr["results"]:
            worst = r.get("worst", {})
            errs = [
                f"{worst[n]['max_abs']:.1e}" if n in worst else ""
                for n in ("out", "dq", "dk", "dv")
            ]
            lines.append(
                f"| {r['impl']} | {r['spec']} | {r.get('dtype', '')} | {r['status'][:80]} | "
                + " | ".join(errs)
                + " |"
            )
    if thr := report.get("throughput"):
        lines += ["", "## Attention throughput (causal FLOPs counted as half the square)", ""]
        lines += [
            "| spec | mode | impl | ms | TFLOP/s | dense-eq | x cudnn | x xla | of peak |",
            "| --- " * 9 + "|",
        ]
        for r in thr["results"]:
            if "ms" not in r:
                lines.append(f"| {r['spec']} | {r.get('mode', '')} | {r.get('impl', '')} | "
                             f"{r['status'][:80]} | | | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {r['spec']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                f"{r['tflops_dense_equiv']:.1f} | {_fmt(r.get('speedup_vs_cudnn'))} | "
                f"{_fmt(r.get('speedup_vs_xla'))} | {_fmt(r.get('fraction_of_peak'))} |"
            )
    if sweep := report.get("sweep"):
        lines += ["", f"## Block-size sweep ({sweep['impl']}; none = the current defaults)", ""]
        lines += ["| spec | block sizes | fwd ms | fwd+bwd ms |", "| --- " * 4 + "|"]
        for r in sweep["results"]:
            sizes = "none" if r["block_sizes"] is None else tuple(r["block_sizes"].values())
            times = [_fmt(r.get(k), 3) for k in ("fwd_ms", "fwd_bwd_ms")]
            lines.append(f"| {r['spec']} | {sizes} | {r.get('status', times[0])} | {times[1]} |")
        lines += [""] + [
            f"- best for {name}: {r['block_sizes'] or 'the defaults'}"
            for name, r in sweep["best"].items()
        ]
    if train := report.get("training"):
        lines += ["", "## Training step (random tokens)", ""]
        lines += [
            "| model | params | batch x seq | remat | attention | ms/step | tokens/s | MFU |",
            "| --- " * 8 + "|",
        ]
        for r in train["results"]:
            shape = f"{r.get('batch_size', '')} x {r.get('seq_len', '')}"
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | | {shape} | | | {r['status'][:80]} | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.0f}M | {shape} | {r['remat']} | "
                f"{r['attention_impl']} | {r['ms_per_step']:.1f} | {r['tokens_per_second']:,.0f} "
                f"| {_fmt(r['mfu'])} |"
            )
        lines += [""] + [f"- {k}: {_fmt(v, 3)}" for k, v in train["ratios"].items()]
    if lowp := report.get("lowp_matmuls"):
        lines += ["", "## Low-precision matmuls (QAT / PTQ; operands quantized beforehand)", ""]
        lines += ["| matmul | M = N = K | ms | TFLOP/s | x bfloat16 |", "| --- " * 5 + "|"]
        lines += [
            f"| {r['matmul']} | {r['size']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
            f"{r['speedup_vs_bf16']:.2f} |"
            for r in lowp["results"]
        ]
    lines += ["", "## Time per part", ""]
    lines += [
        f"- {p}: {t['used_s']} s of {t['budget_s']:.0f} s" for p, t in report["parts"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if unknown := set(f.parts) - set(PARTS):
        raise app.UsageError(f"unknown --parts {sorted(unknown)}; choose from {PARTS}")
    start = time.monotonic()
    report = run(pathlib.Path(f.out), f.smoke, tuple(p for p in PARTS if p in f.parts), f.scale)
    print(f"wrote {f.out}/report.json and report.md in {time.monotonic() - start:.0f} s")
    if failures := report.get("correctness", {}).get("failures"):
        print("\n".join(["CORRECTNESS FAILURES:", *failures]))
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags

    flags.DEFINE_string("out", None, "Directory for report.json and report.md.", required=True)
    flags.DEFINE_bool("smoke", False, "Tiny shapes, Pallas interpreted: proves the report runs.")
    flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
    flags.DEFINE_float("scale", 1.0, "Multiplies every part's time budget.")
    app.run(main)
