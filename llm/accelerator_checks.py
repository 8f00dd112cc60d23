"""The parts of `llm.accelerator_report`: environment, kernel correctness, attention throughput,
training steps. Each part takes a `Budget` and returns JSON-ready records; an item the budget
cannot fit is recorded as skipped, never dropped. Nothing here imports ml_collections or
tensorflow_datasets: experiments are built from typed objects, batches are random tokens."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import benchmark as kernel_benchmark
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.reference import attention_reference
from kernels.attention.specs import AttentionSpec
from llm import step_timing
from llm.model.config import ModelConfig, MoEConfig
from llm.parallel.partitioning import MeshConfig
from llm.science import flops
from llm.training.checkpoint import CheckpointConfig
from llm.training.experiment import Experiment
from llm.training.guard import GuardConfig
from llm.training.inputs import DataConfig
from llm.training.optimizer import OptimizerConfig

# (atol, rtol) of a kernel against the reference in the same dtype. float32 is looser than the
# CPU tests' 1e-5: GPUs multiply float32 in TF32 by default.
TOLERANCES = {
    "out": {"float32": (5e-3, 5e-3), "bfloat16": (2e-2, 2e-2)},
    "grad": {"float32": (5e-3, 5e-3), "bfloat16": (5e-2, 5e-2)},
}


# Remat policies tried in turn when a model's step runs out of memory without remat.
REMAT_FALLBACK = ("dots_no_batch", "full")


@dataclasses.dataclass
class Budget:
    """Wall-clock seconds for one part; `fits(estimate)` says whether an item may start."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.monotonic)

    def used(self) -> float:
        return time.monotonic() - self.start

    def fits(self, estimate: float) -> bool:
        return self.used() + estimate <= self.seconds


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str]) -> str | None:
    """First line of a command's output, or None where it is absent or fails."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment() -> dict:
    """Devices, library versions, driver / runtime, commit, date and load."""
    device = jax.devices()[0]
    try:
        from jax.extend import backend  # here: its place moved between jax versions

        platform_version = backend.get_backend().platform_version
    except Exception as e:  # noqa: BLE001 (a missing field must not stop the report)
        platform_version = f"unknown ({type(e).__name__})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "libtpu": _version("libtpu") or _version("libtpu-nightly"),
        "platform_version": platform_version,  # CUDA / ROCm / TPU runtime as jaxlib reports it
        "nvidia_driver": _command(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
        ),
        "commit": _command(["git", "-C", root, "rev-parse", "--short", "HEAD"]),
        "peak_bf16_flops": flops.peak_flops(device),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def kernel_fn(spec: AttentionSpec, impl: str, segment_ids) -> Callable:
    """(q, k, v) -> out of `impl` on `spec` (the report's tests replace it to inject a failure)."""
    return lambda q, k, v: kernels.attention(
        q, k, v, segment_ids=segment_ids, implementation=impl, **spec.kwargs()
    )


def _worst(got, want, atol: float, rtol: float) -> tuple[float, float]:
    """(max |got - want|, max of |got - want| / (atol + rtol |want|)): passes when the second <= 1."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    diff = np.abs(got - want)
    if not np.all(np.isfinite(got)):
        return float("inf"), float("inf")
    return float(diff.max(initial=0.0)), float(
        (diff / (atol + rtol * np.abs(want))).max(initial=0.0)
    )


def check_spec(spec: AttentionSpec, impl: str) -> dict:
    """Forward and dq/dk/dv of `impl` against the reference on `spec`; status pass / FAIL /
    error: ... (a failure too) / unsupported: ... (the backend refuses these inputs)."""
    record = {"spec": spec.name, "impl": impl, "dtype": spec.dtype}
    q, k, v, segment_ids = spec.inputs()
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    try:
        got = value_and_grads(kernel_fn(spec, impl, segment_ids))
    except kernels.UnsupportedError as e:
        return {**record, "status": f"unsupported: {e}"}
    except Exception as e:  # noqa: BLE001 (a compile or runtime failure is a result)
        return {**record, "status": f"error: {type(e).__name__}: {str(e)[:400]}"}
    with jax.default_matmul_precision("highest"):
        want = value_and_grads(
            lambda q, k, v: attention_reference(
                q, k, v, mask=spec.dense_mask(), segment_ids=segment_ids
            )
        )
    worst, ok = {}, True
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        atol, rtol = TOLERANCES["out" if name == "out" else "grad"][spec.dtype]
        abs_err, ratio = _worst(g, w, atol, rtol)
        worst[name] = {"max_abs": abs_err, "over_tolerance": ratio}
        ok &= ratio <= 1.0
    return {**record, "status": "pass" if ok else "FAIL", "worst": worst}


def with_dtypes(specs: list[AttentionSpec]) -> list[AttentionSpec]:
    """Each spec in its own dtype, then all again in the other of bfloat16 / float32."""
    other = {"float32": "bfloat16", "bfloat16": "float32"}
    return [*specs] + [
        dataclasses.replace(s, name=f"{s.name}@{other[s.dtype]}", dtype=other[s.dtype])
        for s in specs
    ]


def correctness(specs: list[AttentionSpec], impls: tuple[str, ...], budget: Budget) -> dict:
    """check_spec for every (spec, impl) the budget fits; failures listed by spec."""
    results, last = [], 0.0
    for spec in specs:
        for impl in impls:
            if not budget.fits(last):
                results.append({"spec": spec.name, "impl": impl, "status": "skipped: budget"})
                continue
            start = time.monotonic()
            results.append(check_spec(spec, impl))
            last = time.monotonic() - start
            print(f"  {impl:10s} {spec.name:32s} {results[-1]['status'][:100]}", flush=True)
    failures = [
        f"{r['impl']}/{r['spec']}: {r['status']}"
        for r in results
        if r["status"] == "FAIL" or r["status"].startswith("error")
    ]
    return {"tolerances": TOLERANCES, "results": results, "failures": failures}


def throughput(
    specs: list[AttentionSpec], impls: tuple[str, ...], repeats: int, budget: Budget
) -> dict:
    """kernels.benchmark's fwd and fwd+bwd timings per spec; fraction of the bf16 peak added."""
    peak = flops.peak_flops(jax.devices()[0])
    records, last = [], 0.0
    for spec in specs:
        if not budget.fits(last):
            records.append({"spec": spec.name, "status": "skipped: budget"})
            continue
        start = time.monotonic()
        print(f"  {spec.name}", flush=True)
        results = {impl: kernel_benchmark.measure(spec, impl, repeats, None) for impl in impls}
        for record in kernel_benchmark.report(spec, results, None):
            if peak and "tflops_dense_equiv" in record:
                record["fraction_of_peak"] = record["tflops_dense_equiv"] * 1e12 / peak
            records.append(record)
        last = time.monotonic() - start
    return {"peak_bf16_flops": peak, "results": records}


def sweep(
    specs: list[AttentionSpec],
    impl: str,
    candidates: list[BlockSizes],
    repeats: int,
    budget: Budget,
) -> dict:
    """fwd+bwd ms of `impl` per spec at each candidate BlockSizes (None: the defaults); the
    fastest per spec, to become the device kind's defaults in kernels/attention/block_sizes.py."""
    results, best, last = [], {}, 0.0
    for spec in specs:
        for block_sizes in [None, *candidates]:
            record = {
                "spec": spec.name,
                "block_sizes": block_sizes and dataclasses.asdict(block_sizes),
            }
            if not budget.fits(last):
                results.append({**record, "status": "skipped: budget"})
                continue
            start = time.monotonic()
            ms = kernel_benchmark.measure(spec, impl, repeats, block_sizes)
            last = time.monotonic() - start
            results.append({**record, "fwd_ms": ms["fwd"], "fwd_bwd_ms": ms["fwd_bwd"]})
            print(f"  {spec.name:16s} {block_sizes} {ms['fwd_bwd']}", flush=True)
            if isinstance(ms["fwd_bwd"], float) and (
                spec.name not in best or ms["fwd_bwd"] < best[spec.name]["fwd_bwd_ms"]
            ):
                best[spec.name] = results[-1]
    return {"impl": impl, "results": results, "best": best}


def experiment(model: ModelConfig, batch_size: int, seq_len: int) -> Experiment:
    """A typed experiment for timing: data parallel over all devices, default optimizer."""
    return Experiment(
        model=model,
        optimizer=OptimizerConfig(),
        data=DataConfig(),
        mesh=MeshConfig(sizes=(("data", -1),), rules=(("batch", "data"),)),
        checkpoint=CheckpointConfig(),
        guard=GuardConfig(),
        batch_size=batch_size,
        seq_len=seq_len,
        sample_prompt="",
    )


def time_step(name: str, exp: Experiment, steps: int) -> dict:
    """One model's train step: ms, tokens/s, FLOP/s and MFU (None where the peak is unknown)."""
    per_token = flops.train_flops_per_token(exp.model, exp.seq_len)
    record = {
        "model": name,
        "params": flops.param_counts(exp.model)["total"],
        "active_params": flops.param_counts(exp.model)["active"],
        "batch_size": exp.batch_size,
        "seq_len": exp.seq_len,
        "remat": exp.model.remat,
        "attention_impl": exp.model.attention_impl,
        "flops_per_token": per_token,
    }
    try:
        timing, memory = step_timing.time_ours(exp, step_timing.random_batch(exp), steps, warmup=1)
    except Exception as e:  # noqa: BLE001 (OOM or a compile failure is a result)
        return {**record, "status": f"error: {type(e).__name__}: {str(e)[:400]}"}
    peak = flops.peak_flops(jax.devices()[0])
    per_second = exp.tokens_per_step * per_token / timing.best
    return {
        **record,
        "status": "ok",
        "ms_per_step": 1e3 * timing.best,
        "tokens_per_second": exp.tokens_per_step / timing.best,
        "flops_per_second": per_second,
        "mfu": per_second / (peak * jax.device_count()) if peak else None,
        "memory_per_device": memory,
    }


def training(models: dict[str, Experiment], steps: int, budget: Budget) -> dict:
    """time_step for each model the budget fits, then the MoE and sliding-window ratios."""
    results, last = {}, 0.0
    for name, exp in models.items():
        if not budget.fits(last):
            results[name] = {"model": name, "status": "skipped: budget"}
            continue
        start = time.monotonic()
        results[name] = time_step(name, exp, steps)
        for remat in REMAT_FALLBACK:  # out of memory: recompute more in the backward pass
            if "RESOURCE_EXHAUSTED" not in results[name]["status"] or not budget.fits(last):
                break
            print(f"  {name}: out of memory, again with remat={remat}", flush=True)
            model = dataclasses.replace(exp.model, remat=remat)
            results[name] = time_step(name, dataclasses.replace(exp, model=model), steps)
        last = time.monotonic() - start
        shown = results[name].get("ms_per_step")
        print(f"  {name:16s} " + (f"{shown:.1f} ms" if shown else results[name]["status"][:200]))
    ratios = {}

    def ms(name: str) -> float | None:
        return results.get(name, {}).get("ms_per_step")

    if ms("moe_8x2") and ms("moe_dense_active"):
        ratios["moe_over_dense_active"] = ms("moe_8x2") / ms("moe_dense_active")
    if ms("sliding_32k") and ms("dense_32k"):
        flop_saving = 1 - (
            models["sliding_32k"].tokens_per_step
            * flops.train_flops_per_token(
                models["sliding_32k"].model, models["sliding_32k"].seq_len
            )
        ) / (
            models["dense_32k"].tokens_per_step
            * flops.train_flops_per_token(models["dense_32k"].model, models["dense_32k"].seq_len)
        )
        time_saving = 1 - ms("sliding_32k") / ms("dense_32k")
        ratios["sliding_flop_saving"] = flop_saving
        ratios["sliding_time_saving"] = time_saving
        ratios["sliding_realized_fraction"] = time_saving / flop_saving if flop_saving else None
    return {"results": list(results.values()), "ratios": ratios}


def models(smoke: bool, attention_impl: str | None) -> dict[str, Experiment]:
    """The timed models: the ~1B Llama, the default model, MoE 8x2 beside its equal-active dense
    model, and a sliding-window model beside its dense twin at 32k (tiny versions for --smoke)."""
    dtype = "float32" if smoke else "bfloat16"
    common = {"dtype": dtype, "attention_impl": attention_impl}
    if smoke:
        small = {"vocab_size": 128, "num_layers": 1, "embed_dim": 32, "num_heads": 2,
                 "num_kv_heads": 1, "mlp_dim": 64, "max_seq_len": 32, **common}  # fmt: skip
        llama, default = ModelConfig(**small), ModelConfig(**small)
        moe_size, long_size, long_seq, window, batch, seq = small, small, 32, 8, 8, 32
        expert = 32
    else:
        llama = ModelConfig(  # Llama 3.2 1B's shape: 1.24B parameters, tied embeddings
            vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
            head_dim=64, mlp_dim=8192, max_seq_len=2048, rope_theta=500_000.0, **common,
        )  # fmt: skip
        default = ModelConfig(**common)
        moe_size = {"vocab_size": 32768, "num_layers": 8, "embed_dim": 1024, "num_heads": 16,
                    "num_kv_heads": 8, "head_dim": 64, "max_seq_len": 2048, **common}  # fmt: skip
        long_size = {"vocab_size": 32768, "num_layers": 4, "embed_dim": 1024, "num_heads": 8,
                     "num_kv_heads": 8, "head_dim": 128, "mlp_dim": 4096,
                     "max_seq_len": 32768, **common}  # fmt: skip
        long_seq, window, batch, seq, expert = 32768, 1024, 8, 2048, 1408
    return {
        "llama_1b": experiment(llama, batch if smoke else 4, seq),
        "default": experiment(default, 8 if smoke else 16, seq if smoke else 256),
        "moe_8x2": experiment(
            ModelConfig(**moe_size, moe=MoEConfig(num_experts=8, top_k=2, expert_mlp_dim=expert)),
            batch,
            seq,
        ),
        "moe_dense_active": experiment(
            ModelConfig(**{**moe_size, "mlp_dim": 2 * expert}), batch, seq
        ),
        "dense_32k": experiment(ModelConfig(**long_size), batch if smoke else 1, long_seq),
        "sliding_32k": experiment(
            ModelConfig(**long_size, attention_pattern="sliding", attention_window=window),
            batch if smoke else 1,
            long_seq,
        ),
    }
