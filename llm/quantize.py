"""Post-training quantization: a trained run's checkpoint rewritten with quantized weights.

    python -m llm.quantize --workdir=/tmp/default --mode=int8 --out=/tmp/default_int8
    python -m llm.evaluate --workdir=/tmp/default_int8      # eval loss of the quantized model
    python -m llm.sample --workdir=/tmp/default_int8 --kv_cache=int8

--mode: int8 (weights int8 per output channel, float activations), int8_w8a8 (also activations
int8 per token: config.quant.mode=int8), int4 (weights int4 in groups of --group_size inputs,
stored two values a byte and unpacked inside the jitted matmul). The targets (config.quant.targets, --targets) are stored quantized,
everything else (embeddings unless the head is targeted and tied, norms, routers) stays float.
OUT receives config.json (the run's, with config.quant set) and checkpoints/STEP (the
parameters, and the step in place of the optimizer state).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx

from llm import config as config_lib
from llm.errors import ConfigError, check
from llm.model import quant
from llm.runs import load_experiment, load_run
from llm.training import checkpoint

MODES = {"int8": ("int8", "none"), "int8_w8a8": ("int8", "int8"), "int4": ("int4", "none")}


def state_bytes(model: nnx.Module) -> int:
    """Bytes of a model's arrays in memory."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)))


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quantized_config(
    config: ml_collections.ConfigDict, mode: str, targets: str | None, group_size: int | None
) -> ml_collections.ConfigDict:
    """The run's config with config.quant set for `mode` (a MODES key); checked by resolving it."""
    check(mode in MODES, f"--mode={mode!r} is not one of {tuple(MODES)}.")
    weights, act_mode = MODES[mode]
    recorded = config.to_dict()
    previous = recorded.get("quant", {})
    recorded["quant"] = {
        "mode": act_mode,
        "targets": targets or previous.get("targets", quant.QuantConfig.targets),
        "group_size": group_size or previous.get("group_size", quant.QuantConfig.group_size),
        "weights": weights,
    }
    new = ml_collections.ConfigDict(recorded)
    load_experiment(new)  # ConfigError (unknown target, group size) before anything is written
    return new


def quantize_run(
    run: str, out: str, mode: str, targets: str | None = None, group_size: int | None = None
) -> dict[str, int]:
    """Writes `run` (DIR or DIR@STEP) quantized as `mode` to `out`; returns the bytes in memory
    and on disk of the parameters before and after."""
    workdir, step = checkpoint.split_step(run)
    model, config = load_run(run)
    new_config = quantized_config(config, mode, targets, group_size)
    if step is None:
        step = checkpoint.make_manager(workdir, async_save=False, create=False).latest_step()
    out_path = pathlib.Path(out)
    check(
        not (out_path / "checkpoints").exists(),
        f"--out={out} already holds checkpoints: pick a new directory.",
    )
    before = state_bytes(model)
    quant.quantize_model(model, config_lib.model_config(new_config).quant)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "config.json").write_text(json.dumps(new_config.to_dict(), indent=2) + "\n")
    manager = checkpoint.make_manager(out_path, async_save=False)
    manager.save(  # no optimizer state: the step alone, so `llm.checkpoints` verifies the run
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.state(model)),
            opt_state=ocp.args.StandardSave({"step": jnp.asarray(step, jnp.int32)}),
        ),
    )
    manager.wait_until_finished()
    source = pathlib.Path(workdir) / "checkpoints" / str(step) / "params"
    return {
        "step": step,
        "memory_before": before,
        "memory_after": state_bytes(model),
        "disk_before": dir_bytes(source),
        "disk_after": dir_bytes(out_path / "checkpoints" / str(step) / "params"),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not (f.workdir and f.out):
        print("error: pass --workdir=DIR[@STEP] (a trained run) and --out=DIR.", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        r = quantize_run(f.workdir, f.out, f.mode, f.targets, f.group_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    mib = 2**20
    print(
        f"step {r['step']} quantized ({f.mode}) to {f.out}: parameters "
        f"{r['memory_before'] / mib:.2f} -> {r['memory_after'] / mib:.2f} MiB in memory, "
        f"{r['disk_before'] / mib:.2f} -> {r['disk_after'] / mib:.2f} MiB on disk"
    )


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Trained run directory; DIR@STEP for a step.")
    flags.DEFINE_string("out", None, "Directory for the quantized run (new).")
    flags.DEFINE_enum("mode", "int8", list(MODES), "int8 | int8_w8a8 | int4 (module docstring).")
    flags.DEFINE_string(
        "targets", None, "Comma-separated targets (default: the run's quant.targets)."
    )
    flags.DEFINE_integer("group_size", None, "int4: inputs per scale (default: the run's).")
    app.run(main, flags_parser=config_lib.parse_flags)
