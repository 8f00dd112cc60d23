"""Post-training study: full fine-tuning vs LoRA vs QLoRA on the shipped SFT set, then DPO.

    nice -n 10 python -m experiments.studies.post_training --workdir=/tmp/post_training

Pretrains the default model (experiments/default.py) briefly (--pretrain_steps), then fine-tunes
it on data/post_training's SFT set for the same number of steps (--sft_steps) each way: all
parameters, LoRA r=8 and r=64 (alpha = 2 r, every attention and MLP projection), QLoRA r=8 with
an int8 and an nf4 base. Each gets its validation loss (response tokens only), its trainable
parameters and its train-state bytes (parameters + optimizer state, `llm.lora.state_bytes`; one
device here, so per device = whole). Then DPO of all parameters (main refuses LoRA under DPO) from
the full SFT run, which is also the frozen reference, on the shipped preference pairs: validation
preference accuracy, reward margin and KL to the reference at each evaluation; at step 0 the
policy is the reference, so margin and KL are 0 and every pair is a tie (accuracy 0, chance 0.5).
Finished runs in --workdir are reused. Writes results.json, results.md, sft.png and dpo.png to
--out_dir; `--replot` redraws the figures from its results.json. One seed.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import ml_collections
from absl import app, flags, logging

from experiments import default
from experiments.post_training import dpo, sft_full
from llm import config as config_lib
from llm import lora, train
from llm.training import metrics

FLAGS = flags.FLAGS
METHODS = {  # name -> config.lora overrides and learning rate (the shipped configs' rates)
    "full": ({"lora.rank": 0}, 3e-4),
    "LoRA r=8": ({"lora.rank": 8, "lora.alpha": 16.0}, 1e-3),
    "LoRA r=64": ({"lora.rank": 64, "lora.alpha": 128.0}, 1e-3),
    "QLoRA r=8 int8": ({"lora.rank": 8, "lora.alpha": 16.0, "lora.quantize": "int8"}, 1e-3),
    "QLoRA r=8 nf4": ({"lora.rank": 8, "lora.alpha": 16.0, "lora.quantize": "nf4"}, 1e-3),
}


def define_flags() -> None:
    flags.DEFINE_string("workdir", "/tmp/post_training", "Scratch directory for the runs.")
    flags.DEFINE_string("out_dir", "experiments/results/post_training", "Where results go.")
    flags.DEFINE_integer("pretrain_steps", 100, "Steps of the default model's pretraining.")
    flags.DEFINE_integer("sft_steps", 40, "Steps of each SFT run (equal for all methods).")
    flags.DEFINE_integer("dpo_steps", 40, "Steps of the DPO run.")
    flags.DEFINE_integer("batch_size", 8, "Sequences (SFT, pretraining) or pairs (DPO) per step.")
    flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
    flags.DEFINE_bool("replot", False, "Redraw --out_dir's figures from its results.json.")


def schedule(
    config: ml_collections.ConfigDict, steps: int, evals: int
) -> ml_collections.ConfigDict:
    """`config` for `steps` steps at the flags' shapes, evaluated `evals` times."""
    every = max(1, steps // evals)
    return config_lib.with_overrides(
        config,
        {
            "steps": steps, "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
            "log_every": every, "eval_every": every, "checkpoint_every": steps,
            "optimizer.warmup_steps": max(1, steps // 10), "sample_prompt": "",
        },
    )  # fmt: skip


def sft_row(name: str, workdir: pathlib.Path) -> dict:
    """Fine-tunes the pretrained run by `name`'s method; one results row."""
    overrides, rate = METHODS[name]
    config = config_lib.with_overrides(
        schedule(sft_full.get_config(), FLAGS.sft_steps, 1),
        {**overrides, "optimizer.learning_rate": rate,
         "init_from": f"workdir:{workdir / 'pretrain'}"},
    )  # fmt: skip
    start = time.perf_counter()
    final = train.train_and_evaluate(config, str(workdir / name.replace(" ", "_")))
    size = lora.state_bytes(config_lib.resolve(config))
    return {
        "method": name,
        "learning_rate": rate,
        "eval_loss": final["eval_loss"],
        "trainable_params": size["trained"] // 4,  # float32
        "param_bytes": size["params"],
        "optimizer_bytes": size["optimizer"],
        "train_seconds": time.perf_counter() - start,
    }


def dpo_row(workdir: pathlib.Path) -> dict:
    """DPO of all parameters from the full SFT run; the validation metrics at each evaluation."""
    config = config_lib.with_overrides(
        schedule(dpo.get_config(), FLAGS.dpo_steps, 4),
        {"init_from": f"workdir:{workdir / 'full'}"},
    )
    start = time.perf_counter()
    train.train_and_evaluate(config, str(workdir / "dpo"))
    curve = [{"step": 0, "accuracy": 0.0, "reward_margin": 0.0, "kl_to_ref": 0.0}]  # policy = ref
    for r in metrics.read_metrics(workdir / "dpo"):
        if "eval_dpo/accuracy" in r:
            keys = ("accuracy", "reward_margin", "kl_to_ref", "loss")
            curve.append({"step": r["step"], **{k: r[f"eval_dpo/{k}"] for k in keys}})
    return {"beta": config.post_training.beta, "learning_rate": config.optimizer.learning_rate,
            "curve": curve, "train_seconds": time.perf_counter() - start}  # fmt: skip


def write_results(result: dict, out: pathlib.Path) -> None:
    """results.json, results.md and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    mib = 2**20
    lines = [
        "# Post-training: full fine-tuning vs LoRA vs QLoRA, then DPO",
        "",
        f"Command: `{result['command']}`  ",
        (
            f"{result['date']}, {result['machine']}; wall time {result['wall_seconds'] / 60:.1f} min; "
            "one seed."
        ),
        "",
        (
            f"SFT: {result['sft_steps']} steps of {result['batch_size']} x {result['seq_len']} tokens "
            f"from the default model pretrained {result['pretrain_steps']} steps "
            f"(its eval loss on the corpus: {result['pretrain_eval_loss']:.3f})."
        ),
        "",
        (
            "| method | lr | trainable params | params (MiB) | optimizer state (MiB) | "
            "params + optimizer per device (MiB) | validation loss |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sft"]:
        total = (r["param_bytes"] + r["optimizer_bytes"]) / mib
        lines.append(
            f"| {r['method']} | {r['learning_rate']:g} | {r['trainable_params']:,} | "
            f"{r['param_bytes'] / mib:.2f} | {r['optimizer_bytes'] / mib:.2f} | {total:.2f} | "
            f"{r['eval_loss']:.3f} |"
        )
    d = result["dpo"]
    lines += [
        "",
        (
            f"DPO (all parameters, beta {d['beta']}, lr {d['learning_rate']:g}, "
            f"{result['dpo_steps']} steps of {result['batch_size']} pairs) from the full SFT run, "
            "on the validation pairs (step 0: the policy is the reference, every pair a tie):"
        ),
        "",
        "| step | preference accuracy | reward margin | KL to reference (nats/token) |",
        "|---:|---:|---:|---:|",
    ]
    for c in d["curve"]:
        lines.append(
            f"| {c['step']} | {c['accuracy']:.3f} | {c['reward_margin']:.4f} | "
            f"{c['kl_to_ref']:.5f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(result, out)


def plot_results(result: dict, out: pathlib.Path) -> None:
    """sft.png (validation loss against trainable parameters and against memory) and dpo.png."""
    from matplotlib import ticker  # matplotlib only when plotting

    from llm.science import plots

    note = "one seed per method"
    fig, axes = plots.figure(1, 2, size=(10, 4))
    # one point per method, no lines between unrelated runs; the r=8 runs share a parameter
    # count, so shrinking markers of different shapes keep each visible
    for i, r in enumerate(result["sft"]):
        memory = (r["param_bytes"] + r["optimizer_bytes"]) / 2**20
        style = {"marker": "os^Dv"[i % 5], "ls": "none", "ms": 9 - i, "alpha": 0.85}
        axes[0].plot(r["trainable_params"], r["eval_loss"], **style, label=r["method"])
        axes[1].plot(memory, r["eval_loss"], **style)
    axes[0].set(
        xscale="log",
        xlabel="trainable parameters (count, log scale)",
        ylabel="SFT validation loss (nats/response token)",
        title="Loss vs trained size",
    )
    axes[1].set(
        xlabel="parameters + optimizer state per device (MiB)",
        ylabel="SFT validation loss (nats/response token)",
        title="Loss vs memory",
    )
    axes[0].set_xlim(1e5, 1e7)  # whole decades labelled
    axes[0].xaxis.set_minor_formatter(ticker.NullFormatter())  # no overlapping minor labels
    fig.legend(loc="outside right upper")
    plots.save(fig, out / "sft.png", note=f"{note}; {result['sft_steps']} steps each")

    curve = result["dpo"]["curve"]
    steps = [c["step"] for c in curve]
    fig, axes = plots.figure(1, 3, size=(12, 3.6))
    panels = [("accuracy", "preference accuracy (fraction)"),
              ("reward_margin", "reward margin (beta x nats)"),
              ("kl_to_ref", "KL to reference (nats/token)")]  # fmt: skip
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [c[key] for c in curve], "o-", label="DPO, validation pairs")
        ax.set(xlabel="DPO step", ylabel=label)
    axes[0].axhline(0.5, color="gray", ls="--", label="chance")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")
    plots.save(fig, out / "dpo.png", note=f"{note}; step 0: policy = reference (ties)")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    del argv
    out = pathlib.Path(FLAGS.out_dir)
    if FLAGS.replot:
        plot_results(json.loads((out / "results.json").read_text()), out)
        return
    workdir = pathlib.Path(FLAGS.workdir)
    start = time.perf_counter()
    pretrain = train.train_and_evaluate(
        schedule(default.get_config(), FLAGS.pretrain_steps, 1), str(workdir / "pretrain")
    )
    sft = [sft_row(name, workdir) for name in METHODS]
    result = {
        "command": " ".join(["python -m experiments.studies.post_training", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": "shared 2-core CPU (one device), about one core free",
        "pretrain_steps": FLAGS.pretrain_steps, "sft_steps": FLAGS.sft_steps,
        "dpo_steps": FLAGS.dpo_steps, "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
        "pretrain_eval_loss": pretrain["eval_loss"],
        "sft": sft,
        "dpo": dpo_row(workdir),
    }  # fmt: skip
    result["wall_seconds"] = time.perf_counter() - start
    write_results(result, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
