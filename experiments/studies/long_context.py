"""Long-context extension: pretrain at a short context, continue at a long one with four RoPE
recipes, and measure what each model does with positions up to twice the long context.

    python -m experiments.studies.long_context --workdir=/tmp/long_context  # ~45 min, shared CPU
    python -m experiments.studies.long_context --steps=1000 --batch_size=16 --trials=32  # larger

The default model (experiments/default.py) is pretrained at --short_len. From its checkpoint
(config.init_from: same weights, fresh optimizer) four runs continue at --long_len for the same
tokens and steps (the batch shrinks by long_len / short_len) with:
    none   plain RoPE, unchanged;
    pi     position interpolation (rope_scaling linear, factor long_len / short_len);
    yarn   YaRN (rope_scaling yarn, same factor, original_max_position short_len);
    theta  a larger RoPE base (--long_theta), nothing else.
Against them, never extended: the pretrained model itself, the pretrained model given YaRN with
no training (YaRN's zero-shot claim), and a control that continues at short_len for the FLOPs of
a long continuation, so "more training" is told apart from "longer context".

Every model is evaluated on the held-out validation split packed at --eval_len (rows of
eval_len tokens; max_seq_len is eval_len, RoPE has no table, so positions past the trained context
are computed, not clipped): loss per position bucket (position within the row's document piece,
i.e. the context the token actually sees; llm/science/probes.py), and passkey retrieval by
ranking the true key among --candidates at --passkey_lens. Writes results.json, results.md,
position_loss.png and passkey.png to --out_dir; `--replot` rewrites the table and figures from
results.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from experiments import default
from llm import config as config_lib
from llm import runs, train
from llm.model.config import RopeScaling
from llm.model.transformer import Transformer
from llm.science import flops, probes

FLAGS = flags.FLAGS
LABELS = {
    "pretrained": "pretrained at short context (never extended)",
    "pretrained_yarn": "pretrained + YaRN, no training",
    "control": "continued at short context, equal FLOPs (never extended)",
    "none": "continued long, RoPE unchanged",
    "pi": "continued long, position interpolation",
    "yarn": "continued long, YaRN",
    "theta": "continued long, larger RoPE theta",
}


def define_flags() -> None:
    flags.DEFINE_string("workdir", "/tmp/long_context", "Scratch directory for the runs.")
    flags.DEFINE_string("out_dir", "experiments/results/long_context", "Where results go.")
    flags.DEFINE_integer("short_len", 256, "Pretraining context (tokens).")
    flags.DEFINE_integer("long_len", 1024, "Continued-training context (tokens).")
    flags.DEFINE_integer("eval_len", 2048, "Evaluation context: rows of this many tokens.")
    flags.DEFINE_integer("steps", 50, "Steps of the pretraining and of each continuation.")
    flags.DEFINE_integer("batch_size", 8, "Pretraining sequences per step (continuations: fewer).")
    flags.DEFINE_float("continue_lr", 1e-3, "Peak learning rate of the continuations.")
    flags.DEFINE_float("long_theta", 100_000.0, "RoPE base of the `theta` continuation.")
    flags.DEFINE_integer("eval_rows", 8, "Validation rows of eval_len tokens for position losses.")
    flags.DEFINE_integer("position_buckets", 8, "Buckets of the per-position loss curve.")
    flags.DEFINE_list("passkey_lens", ["1024", "2048"], "Passkey prompt lengths (tokens).")
    flags.DEFINE_list("depths", ["0.5"], "Passkey needle depths in the filler.")
    flags.DEFINE_integer("trials", 8, "Passkey prompts per (length, depth).")
    flags.DEFINE_integer("candidates", 4, "Keys ranked per prompt (chance = 1 / candidates).")
    flags.DEFINE_integer("seed", 0, "Seed of initialization and data order (one seed per call).")
    flags.DEFINE_bool("replot", False, "Rewrite --out_dir's table and figures from results.json.")


def base_config() -> ml_collections.ConfigDict:
    """The default model, able to take eval_len positions, at the flags' pretraining sizes."""
    return config_lib.with_overrides(
        default.get_config(),
        {
            "seed": FLAGS.seed, "seq_len": FLAGS.short_len, "batch_size": FLAGS.batch_size,
            "model.max_seq_len": FLAGS.eval_len, "sample_prompt": "",
        },
    )  # fmt: skip


def factor() -> float:
    return FLAGS.long_len / FLAGS.short_len


def scaling(kind: str) -> dict:
    """rope_scaling overrides of a recipe: factor long/short over the short pretraining context."""
    return {
        "model.rope_scaling.type": kind, "model.rope_scaling.factor": factor(),
        "model.rope_scaling.original_max_position": FLAGS.short_len,
    }  # fmt: skip


def continuations(pretrained: pathlib.Path) -> dict[str, dict]:
    """name -> overrides of each run continuing from the pretrained checkpoint."""
    long = {
        "seq_len": FLAGS.long_len, "batch_size": FLAGS.batch_size // int(factor()),
        "init_from": f"workdir:{pretrained}", "optimizer.learning_rate": FLAGS.continue_lr,
    }  # fmt: skip
    cfg = config_lib.model_config(base_config())
    budget = flops.train_flops_per_token(cfg, FLAGS.long_len) * FLAGS.long_len * long["batch_size"]
    budget *= FLAGS.steps  # FLOPs of one long continuation
    control_steps = flops.steps_for_budget(cfg, budget, FLAGS.batch_size, FLAGS.short_len)
    return {
        "control": {
            "init_from": long["init_from"], "optimizer.learning_rate": FLAGS.continue_lr,
            "steps": control_steps,
        },
        "none": long,
        "pi": {**long, **scaling("linear")},
        "yarn": {**long, **scaling("yarn")},
        "theta": {**long, "model.rope_theta": FLAGS.long_theta},
    }  # fmt: skip


def train_run(overrides: dict, path: pathlib.Path) -> dict:
    """Trains base_config() + overrides in a fresh `path` (no evaluation: probe() evaluates)."""
    config = config_lib.with_overrides(base_config(), {"steps": FLAGS.steps, **overrides})
    steps = config.steps
    config = config_lib.with_overrides(
        config,
        {
            "log_every": min(25, steps), "eval_every": 0, "checkpoint_every": steps,
            "keep_checkpoints": 1, "optimizer.warmup_steps": max(1, steps // 10),
        },
    )  # fmt: skip
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, str(path))  # the last training metrics
    tokens = steps * config.batch_size * config.seq_len
    cfg = config_lib.model_config(config)
    return {
        "steps": steps, "batch_size": config.batch_size, "seq_len": config.seq_len,
        "tokens": tokens, "flops": tokens * flops.train_flops_per_token(cfg, config.seq_len),
        "train_loss": metrics["loss"], "seconds": time.perf_counter() - start,
    }  # fmt: skip


def with_rope(model: Transformer, rope_scaling: RopeScaling) -> Transformer:
    """`model`'s weights under another RoPE scaling, untrained."""
    cfg = dataclasses.replace(model.cfg, rope_scaling=rope_scaling)
    other = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(model))
    return other


def probe(model: Transformer, tokenizer, eval_data) -> dict:
    """Loss per position bucket over eval_rows rows of eval_len, and passkey accuracy."""
    rows = min(FLAGS.eval_rows, eval_data.num_rows)
    batches = [eval_data.batch(i, 4) for i in range(math.ceil(rows / 4))]
    starts, losses = probes.position_losses(model, batches, FLAGS.position_buckets, FLAGS.eval_len)
    edges = np.append(starts, FLAGS.eval_len)
    tokens = np.zeros(len(starts))  # target tokens per bucket: how much each mean rests on
    for b in batches:
        bucket = np.searchsorted(edges, b["positions"], side="right") - 1
        np.add.at(tokens, bucket, b["weights"])
    filler = eval_data.arrays["inputs"][eval_data.arrays["weights"] > 0]  # no padding
    passkey = probes.passkey_retrieval(
        model,
        tokenizer.encode,
        filler,
        [int(n) for n in FLAGS.passkey_lens],
        [float(d) for d in FLAGS.depths],
        FLAGS.trials,
        num_candidates=FLAGS.candidates,
        bos_id=tokenizer.bos_id,
        seed=FLAGS.seed,
    )
    return {
        "position_starts": starts.tolist(), "position_loss": losses.tolist(),
        "position_tokens": tokens.tolist(), "passkey": passkey,
    }  # fmt: skip


def measure(workdir: pathlib.Path) -> dict:
    """Trains every run, then probes every model; {name: row}."""
    rows = {"pretrained": train_run({}, workdir / "pretrained")}
    logging.warning("pretrained: %s", rows["pretrained"])
    for name, overrides in continuations(workdir / "pretrained").items():
        rows[name] = {"overrides": overrides, **train_run(overrides, workdir / name)}
        logging.warning("%s: %s", name, rows[name])
    eval_config = config_lib.with_overrides(base_config(), {"seq_len": FLAGS.eval_len})
    tokenizer, _, eval_data = config_lib.resolve(eval_config).load_data()
    for name in ("pretrained", "pretrained_yarn", *continuations(workdir)):
        start = time.perf_counter()
        model, _ = runs.load_run(str(workdir / ("pretrained" if name.startswith("pre") else name)))
        if name == "pretrained_yarn":
            yarn = config_lib.with_overrides(base_config(), scaling("yarn"))
            model = with_rope(model, config_lib.model_config(yarn).rope_scaling)
            rows[name] = {"overrides": scaling("yarn")}
        rows[name].update(probe(model, tokenizer, eval_data))
        rows[name]["probe_seconds"] = time.perf_counter() - start
        logging.warning("%s probed in %.0f s", name, rows[name]["probe_seconds"])
    return rows


def passkey_means(row: dict) -> dict[int, float]:
    """Mean passkey accuracy over depths, per prompt length."""
    lengths = sorted({p["context_len"] for p in row["passkey"]})
    return {n: float(np.mean([p["accuracy"] for p in row["passkey"] if p["context_len"] == n]))
            for n in lengths}  # fmt: skip


def write_results(result: dict, out: pathlib.Path) -> None:
    """results.json, results.md and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows, f = result["rows"], result["flags"]
    first = rows["pretrained"]
    lengths = sorted(passkey_means(first))
    starts, short, long = first["position_starts"], f["short_len"], f["long_len"]
    lines = [
        "# Long-context extension: RoPE recipes at a tiny scale",
        "",
        f"Command: `{result['command']}`  ",
        (
            f"Date: {result['date']}; wall time {result['wall_s'] / 60:.1f} min on a shared 2-core "
            f"CPU (load ~{result['load']:.0f}), jax {result['jax']}; one seed ({f['seed']}): no "
            "error bars over seeds."
        ),
        "",
        (
            f"Default model (4 layers x 256), pretrained {first['steps']} steps at context {short} "
            f"({first['tokens']:,} tokens); each long continuation the same steps and tokens at "
            f"{long}. Losses: nats/token on the held-out validation split, packed in rows of "
            f"{f['eval_len']}."
        ),
        "",
        f"| model | steps x batch x context | GFLOP trained | loss 0-{short} "
        f"| loss {short}-{long} | loss {long}-{f['eval_len']} | "
        + " | ".join(f"passkey @{n} (chance {1 / f['candidates']:.2f})" for n in lengths)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(lengths),
    ]
    for name, r in rows.items():
        bands = [bucket_mean(r, lo, hi)
                 for lo, hi in ((0, short), (short, long), (long, f["eval_len"]))]  # fmt: skip
        trained = f"{r['steps']} x {r['batch_size']} x {r['seq_len']}" if "steps" in r else "—"
        gflop = f"{r['flops'] / 1e9:.0f}" if "flops" in r else "—"
        lines.append(
            f"| {LABELS[name]} | {trained} | {gflop} | " + " | ".join(f"{v:.3f}" for v in bands)
            + " | " + " | ".join(f"{passkey_means(r)[n]:.2f}" for n in lengths) + " |"
        )  # fmt: skip
    lines += ["", ("Loss per position bucket (position in the row's document piece; tokens per "
                   "bucket in the header):"), ""]  # fmt: skip
    header = [f"{s}- ({t:,.0f})" for s, t in zip(starts, first["position_tokens"])]
    lines += ["| model | " + " | ".join(header) + " |", "|---" * (len(starts) + 1) + "|"]
    for name, r in rows.items():
        losses = " | ".join(f"{v:.3f}" for v in r["position_loss"])
        lines.append(f"| {LABELS[name]} | {losses} |")
    cells = [(p["context_len"], p["depth"], p["needle_distance"]) for p in first["passkey"]]
    lines += ["", (f"Passkey accuracy per (length, depth), mean needle distance in tokens; "
                   f"{f['trials']} trials each:"), ""]  # fmt: skip
    lines.append("| model | " + " | ".join(f"{n}@{d} ({s:.0f})" for n, d, s in cells) + " |")
    lines.append("|---" * (len(cells) + 1) + "|")
    for name, r in rows.items():
        accuracies = " | ".join(f"{p['accuracy']:.2f}" for p in r["passkey"])
        lines.append(f"| {LABELS[name]} | {accuracies} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(result, out)


def bucket_mean(row: dict, lo: int, hi: int) -> float:
    """Token-weighted mean loss of the buckets starting in [lo, hi)."""
    starts, loss, tokens = (
        np.array(row[k]) for k in ("position_starts", "position_loss", "position_tokens")
    )
    keep = (starts >= lo) & (starts < hi) & (tokens > 0)
    return float((loss[keep] * tokens[keep]).sum() / tokens[keep].sum()) if keep.any() else math.nan


def plot_results(result: dict, out: pathlib.Path) -> None:
    """position_loss.png and passkey.png from a results dict."""
    from llm.science import plots  # matplotlib only when plotting

    rows, f = result["rows"], result["flags"]
    note = f"one seed ({f['seed']}): no error bars over seeds"
    fig, ax = plots.figure(size=(8, 4.5))
    for i, (name, r) in enumerate(rows.items()):
        starts = np.array(r["position_starts"])
        centre = starts + (starts[1] - starts[0]) / 2
        style = "--" if name.startswith("pre") or name == "control" else "-"
        ax.plot(centre, r["position_loss"], "o" + style, color=plots.COLORS[i], label=LABELS[name])
    for x, what in ((f["short_len"], "pretraining context"), (f["long_len"], "continued context")):
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.annotate(what, (x, 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                    ha="right", fontsize=7, color="gray")  # fmt: skip
    ax.set(xlabel="position in document (tokens, bucket centre)",
           ylabel="validation loss (nats/token)",
           title=f"Loss per position, evaluated in rows of {f['eval_len']} tokens")  # fmt: skip
    fig.legend(loc="outside right upper")
    plots.save(fig, out / "position_loss.png", note=note + "; dashed: never extended")

    lengths = sorted(passkey_means(rows["pretrained"]))
    fig, axes = plots.figure(1, len(lengths), size=(4.2 * len(lengths) + 3, 4))
    names = list(rows)
    for ax, length in zip(np.atleast_1d(axes), lengths):
        for i, (name, r) in enumerate(rows.items()):
            cells = sorted((p["needle_distance"], p["accuracy"]) for p in r["passkey"]
                           if p["context_len"] == length)  # fmt: skip
            distance, accuracy = (np.array(c) for c in zip(*cells))
            low, high = probes.wilson_interval(accuracy, f["trials"])
            dodge = (i - (len(names) - 1) / 2) * length / 60  # overlapping series stay visible
            ax.errorbar(distance + dodge, accuracy, yerr=[accuracy - low, high - accuracy], fmt="o",
                        capsize=2, color=plots.COLORS[i], label=LABELS[name])  # fmt: skip
        ax.axhline(1 / f["candidates"], color="gray", ls="--", label="chance")
        ax.set(xlabel="needle distance from the answer (tokens)", ylabel="passkey accuracy",
               ylim=(-0.02, 1.02), title=f"prompts of {length} tokens")  # fmt: skip
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside right upper")
    plots.save(fig, out / "passkey.png", note=f"{note}; error bars: 95% Wilson interval of "
               f"{f['trials']} trials; a point per needle depth, not joined; series shifted "
               "sideways to stay visible")  # fmt: skip


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    del argv
    out = pathlib.Path(FLAGS.out_dir)
    if FLAGS.replot:
        write_results(json.loads((out / "results.json").read_text()), out)
        return
    short, long = FLAGS.short_len, FLAGS.long_len
    if long % short or FLAGS.batch_size % (long // short) or FLAGS.eval_len < long:
        print(
            "error: need --long_len a multiple of --short_len, --batch_size a multiple of their "
            "ratio (the long runs' batch is batch_size / ratio: equal tokens) and --eval_len >= "
            f"--long_len; got {short}, {long}, {FLAGS.batch_size}, {FLAGS.eval_len}.",
            file=sys.stderr,
        )
        sys.exit(2)
    start = time.perf_counter()
    rows = measure(pathlib.Path(FLAGS.workdir))
    result = {
        "command": " ".join(["python -m experiments.studies.long_context", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jax": jax.__version__,
        "wall_s": time.perf_counter() - start, "load": os.getloadavg()[1],
        "flags": {k: FLAGS[k].value for k in (
            "short_len", "long_len", "eval_len", "steps", "batch_size", "continue_lr", "long_theta",
            "eval_rows", "trials", "candidates", "seed")},
        "rows": rows,
    }  # fmt: skip
    write_results(result, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
