"""Attention benchmark: `python -m kernels.benchmark [--specs=a,b] [--impls=x,y] [--out=F.json]`.

For each `specs.BENCHMARK_SPECS` configuration and each implementation that
runs on this backend ("pallas_gpu", "xla", "cudnn", "tokamax" if importable; JAX's own
Pallas GPU attention, "jax_pallas_triton" and on Hopper "jax_pallas_mosaic", on request),
times the forward and forward+backward passes (best of --repeats after a
warm-up, `block_until_ready`) and reports

  * TFLOP/s of useful work: 4 * B * H * D * (area of the non-empty blocks
    of the mask, from MaskInfo at the pallas_gpu forward block sizes);
  * TFLOP/s dense-equivalent: 4 * B * Sq * Skv * H * D, halved for causal;
  * speed-up against "xla" and "cudnn" measured in the same run.

Backward FLOPs count 2.5x forward (forward+backward = 3.5x). Out-of-memory
configurations print "OOM".

On a CPU backend the Pallas kernels would run in interpret mode, whose timings
say nothing about kernel performance: there the benchmark times only the
compiled XLA paths ("xla", "xla_blockwise") on `specs.CPU_BENCHMARK_SPECS`
(useful FLOPs counted at the xla_blockwise block sizes), after a small
correctness check of pallas_gpu. CPU figures are CPU figures, never
accelerator performance. --block_sizes=Q,KV sets the blocked backends' sizes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kernels
from kernels.attention import specs
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mask_info import EMPTY, mask_info

_KNOWN_IMPLS = (
    "pallas_gpu",
    "pallas_tpu",
    "xla",
    "xla_blockwise",
    "cudnn",
    "tokamax",
    "jax_pallas_triton",
    "jax_pallas_mosaic",
)
_CPU_IMPLS = ("xla", "xla_blockwise")  # compiled on CPU; the others would be interpreted
_BWD_FACTOR = 2.5  # Backward FLOPs / forward FLOPs.
_BASELINES = ("xla", "cudnn")


def forward_flops(
    spec: specs.AttentionSpec, block_sizes: BlockSizes | None = None
) -> tuple[float, float]:
    """(useful FLOPs over non-empty mask blocks, dense-equivalent FLOPs) of one forward.

    Blocks: `block_sizes`, default the pallas_gpu forward's."""
    bs = block_sizes or default_block_sizes("gpu", spec.head_dim, jnp.dtype(spec.dtype))
    info = mask_info(spec.full_mask(), spec.q_seq, spec.kv_seq, bs.block_q, bs.block_kv)
    rows = np.minimum(bs.block_q, spec.q_seq - bs.block_q * np.arange(info.num_q_blocks))
    cols = np.minimum(bs.block_kv, spec.kv_seq - bs.block_kv * np.arange(info.num_kv_blocks))
    area = float(((info.block_kind != EMPTY) * rows[:, None] * cols[None, :]).sum())
    per_pair = 4.0 * spec.batch * spec.heads * spec.head_dim
    dense = per_pair * spec.q_seq * spec.kv_seq * (0.5 if spec.causal else 1.0)
    return per_pair * area, dense


def _tokamax_fn(spec: specs.AttentionSpec) -> Callable:
    """tokamax.dot_product_attention with the spec's mask (raises ImportError if absent)."""
    import tokamax  # Optional dependency: imported only when benchmarked.

    native = spec.mask is None and spec.q_seq == spec.kv_seq
    dense = None if native else spec.dense_mask()
    window = None if spec.sliding_window is None or not native else (spec.sliding_window - 1, 0)

    def fn(q, k, v):
        mask = None if dense is None else jnp.asarray(dense)[None, None]
        return tokamax.dot_product_attention(
            q, k, v, mask=mask, is_causal=native and spec.causal, local_window_size=window
        )

    return fn


def _jax_pallas_fn(spec: specs.AttentionSpec, impl: str) -> Callable:
    """JAX's own Pallas GPU attention: "jax_pallas_triton" (`mha`; interpreted on CPU) or
    "jax_pallas_mosaic" (Mosaic GPU, Hopper only); causal or unmasked self-attention."""
    if spec.mask is not None or spec.sliding_window is not None or spec.q_seq != spec.kv_seq:
        raise kernels.UnsupportedError(f"{impl}: only causal or unmasked self-attention")
    if impl == "jax_pallas_triton":
        from jax.experimental.pallas.ops.gpu import attention as triton_attention

        if spec.heads != spec.kv_heads:
            raise kernels.UnsupportedError(f"{impl}: no grouped-query attention")
        return functools.partial(
            triton_attention.mha,
            segment_ids=None,
            sm_scale=spec.head_dim**-0.5,
            causal=spec.causal,
            interpret=jax.default_backend() == "cpu",
        )
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
        block_q=128,
        block_kv=128,
        max_concurrent_steps=2,
        causal=spec.causal,
        block_q_dkv=64,
        block_kv_dkv=64,
        block_q_dq=64,
        block_kv_dq=64,
    )
    return functools.partial(attention_mgpu.attention, config=config)


def _attention_fn(
    spec: specs.AttentionSpec, impl: str, segment_ids, block_sizes: BlockSizes | None
) -> Callable:
    if impl == "tokamax":
        if segment_ids is not None:
            raise kernels.UnsupportedError("tokamax: segment ids are not mapped here")
        return _tokamax_fn(spec)
    if impl.startswith("jax_pallas"):
        if segment_ids is not None:
            raise kernels.UnsupportedError(f"{impl}: segment ids are not mapped here")
        return _jax_pallas_fn(spec, impl)
    return lambda q, k, v: kernels.attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        implementation=impl,
        block_sizes=None if impl == "xla" else block_sizes,
        **spec.kwargs(),
    )


def _best_ms(fn: Callable, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # Compile and warm up.
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(
    spec: specs.AttentionSpec, impl: str, repeats: int, block_sizes: BlockSizes | None
) -> dict[str, float | str]:
    """{"fwd": ms, "fwd_bwd": ms} or the reason it did not run ("OOM", "unsupported: ...").
    block_sizes: the kernel's tiles (None: its defaults)."""
    try:
        q, k, v, segment_ids = spec.inputs()
        attention = _attention_fn(spec, impl, segment_ids, block_sizes)
        do = jnp.ones(q.shape, q.dtype)

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(attention, q, k, v)
            return out, vjp(do)

        return {
            "fwd": _best_ms(jax.jit(attention), (q, k, v), repeats),
            "fwd_bwd": _best_ms(jax.jit(fwd_bwd), (q, k, v), repeats),
        }
    except kernels.UnsupportedError as e:
        return {"fwd": f"unsupported: {e}", "fwd_bwd": "unsupported"}
    except ImportError as e:
        return {"fwd": f"unavailable: {e}", "fwd_bwd": "unavailable"}
    except Exception as e:  # noqa: BLE001 (report and go on with the next configuration)
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return {"fwd": "OOM", "fwd_bwd": "OOM"}
        return {"fwd": f"error: {type(e).__name__}: {text[:300]}", "fwd_bwd": "error"}


def report(
    spec: specs.AttentionSpec, results: dict[str, dict], block_sizes: BlockSizes | None
) -> list[dict]:
    """Prints one line per (implementation, pass); returns JSON records."""
    sparse, dense = forward_flops(spec, block_sizes)
    records = []
    for mode, factor in (("fwd", 1.0), ("fwd_bwd", 1.0 + _BWD_FACTOR)):
        for impl, res in results.items():
            ms = res[mode]
            record = {"spec": spec.name, "impl": impl, "mode": mode}
            if isinstance(ms, str):
                print(f"  {mode:8s} {impl:13s} {ms}")
                records.append({**record, "status": ms})
                continue
            record.update(
                ms=ms,
                tflops=factor * sparse / ms / 1e9,
                tflops_dense_equiv=factor * dense / ms / 1e9,
            )
            line = (
                f"  {mode:8s} {impl:13s} {ms:9.3f} ms  {record['tflops']:7.3f} TFLOP/s "
                f"({record['tflops_dense_equiv']:7.3f} dense-eq)"
            )
            for base in _BASELINES:
                base_ms = results.get(base, {}).get(mode)
                if base != impl and isinstance(base_ms, float):
                    record[f"speedup_vs_{base}"] = base_ms / ms
                    line += f"  x{base_ms / ms:5.2f} vs {base}"
            print(line)
            records.append(record)
    return records


def _cpu_smoke_check() -> None:
    """pallas_gpu (interpret mode) vs xla on one small spec: correctness only."""
    spec = next(s for s in specs.CPU_SPECS if s.name == "gqa2_causal_odd_len")
    q, k, v, segment_ids = spec.inputs()
    out, ref = (
        kernels.attention(q, k, v, segment_ids=segment_ids, implementation=impl, **spec.kwargs())
        for impl in ("pallas_gpu", "xla")
    )
    err = float(jnp.max(jnp.abs(out - ref)))
    print(f"smoke check ({spec.name}): max |pallas_gpu - xla| = {err:.2e}")
    if not err < 1e-4:
        raise SystemExit(f"smoke check failed: error {err:.2e}")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    on_cpu = jax.default_backend() == "cpu"
    block_sizes = BlockSizes.uniform(*map(int, f.block_sizes)) if f.block_sizes else None
    if on_cpu:
        print(
            "CPU backend: the Pallas kernels would run in interpret mode, whose timings do "
            f"not measure kernel performance; timing only the compiled {_CPU_IMPLS}."
        )
        _cpu_smoke_check()
        block_sizes = block_sizes or default_block_sizes("cpu", 0, jnp.float32)
    pool = specs.CPU_BENCHMARK_SPECS if on_cpu else specs.BENCHMARK_SPECS
    by_name = {s.name: s for s in pool}
    if unknown := [n for n in f.specs if n not in by_name]:
        raise app.UsageError(f"unknown --specs {unknown}; choose from {sorted(by_name)}")
    chosen = [by_name[n] for n in f.specs] or pool
    impls = f.impls or (_CPU_IMPLS if on_cpu else ("pallas_gpu", "xla", "cudnn", "tokamax"))
    if unknown := [i for i in impls if i not in _KNOWN_IMPLS]:
        raise app.UsageError(f"unknown --impls {unknown}; choose from {_KNOWN_IMPLS}")
    if on_cpu and (interpreted := [i for i in impls if i not in _CPU_IMPLS]):
        raise app.UsageError(
            f"--impls {interpreted} would run interpreted on CPU; use {_CPU_IMPLS}"
        )
    print(
        f"device: {jax.devices()[0].device_kind}, repeats: {f.repeats}, block_sizes: "
        f"{block_sizes}, load average: {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    records = []
    for spec in chosen:
        print(
            f"{spec.name}: batch {spec.batch}, seq {spec.q_seq}/{spec.kv_seq}, heads "
            f"{spec.heads}/{spec.kv_heads}, head_dim {spec.head_dim}, {spec.dtype}"
        )
        results = {impl: measure(spec, impl, f.repeats, block_sizes) for impl in impls}
        records += report(spec, results, block_sizes)
    if f.out:
        with open(f.out, "w") as out:
            json.dump(records, out, indent=1)
        print(f"wrote {f.out}")


def define_flags() -> None:
    flags.DEFINE_list(
        "specs", [], "Spec names to run (default: all BENCHMARK_SPECS, CPU_BENCHMARK_SPECS on CPU)."
    )
    flags.DEFINE_list(
        "impls",
        [],
        "Implementations to compare (default: pallas_gpu,xla,cudnn,tokamax; xla,xla_blockwise "
        "on CPU).",
    )
    flags.DEFINE_list(
        "block_sizes", [], "Q,KV block sizes of the blocked implementations (default: theirs)."
    )
    flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (best is kept).")
    flags.DEFINE_string("out", None, "Write the results as JSON to this file.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
