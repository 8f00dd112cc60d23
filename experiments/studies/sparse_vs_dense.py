"""Sparse vs dense attention at equal training FLOPs on the shipped corpus, sized for a CPU.

    nice -n 10 python -m experiments.studies.sparse_vs_dense --workdir=/tmp/sparse_vs_dense

Trains one tiny model per attention schedule (llm/model/patterns.py), each for as many steps as the
FLOP budget buys it (llm.science.flops.train_flops_per_token counts each pattern's attended pairs, so
sparse schedules take more steps than dense), then measures final eval loss, eval loss per
position bucket, passkey retrieval accuracy by candidate ranking (llm/science/probes.py) at several
context lengths and depths, and the measured train step time. Writes results.csv, results.md,
position_loss.png and passkey.png to --out_dir; `--replot` redraws the figures from results.json.

On a CPU the XLA reference attention computes every score and masks afterwards, so step times
show no sparse speed-up there; block-skipping kernels (pallas_gpu, pallas_tpu) realize it.
"""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments import default
from llm import config as config_lib
from llm import runs, train
from llm.science import flops, probes

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string(
        "workdir", "/tmp/sparse_vs_dense", "Scratch directory for the training runs."
    )
    flags.DEFINE_string("out_dir", "experiments/results/sparse_vs_dense", "Where results go.")
    flags.DEFINE_integer("seq_len", 1024, "Training context (tokens).")
    flags.DEFINE_integer("batch_size", 4, "Sequences per step.")
    flags.DEFINE_integer(
        "dense_steps", 150, "Steps of the dense run; fixes the FLOP budget of all."
    )
    flags.DEFINE_integer("window", 128, "attention_window of the sparse schedules.")
    flags.DEFINE_integer("num_global", 32, "attention_global of local_global.")
    flags.DEFINE_multi_string(
        "schedule",
        ["dense", "sliding", "local_global", "sliding*3,dense", "nsa"],
        "attention_pattern of one run (llm/model/patterns.py syntax); repeat the flag for several runs.",
    )
    flags.DEFINE_list("context_lens", ["256", "512", "1024"], "Passkey prompt lengths (tokens).")
    flags.DEFINE_list("depths", ["0", "0.5", "0.9"], "Passkey needle depths in the filler.")
    flags.DEFINE_integer("trials", 16, "Passkey prompts per (context length, depth).")
    flags.DEFINE_integer("candidates", 5, "Keys ranked per prompt (chance = 1 / candidates).")
    flags.DEFINE_integer("position_buckets", 8, "Buckets of the per-position loss curve.")
    flags.DEFINE_bool(
        "replot",
        False,
        "Redraw --out_dir's figures from its results.json (with the run's --trials, --candidates "
        "and --window); train nothing.",
    )


def base_config(
    seq_len: int, batch_size: int, window: int, num_global: int
) -> ml_collections.ConfigDict:
    """The default experiment shrunk to a 4-layer, 64-wide model at a long context."""
    return config_lib.with_overrides(
        default.get_config(),
        {
            "seq_len": seq_len, "batch_size": batch_size, "eval_batches": 8, "sample_prompt": "",
            "model.num_layers": 4, "model.embed_dim": 64, "model.num_heads": 4,
            "model.num_kv_heads": 2, "model.mlp_dim": 192, "model.max_seq_len": seq_len,
            "model.attention_window": window, "model.attention_global": num_global,
        },
    )  # fmt: skip


def flags_config() -> ml_collections.ConfigDict:
    """`base_config` at the flags' sizes."""
    return base_config(FLAGS.seq_len, FLAGS.batch_size, FLAGS.window, FLAGS.num_global)


def run(schedule: str, budget: float, workdir: pathlib.Path) -> dict:
    """Trains `schedule` for budget FLOPs, then probes it; one results row."""
    config = config_lib.with_overrides(flags_config(), {"model.attention_pattern": schedule})
    cfg = config_lib.model_config(config)
    per_token = flops.train_flops_per_token(cfg, config.seq_len)
    steps = flops.steps_for_budget(cfg, budget, config.batch_size, config.seq_len)
    config = config_lib.with_overrides(
        config,
        {
            "steps": steps,
            "log_every": min(25, steps),
            "eval_every": steps,
            "checkpoint_every": steps,
            "optimizer.warmup_steps": steps // 10,
        },
    )
    path = workdir / schedule.replace(",", "_").replace("*", "x")
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, str(path))
    train_seconds = time.perf_counter() - start

    model, _ = runs.load_run(str(path))
    tokenizer, _, eval_data = config_lib.resolve(config).load_data()
    batches = [eval_data.batch(i, config.batch_size) for i in range(config.eval_batches)]
    starts, position_loss = probes.position_losses(
        model, batches, FLAGS.position_buckets, config.seq_len
    )
    filler = eval_data.arrays["inputs"][eval_data.arrays["weights"] > 0]  # no padding
    passkey = probes.passkey_retrieval(
        model,
        tokenizer.encode,
        filler,
        [int(n) for n in FLAGS.context_lens],
        [float(d) for d in FLAGS.depths],
        FLAGS.trials,
        num_candidates=FLAGS.candidates,
        bos_id=tokenizer.bos_id,
    )
    attention = sum(flops.attention_flops_per_sequence(cfg, config.seq_len)) / config.seq_len
    return {
        "schedule": schedule,
        "train_flops_per_token": per_token,
        "attention_flops_per_token": attention,
        "steps": steps,
        "train_flops": per_token * steps * config.batch_size * config.seq_len,
        "eval_loss": metrics["eval_loss"],
        "step_ms": 1e3 * config.batch_size * config.seq_len / metrics["tokens_per_second"],
        "train_seconds": train_seconds,
        "passkey_accuracy": float(np.mean([r["accuracy"] for r in passkey])),
        "position_starts": starts.tolist(),
        "position_loss": position_loss.tolist(),
        "passkey": passkey,
    }


def write_results(rows: list[dict], out: pathlib.Path, command: str, wall: float) -> None:
    """results.json, results.csv, results.md and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    columns = [
        "schedule", "steps", "train_flops", "train_flops_per_token", "attention_flops_per_token",
        "eval_loss", "passkey_accuracy", "step_ms", "train_seconds",
    ]  # fmt: skip
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    dense = rows[0]
    lines = [
        "# Sparse vs dense attention at equal training FLOPs",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall / 60:.1f} min on a shared 2-core CPU ({time.strftime('%Y-%m-%d')}).",
        "",
        (
            "| schedule | steps | train GFLOP | MFLOP/token (attention) | eval loss | passkey acc "
            f"(chance {1 / FLAGS.candidates:.2f}) | step ms (vs {dense['schedule']}) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['steps']} | {r['train_flops'] / 1e9:.0f} | "
            f"{r['train_flops_per_token'] / 1e6:.2f} ({r['attention_flops_per_token'] / 1e6:.2f}) | "
            f"{r['eval_loss']:.3f} | {r['passkey_accuracy']:.2f} | "
            f"{r['step_ms']:.0f} ({r['step_ms'] / dense['step_ms']:.2f}x) |"
        )
    lines += [
        "",
        "Passkey accuracy per (context length, depth), mean needle distance in tokens:",
        "",
    ]
    cells = [(p["context_len"], p["depth"], p["needle_distance"]) for p in dense["passkey"]]
    lines.append("| schedule | " + " | ".join(f"{n}@{d} ({s:.0f})" for n, d, s in cells) + " |")
    lines.append("|---" * (len(cells) + 1) + "|")
    for r in rows:
        lines.append(
            f"| {r['schedule']} | "
            + " | ".join(f"{p['accuracy']:.2f}" for p in r["passkey"])
            + " |"
        )
    lines += ["", "Eval loss per position bucket (position in the document):", ""]
    lines.append("| schedule | " + " | ".join(f"{s}-" for s in dense["position_starts"]) + " |")
    lines.append("|---" * (len(dense["position_starts"]) + 1) + "|")
    for r in rows:
        lines.append(
            f"| {r['schedule']} | " + " | ".join(f"{v:.3f}" for v in r["position_loss"]) + " |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    plot_results(rows, out)


def plot_results(rows: list[dict], out: pathlib.Path) -> None:
    """position_loss.png and passkey.png from the rows (as measured, or read from results.json)."""
    from llm.science import plots  # matplotlib only when plotting

    note = "one seed per schedule"
    fig, ax = plots.figure(size=(7, 4))
    for r in rows:
        starts = np.array(r["position_starts"])
        width = starts[1] - starts[0]
        ax.plot(starts + width / 2, r["position_loss"], "o-", label=r["schedule"])
    ax.set(
        xlabel="position in document (tokens, bucket centre)",
        ylabel="eval loss (nats/token)",
        title="Loss per position",
    )
    fig.legend(loc="outside right upper")
    plots.save(fig, out / "position_loss.png", note=note)

    lengths = sorted({p["context_len"] for p in rows[0]["passkey"]})
    fig, axes = plots.figure(1, len(lengths), size=(4.5 * len(lengths) + 2, 4))
    for ax, length in zip(np.atleast_1d(axes), lengths):
        for i, r in enumerate(rows):
            cells = sorted((p["needle_distance"], p["accuracy"]) for p in r["passkey"]
                           if p["context_len"] == length)  # fmt: skip
            distance, accuracy = (np.array(c) for c in zip(*cells))
            low, high = probes.wilson_interval(accuracy, FLAGS.trials)
            dodge = (i - (len(rows) - 1) / 2) * length / 80  # overlapping series stay visible
            ax.errorbar(distance + dodge, accuracy, yerr=[accuracy - low, high - accuracy],
                        fmt="o-", capsize=2, label=r["schedule"])  # fmt: skip
        ax.axhline(1 / FLAGS.candidates, color="gray", ls="--", label="chance")
        ax.axvline(FLAGS.window, color="gray", ls=":", label="attention window (sparse schedules)")
        ax.set(xlabel="needle distance (tokens)", ylabel="passkey accuracy", ylim=(-0.02, 1.02),
               title=f"context {length} tokens")  # fmt: skip
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside right upper")
    plots.save(fig, out / "passkey.png",
               note=f"{note}; error bars: 95% Wilson interval of {FLAGS.trials} trials")  # fmt: skip


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    del argv
    if FLAGS.replot:
        plot_results(json.loads((pathlib.Path(FLAGS.out_dir) / "results.json").read_text()),
                     pathlib.Path(FLAGS.out_dir))  # fmt: skip
        return
    command = " ".join(["python -m experiments.studies.sparse_vs_dense", *sys.argv[1:]])
    dense = config_lib.model_config(flags_config())
    budget = FLAGS.dense_steps * FLAGS.batch_size * FLAGS.seq_len
    budget *= flops.train_flops_per_token(dense, FLAGS.seq_len)
    start = time.perf_counter()
    rows = [run(s, budget, pathlib.Path(FLAGS.workdir)) for s in FLAGS.schedule]
    write_results(rows, pathlib.Path(FLAGS.out_dir), command, time.perf_counter() - start)
    print((pathlib.Path(FLAGS.out_dir) / "results.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
