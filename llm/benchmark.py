"""Training-step throughput: ours (JAX) against Hugging Face Llama (torch), and the matmul ceiling.

    python -m llm.benchmark --configs=default,large --steps=10 --warmup=3 --out=/tmp/bench.json
    python -m llm.benchmark --configs=dense_active,moe_8x2,moe_8x2_capacity,dense_total --torch=false
    python -m llm.benchmark --configs=default,default_chunked_loss --torch=false --loss_vocabs=

For each config it times one full training step (forward, backward, clipped AdamW update), built
exactly as `llm.train` builds it (`make_optimizer`, `make_train_step`, jit with the state
donated), on a fixed random batch; then (dense configs) the same model as `transformers.LlamaForCausalLM` with
`torch.optim.AdamW`, timed the same way. The run also measures the machine's matmul ceiling
(FLOP/s of a large matmul in JAX) so the step can be read as a fraction of it. Every figure is
the best of `--steps` timed steps (other processes share the machine); medians are kept in the
JSON. On a GPU both sides run in bfloat16 and torch is compiled with `torch.compile`.

Loss memory: for each of `--loss_vocabs` (default 4k, 32k, 128k) the default config's train step
is compiled (not run) with `config.loss.impl` plain and chunked (kernels.cross_entropy), and the
run prints XLA's temporary memory per device of each (its memory analysis) and their ratio.

Layouts: each `--mesh=data=2,sequence=4[,context_parallel=ring]` (repeatable) places the step on
a device mesh as `llm.train` does; a pipelined layout names its schedule too
(`--mesh=stage=4,data=2,schedule=1f1b,microbatches=8`, stacked layers implied), with the rules
table of experiments/default.py; the run prints each
layout's step time, its ratio to the first layout, and its per-device memory
(`llm.parallel.partitioning.memory_report`). The torch baseline runs once per config (one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m llm.benchmark --configs=default \
        --notorch --mesh=data=8 --mesh=fsdp=8 --mesh=data=2,sequence=4,context_parallel=ring
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import default as default_experiment
from llm import config as config_lib
from llm import hf
from llm.parallel import partitioning
from llm.science import flops
from llm.step_timing import Timing, compile_ours, random_batch, time_calls, time_ours
from llm.training import instruments
from llm.training.experiment import Experiment
from llm.training.step import LOSS_IMPLS

# Dotted overrides of experiments/default.py: batch size, sequence length and model fields.
CONFIGS: dict[str, dict] = {
    "default": {},
    "large": {
        "batch_size": 1,
        "seq_len": 512,
        "model.embed_dim": 512,
        "model.num_layers": 8,
        "model.num_heads": 8,
        "model.num_kv_heads": 4,
        "model.mlp_dim": 1536,
    },
    # Mixture of experts, 8 experts top-2, against dense models with its active parameters
    # (mlp_dim = 2 experts; the router's D x E are the difference) and with its total ones.
    "moe_8x2": {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.expert_mlp_dim": 384},
    "moe_8x2_capacity": {
        "model.moe.num_experts": 8,
        "model.moe.top_k": 2,
        "model.moe.expert_mlp_dim": 384,
        "model.moe.dispatch": "capacity",
    },
    "dense_active": {"model.mlp_dim": 2 * 384},
    "dense_total": {"model.mlp_dim": 8 * 384},
    "default_chunked_loss": {"loss.impl": "chunked"},
    # The default's 4 layers at a quarter of the tokens and half the width: pipelined layouts
    # compile one scan of the schedule's ticks per layout, which the default size makes slow.
    "small": {
        "seq_len": 64,
        "model.embed_dim": 128,
        "model.mlp_dim": 384,
        "model.vocab_size": 1024,
    },
}
MATMUL_SIZE = 2048
# --mesh=stage=4,schedule=1f1b,microbatches=8: config.pipeline's fields in a layout.
PIPELINE_FIELDS = ("schedule", "microbatches", "virtual_stages")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def parse_layout(text: str) -> dict[str, str]:
    """ "data=2,sequence=4,context_parallel=ring" -> {"data": "2", ...}."""
    fields = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(fields) - {*partitioning.MESH_AXES, "context_parallel", *PIPELINE_FIELDS}
    if unknown:
        raise app.UsageError(
            f"--mesh={text}: unknown fields {sorted(unknown)}; use mesh axes "
            f"{partitioning.MESH_AXES}, context_parallel and {PIPELINE_FIELDS}"
        )
    return fields


def experiment(
    name: str, layout: dict[str, str] | None = None, extra: dict | None = None
) -> Experiment:
    """experiments/default.py with the overrides of CONFIGS[name] (then `extra`), on `layout`."""
    overrides = {**CONFIGS[name], **(extra or {})}
    if on_gpu():
        overrides["model.dtype"] = "bfloat16"
    if layout:
        overrides.update({f"mesh.{a}": int(layout.get(a, 1)) for a in partitioning.MESH_AXES})
        overrides["model.context_parallel"] = layout.get("context_parallel", "ring")
        if int(layout.get("stage", 1)) > 1:  # llm.parallel.pipeline pipelines stacked layers
            overrides["model.scan_layers"] = True
            for field in PIPELINE_FIELDS:
                if field in layout:
                    value = layout[field]
                    overrides[f"pipeline.{field}"] = value if field == "schedule" else int(value)
    return config_lib.resolve(config_lib.with_overrides(default_experiment.get_config(), overrides))


def time_torch(exp: Experiment, batch: dict, steps: int, warmup: int) -> Timing:
    """The same model as `transformers.LlamaForCausalLM`: AdamW step with clipping, same batch."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(exp.seed)
    hf_config = transformers.LlamaConfig(**hf._config_to_hf(exp.model), attn_implementation="sdpa")
    device = "cuda" if on_gpu() else "cpu"
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    opt = exp.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt.learning_rate,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    inputs, targets, positions = (
        torch.from_numpy(batch[k]).long().to(device) for k in ("inputs", "targets", "positions")
    )

    def loss_fn():
        logits = model(input_ids=inputs, position_ids=positions).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    if on_gpu():
        loss_fn = torch.compile(loss_fn)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu()):
            loss = loss_fn()
        loss.backward()
        if opt.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()
        loss.item()  # waits for the step

    return time_calls(step, steps, warmup)


def matmul_ceiling(steps: int) -> float:
    """FLOP/s of a large square matmul in JAX (float32 on CPU, bfloat16 on GPU), best of `steps`."""
    n = MATMUL_SIZE * (4 if on_gpu() else 1)
    dtype = jnp.bfloat16 if on_gpu() else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    timing = time_calls(lambda: matmul(a, b).block_until_ready(), max(steps, 5), 2)
    return 2 * n**3 / timing.best


def benchmark(
    name: str,
    layout: dict,
    ceiling: float,
    steps: int,
    warmup: int,
    with_torch: bool,
    attention_impl: str | None = None,
) -> dict:
    """Times config `name` on `layout` (and torch's), our attention by `attention_impl` (None:
    the config's); returns its row of results."""
    extra = {"model.attention_impl": attention_impl} if attention_impl else None
    exp = experiment(name, layout, extra)
    cfg = exp.model
    batch = random_batch(exp)
    tokens = exp.tokens_per_step
    flops_per_token = flops.train_flops_per_token(cfg, exp.seq_len)

    def figures(timing: Timing) -> dict:
        return {
            "ms_per_step": 1e3 * timing.best,
            "ms_per_step_median": 1e3 * timing.median,
            "tokens_per_second": tokens / timing.best,
            "flops_per_second": tokens * flops_per_token / timing.best,
            "fraction_of_ceiling": tokens * flops_per_token / timing.best / ceiling,
        }

    timing, memory = time_ours(exp, batch, steps, warmup)
    row = {
        "config": name,
        "mesh": {k: v for k, v in exp.mesh.sizes if v != 1} or {"data": 1},
        "context_parallel": cfg.context_parallel,
        "pipeline": dataclasses.asdict(exp.pipeline),
        "attention_impl": cfg.attention_impl,
        "memory_per_device": memory,
        "params": flops.param_counts(cfg)["total"],
        "batch_size": exp.batch_size,
        "seq_len": exp.seq_len,
        "flops_per_token": flops_per_token,
        "ours": figures(timing),
    }
    row["active_params"] = flops.param_counts(cfg)["active"]
    if with_torch and not cfg.moe.num_experts:  # Llama has no experts
        row["torch"] = figures(time_torch(exp, batch, steps, warmup))
        row["ours_over_torch"] = (
            row["ours"]["tokens_per_second"] / row["torch"]["tokens_per_second"]
        )
    return row


def loss_memory(vocab_sizes: list[int]) -> list[dict]:
    """Per vocabulary size: the default config's compiled train step's temporary bytes per device
    (XLA memory analysis) with each `config.loss.impl`."""
    rows = []
    for vocab in vocab_sizes:
        row = {"vocab_size": vocab}
        for impl in LOSS_IMPLS:
            exp = experiment("default", extra={"model.vocab_size": vocab, "loss.impl": impl})
            setup, train_step, _ = compile_ours(exp, random_batch(exp))
            row[impl] = partitioning.memory_report(setup.state, train_step).get("temp")
            del setup, train_step
        rows.append(row)
    return rows


def print_loss_memory(rows: list[dict]) -> None:
    exp = experiment("default")
    print(
        f"\ntrain step temporary memory per device (XLA memory analysis), default config "
        f"({exp.batch_size}x{exp.seq_len} tokens, loss chunks of {exp.loss.vocab_chunk} vocab x "
        f"{exp.loss.seq_block} positions):"
    )
    print(f"{'vocab':>7} {'plain MiB':>10} {'chunked MiB':>12} {'plain/chunked':>14}")
    for row in rows:
        if row["plain"] is None:  # a backend without memory analysis
            print(f"{row['vocab_size']:>7} (no memory analysis on this backend)")
            continue
        print(
            f"{row['vocab_size']:>7} {row['plain'] / 2**20:>10.1f} {row['chunked'] / 2**20:>12.1f} "
            f"{row['plain'] / row['chunked']:>13.2f}x"
        )


def print_table(rows: list[dict], ceiling: float) -> None:
    print(f"\nmatmul ceiling ({MATMUL_SIZE}^3 in JAX): {ceiling / 1e12:.3f} TFLOP/s")
    header = (
        f"{'config':<16} {'params':>7} {'B x L':>8} {'impl':<6} {'ms/step':>8} {'tokens/s':>9} "
        f"{'TFLOP/s':>8} {'ceiling':>8} {'ours/torch':>10} {'active':>7} {'tok/s vs 1st':>12}"
    )
    print(header)
    print("-" * len(header))
    first = rows[0]["ours"]["tokens_per_second"]
    for row in rows:
        for impl in ("ours", "torch"):
            if impl not in row:
                continue
            r = row[impl]
            ratio = f"{row['ours_over_torch']:.2f}x" if impl == "ours" and "torch" in row else ""
            print(
                f"{row['config']:<16} {row['params'] / 1e6:>6.1f}M "
                f"{row['batch_size']:>3}x{row['seq_len']:<4} {impl:<6} {r['ms_per_step']:>8.1f} "
                f"{r['tokens_per_second']:>9,.0f} {r['flops_per_second'] / 1e12:>8.3f} "
                f"{r['fraction_of_ceiling']:>8.2f} {ratio:>10} {row['active_params'] / 1e6:>6.1f}M "
                f"{r['tokens_per_second'] / first:>11.2f}x"
            )
    print(f"\n{'config':<8} {'layout':<32} {'ms/step':>8} {'tokens/s':>9} {'vs first':>8}  memory")
    for row in rows:
        mesh = " x ".join(f"{axis}={size}" for axis, size in row["mesh"].items())
        if "sequence" in row["mesh"]:
            mesh += f" ({row['context_parallel']})"
        if "stage" in row["mesh"]:
            p = row["pipeline"]
            mesh += f" ({p['schedule']} M={p['microbatches']} v={p['virtual_stages']})"
        memory = instruments.format_memory(row["memory_per_device"]).removeprefix(
            "memory per device: "
        )
        print(
            f"{row['config']:<8} {mesh:<32} {row['ours']['ms_per_step']:>8.1f} "
            f"{row['ours']['tokens_per_second']:>9,.0f} {row['ours_over_first_layout']:>7.2f}x  "
            f"{memory}"
        )


def environment() -> dict:
    import torch
    import transformers

    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def define_flags() -> None:
    flags.DEFINE_list("configs", ["default", "large"], "Configs to time (keys of CONFIGS).")
    flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, allocator).")
    flags.DEFINE_bool("torch", True, "Also time the Hugging Face / torch baseline.")
    flags.DEFINE_list(
        "loss_vocabs",
        ["4096", "32768", "131072"],
        "Vocabulary sizes of the loss memory table (plain vs chunked loss); empty to skip.",
    )
    flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
    flags.DEFINE_string(
        "attention_impl", None, "model.attention_impl for our step (default: the config's)."
    )
    flags.DEFINE_multi_string(
        "mesh",
        [],
        "A layout to time (repeatable): mesh sizes and optionally the context-parallel mode or "
        "the pipeline's fields, e.g. --mesh=data=8 --mesh=data=2,sequence=4,context_parallel="
        "all_gather --mesh=stage=2,data=4,schedule=1f1b,microbatches=4. Default: the config's.",
    )


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    unknown = set(f.configs) - set(CONFIGS)
    if unknown:
        raise app.UsageError(f"unknown --configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    env = environment()
    print(", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    ceiling = matmul_ceiling(f.steps)
    layouts = [parse_layout(text) for text in f.mesh] or [{}]
    rows = []
    for name in f.configs:
        first = None
        for layout in layouts:
            row = benchmark(
                name,
                layout,
                ceiling,
                f.steps,
                f.warmup,
                f.torch and first is None,
                f.attention_impl,
            )
            first = first or row
            row["ours_over_first_layout"] = (
                row["ours"]["tokens_per_second"] / first["ours"]["tokens_per_second"]
            )
            rows.append(row)
    print_table(rows, ceiling)
    memory_rows = loss_memory([int(v) for v in f.loss_vocabs])
    if memory_rows:
        print_loss_memory(memory_rows)
    if f.out:
        results = {
            "environment": env,
            "matmul_flops_per_second": ceiling,
            "results": rows,
            "loss_memory": memory_rows,
        }
        with open(f.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
