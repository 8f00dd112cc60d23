"""Times the low-precision matmuls QAT and PTQ use (llm.model.quant_ops.lowp_matmul, real
dot_generals) against bfloat16, for the accelerator report (`lowp_matmuls`) or alone:

    python -m llm.quant_check --size=8192      # on a GPU/TPU; on CPU the figures are no measure

Each record: ms and TFLOP/s (2·M·N·K per matmul) of bf16, int8 (int8 x int8 -> int32, then the
rescale) and fp8 (e4m3 x e4m3 -> float32, then the rescale), operands quantized beforehand.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from llm.model import quant_ops
from llm.step_timing import time_calls


def lowp_matmuls(size: int, repeats: int = 10) -> list[dict]:
    """bf16 vs int8 vs fp8 [size, size] @ [size, size] on the default device."""
    x, w = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
    xi, xis = quant_ops.int_quantize(x, (1,), 8)
    wi, wis = quant_ops.int_quantize(w, (0,), 8)
    x8, x8s = quant_ops.fp8_quantize(x)
    w8, w8s = quant_ops.fp8_quantize(w)
    cases = {
        "bfloat16": (lambda a, b: a @ b, (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
        "int8": (lambda *a: quant_ops.lowp_matmul(*a, real=True), (xi, xis, wi, wis)),
        "fp8_e4m3": (lambda *a: quant_ops.lowp_matmul(*a, real=True), (x8, x8s, w8, w8s)),
    }
    records = []
    for name, (fn, args) in cases.items():
        call = functools.partial(lambda f, a: f(*a).block_until_ready(), jax.jit(fn), args)
        timing = time_calls(call, repeats, warmup=1)
        records.append(
            {
                "matmul": name,
                "size": size,
                "ms": timing.median * 1e3,
                "tflops": 2 * size**3 / timing.median / 1e12,
                "device": jax.devices()[0].device_kind,
            }
        )
    return records


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if jax.default_backend() == "cpu":
        print("CPU: these timings are not accelerator performance.", file=sys.stderr)
    for r in lowp_matmuls(flags.FLAGS.size, flags.FLAGS.repeats):
        print(f"{r['matmul']:>9} {r['size']}^3: {r['ms']:8.3f} ms  {r['tflops']:7.1f} TFLOP/s")


if __name__ == "__main__":
    flags.DEFINE_integer("size", 8192, "M = N = K of the timed matmuls.")
    flags.DEFINE_integer("repeats", 10, "Timed calls per matmul (after one warm-up).")
    app.run(main)
