"""muP's coordinate check (Tensor Programs V, figure 5): train each width for a few steps under sp
and under mup, and plot the RMS of each layer type's output against width, one curve per step.
Under mup the curves are flat; under sp, trained with Adam at one learning rate, they grow.

    python -m llm.mup_check --widths=64,128,256,512 --steps=8 --out=experiments/results/mup

Widths are embed_dim; mlp_dim keeps the config's ratio to it, the heads stay num_heads (head_dim
grows) and the smallest width is muP's base. The learning rate is constant (no warmup, no decay);
every width sees the same batches and is measured on the first one. Writes coord_check.png and
coord_check.json (the statistics, and the slope of log2 RMS against log2 width at the last step).
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import ml_collections
from absl import app, flags

from llm import config as config_lib
from llm.parallel import partitioning
from llm.science import coordinates, plots
from llm.training import loop

PARAMETRIZATIONS = ("sp", "mup")
History = list[dict[str, float]]  # after 0, 1, ..., steps steps: {layer type: RMS}


def width_config(
    config: ml_collections.ConfigDict, width: int, base_width: int, parametrization: str, steps: int
) -> ml_collections.ConfigDict:
    """`config` at embed_dim `width` (mlp_dim in proportion), trained `steps` steps at a constant
    learning rate."""
    ratio = config.model.mlp_dim / config.model.embed_dim
    return config_lib.with_overrides(
        config,
        {
            "steps": steps,
            "optimizer.warmup_steps": 0,
            "optimizer.min_learning_rate_ratio": 1.0,
            "model.embed_dim": width,
            "model.mlp_dim": round(ratio * width),
            "model.parametrization": parametrization,
            "model.mup_base_width": base_width,
        },
    )


def measure(exp, train_data, steps: int) -> History:
    """`activation_rms` on the first batch at initialization and after each of `steps` steps."""
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
    with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
        sharding = partitioning.batch_sharding(mesh, exp.mesh.rules)

        def batch(step: int) -> dict[str, jax.Array]:
            return {k: jax.device_put(v, sharding) for k, v in train_data.batch(step, exp.batch_size).items()}  # fmt: skip

        setup = loop.setup_state(exp, mesh)
        probe = batch(0)
        train_step = loop.compile_train_step(exp, setup, probe)
        stats = jax.jit(functools.partial(coordinates.batch_rms, setup.graphdef))
        state, history = setup.state, [stats(setup.state.params, probe)]
        for step in range(steps):
            state, _ = train_step(state, batch(step))
            history.append(stats(state.params, probe))
    return [{k: float(v) for k, v in h.items()} for h in jax.device_get(history)]


def coordinate_check(
    config: ml_collections.ConfigDict, widths: list[int], steps: int
) -> dict[str, dict[int, History]]:
    """parametrization -> width -> History, for sp and mup (base width: the smallest)."""
    widths = sorted(widths)
    exps = {  # every config checked before anything trains
        p: {w: config_lib.resolve(width_config(config, w, widths[0], p, steps)) for w in widths}
        for p in PARAMETRIZATIONS
    }
    _, train_data, _ = exps["sp"][widths[0]].load_data()  # the same batches for every width
    return {
        p: {w: measure(exp, train_data, steps) for w, exp in by_width.items()}
        for p, by_width in exps.items()
    }


def slopes(results: dict[str, dict[int, History]], step: int = -1) -> dict[str, dict[str, float]]:
    """parametrization -> layer type -> slope of log2 RMS against log2 width after `step` steps."""
    return {
        p: {
            kind: coordinates.width_slope(
                list(by_width), [h[step][kind] for h in by_width.values()]
            )
            for kind in coordinates.LAYER_TYPES
        }
        for p, by_width in results.items()
    }


def plot(results: dict[str, dict[int, History]], path: pathlib.Path, note: str) -> pathlib.Path:
    """One panel per (parametrization, layer type): RMS against width, a curve per step."""
    kinds = coordinates.LAYER_TYPES
    fig, axes = plots.figure(len(results), len(kinds), size=(2.4 * len(kinds), 2.3 * len(results)))
    for row, (p, by_width) in enumerate(results.items()):
        widths = list(by_width)
        steps = len(next(iter(by_width.values())))
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            for t in range(steps):
                values = [by_width[w][t][kind] for w in widths]
                color = plots.plt.get_cmap("viridis")(t / max(steps - 1, 1))
                ax.plot(widths, values, marker="o", color=color, label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p}: {kind}")
            ax.set_xlabel("width (embed_dim)")
            ax.set_ylabel("RMS of output")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return plots.save(fig, path, note=note)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    widths = [int(w) for w in f.widths]
    if len(widths) < 2 or min(widths) <= 0 or f.steps < 1:
        print(
            "error: pass --widths=W1,W2,... (two or more, > 0) and --steps >= 1.", file=sys.stderr
        )
        sys.exit(2)
    try:
        results = coordinate_check(f.config, widths, f.steps)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    fitted = slopes(results)
    record = {"widths": sorted(widths), "steps": f.steps, "slopes": fitted, "results": results}
    (out / "coord_check.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(
        results,
        out / "coord_check.png",
        note=f"{f.steps} Adam steps, lr {f.config.optimizer.learning_rate}",
    )
    print("| parametrization | " + " | ".join(coordinates.LAYER_TYPES) + " |")
    print("|---" * (1 + len(coordinates.LAYER_TYPES)) + "|")
    for p, row in fitted.items():
        print(f"| {p} | " + " | ".join(f"{row[k]:+.2f}" for k in coordinates.LAYER_TYPES) + " |")
    print(f"wrote {out / 'coord_check.png'} and {out / 'coord_check.json'}")


def define_flags() -> None:
    config_lib.define_config_flag()
    flags.DEFINE_list(
        "widths",
        ["64", "128", "256", "512"],
        "embed_dim of each model; the smallest is muP's base.",
    )
    flags.DEFINE_integer("steps", 8, "Adam steps per width (curves after 0..steps).")
    flags.DEFINE_string(
        "out", "experiments/results/mup", "Directory for coord_check.png and .json."
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
