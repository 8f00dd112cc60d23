"""What each compression lever costs in validation loss, on the shipped corpus, sized for a CPU.

    nice -n 5 python -m experiments.studies.compression --workdir=/tmp/compression

One float32 run of the default model shape (4 layers x 256, at a shorter context and batch) is
the dense baseline and the teacher. Against it, at equal training steps: QAT int8 (config.quant),
PTQ int8 / int8_w8a8 / int4 of the float run (llm.quantize), 50% magnitude and 2:4 pruning
(config.prune). Then a small student (--student_layers x --student_width) trained from scratch and
distilled from the teacher (config.distill) for --student_steps, plus a scratch student trained
for the FLOPs of the distilled run with the teacher's forward charged (llm.science.flops).
Every loss is the validation split's (held out). Writes results.json, results.md,
quantization.png, pruning.png and distillation.png to --out_dir; `--replot` redraws the
figures from results.json.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments import default
from experiments.studies.compression_figures import (
    PRUNE_ROWS,
    QUANT_ROWS,
    STUDENT_ROWS,
    plot_results,
    student_flops,
)
from llm import config as config_lib
from llm import evaluate, quantize, train
from llm.science import flops

FLAGS = flags.FLAGS
PTQ_MODES = ("int8", "int8_w8a8", "int4")
GROUPS = ("prune", "ptq", "qat", "distill")


def define_flags() -> None:
    flags.DEFINE_string("workdir", "/tmp/compression", "Scratch directory for the runs.")
    flags.DEFINE_string("out_dir", "experiments/results/compression", "Where results go.")
    flags.DEFINE_integer("steps", 150, "Steps of the teacher, QAT and pruned runs.")
    flags.DEFINE_integer("student_steps", 150, "Steps of the scratch and distilled students.")
    flags.DEFINE_integer("seq_len", 128, "Training context (tokens).")
    flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
    flags.DEFINE_integer("eval_batches", 16, "Validation batches per evaluation.")
    flags.DEFINE_integer("evals", 5, "Evaluations per student run (the loss-vs-FLOPs curve).")
    flags.DEFINE_integer("student_layers", 2, "Student depth.")
    flags.DEFINE_integer("student_width", 128, "Student embed_dim (heads 2, SwiGLU 3x).")
    flags.DEFINE_list("seeds", ["0"], "Seeds; every run is repeated per seed.")
    flags.DEFINE_list(
        "groups",
        list(GROUPS),
        f"Which runs, of {GROUPS} (the float32 baseline "
        "always); the table reports how many seeds each row has.",
    )
    flags.DEFINE_bool(
        "merge",
        False,
        "Keep the runs already in --out_dir's results.json (same "
        "flags required) and add these; the table covers all.",
    )
    flags.DEFINE_bool("reuse", False, "A run already finished in --workdir is read, not redone.")
    flags.DEFINE_list(
        "only",
        [],
        "Of --groups' training runs, only these (e.g. nm_2_4); the float32 baseline always.",
    )
    flags.DEFINE_bool("replot", False, "Redraw --out_dir's figures from results.json.")


def base_config(seed: int) -> ml_collections.ConfigDict:
    """The default model at the flags' context, batch and seed."""
    return config_lib.with_overrides(
        default.get_config(),
        {
            "seed": seed, "seq_len": FLAGS.seq_len, "batch_size": FLAGS.batch_size,
            "eval_batches": FLAGS.eval_batches, "sample_prompt": "",
        },
    )  # fmt: skip


def student_overrides() -> dict:
    width = FLAGS.student_width
    return {
        "model.num_layers": FLAGS.student_layers, "model.embed_dim": width,
        "model.num_heads": 2, "model.num_kv_heads": 1, "model.mlp_dim": 3 * width,
    }  # fmt: skip


def train_run(config: ml_collections.ConfigDict, steps: int, evals: int, path: pathlib.Path):
    """Trains `config` for `steps` in a fresh `path`; returns ([(step, eval_loss)], seconds)."""
    every = max(1, math.ceil(steps / evals))
    config = config_lib.with_overrides(
        config,
        {
            "steps": steps, "log_every": min(25, steps), "eval_every": every,
            "checkpoint_every": steps, "keep_checkpoints": 1,
            "optimizer.warmup_steps": max(1, steps // 10),
        },
    )  # fmt: skip
    metrics, seconds = path / "metrics.jsonl", 0.0
    done = FLAGS.reuse and metrics.exists()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if done else []
    if not any(r["step"] == steps and "eval_loss" in r for r in records):  # not finished: train
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        train.train_and_evaluate(config, str(path))
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    curve = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
    return curve, seconds


def seed_rows(seed: int, workdir: pathlib.Path, groups: list[str]) -> dict:
    """The runs of `groups` for one seed: {name: {"eval_loss", ...}}."""
    workdir = workdir / f"seed{seed}"
    base, steps = base_config(seed), FLAGS.steps
    rows = {}

    def record(name, config, n, extra=None, **kw):
        if FLAGS.only and name not in (*FLAGS.only, "float32"):
            return
        curve, seconds = train_run(config, n, kw.get("evals", 1), workdir / name)
        rows[name] = {"eval_loss": curve[-1][1], "curve": curve, "steps": n,
                      "seconds": seconds, **(extra or {})}  # fmt: skip
        logging.warning("seed %d %s: eval loss %.4f (%.0f s)", seed, name, curve[-1][1], seconds)

    record("float32", base, steps)
    teacher = workdir / "float32"
    start, end = steps // 10, steps // 2
    prune = {"prune.start": start, "prune.end": end}
    if "prune" in groups:
        record("magnitude_50", config_lib.with_overrides(
            base, {**prune, "prune.method": "magnitude", "prune.sparsity": 0.5}), steps)  # fmt: skip
        record("nm_2_4", config_lib.with_overrides(base, {**prune, "prune.method": "2:4"}), steps)
    if "ptq" in groups:
        ptq_rows(workdir / "float32", {mode: f"ptq_{mode}" for mode in PTQ_MODES}, rows)
        ptq = rows["ptq_int8"]  # the trained weights are stored in float32
        rows["float32"].update(memory_after=ptq["memory_before"], disk_after=ptq["disk_before"])
    if "qat" in groups:
        record("qat_int8", config_lib.with_overrides(base, {"quant.mode": "int8"}), steps)
        ptq_rows(workdir / "qat_int8", {"int8_w8a8": "qat_int8_w8a8_stored"}, rows)
        stored = rows["qat_int8_w8a8_stored"]  # the trained weights are stored in float32
        rows["qat_int8"].update(
            memory_after=stored["memory_before"], disk_after=stored["disk_before"]
        )
    if "distill" in groups:
        student = config_lib.with_overrides(base, student_overrides())
        s_steps, evals = FLAGS.student_steps, FLAGS.evals
        record("student_scratch", student, s_steps, evals=evals)
        distilled = config_lib.with_overrides(student, {"distill.teacher": f"workdir:{teacher}"})
        record("student_distilled", distilled, s_steps, evals=evals)
        record("student_scratch_equal_flops", student, round(s_steps * flop_ratio()), evals=evals)
    return rows


def ptq_rows(run: pathlib.Path, names: dict[str, str], rows: dict) -> None:
    """`run` quantized by llm.quantize in each mode of `names` and evaluated: rows[names[mode]]."""
    for mode, name in names.items():
        out = run.parent / name
        shutil.rmtree(out, ignore_errors=True)
        size = quantize.quantize_run(str(run), str(out), mode)
        rows[name] = {"eval_loss": evaluate.evaluate(str(out))["eval_loss"], **size}


def flop_figures() -> dict:
    """Per-token FLOPs: teacher training, student training, teacher forward (llm.science.flops)."""
    seq = FLAGS.seq_len
    teacher = config_lib.model_config(base_config(0))
    student = config_lib.model_config(
        config_lib.with_overrides(base_config(0), student_overrides())
    )
    return {
        "teacher_train": flops.train_flops_per_token(teacher, seq),
        "student_train": flops.train_flops_per_token(student, seq),
        "teacher_forward": flops.forward_flops_per_token(teacher, seq),
        "tokens_per_step": FLAGS.batch_size * seq,
    }


def flop_ratio() -> float:
    """FLOPs of a distilled student step (teacher forward charged) over a scratch one."""
    f = flop_figures()
    return (f["student_train"] + f["teacher_forward"]) / f["student_train"]


def summarize(per_seed: list[dict]) -> dict:
    """{name: {"mean", "std", "gap_mean", "gap_std", "n", ...}} over the seeds that have the run:
    loss gaps against the seed's own baseline (float32; the scratch student for the distilled
    ones), std over seeds (0 for one); bytes from the last seed (the newest code)."""
    summary = {}
    for name in dict.fromkeys(k for rows in per_seed for k in rows):
        base = "student_scratch" if name.startswith("student") else "float32"
        have = [rows for rows in per_seed if name in rows and base in rows]
        losses = np.array([rows[name]["eval_loss"] for rows in have])
        gaps = losses - np.array([rows[base]["eval_loss"] for rows in have])
        std = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0
        summary[name] = {
            "mean": float(losses.mean()), "std": std(losses), "n": len(have),
            "gap_mean": float(gaps.mean()), "gap_std": std(gaps),
            **{k: [rows[name][k] for rows in have if k in rows[name]][-1]
               for k in ("steps", "memory_after", "disk_after")
               if any(k in rows[name] for rows in have)},
        }  # fmt: skip
    return summary


def write_results(per_seed: dict, out: pathlib.Path, command: str, wall_s: float) -> None:
    """results.json, results.md and the figures from {seed: rows}."""
    per_seed = dict(sorted(per_seed.items()))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": list(per_seed),
        "command": command, "wall_s": wall_s, "load": os.getloadavg()[1], "steps": FLAGS.steps,
        "model": f"4 layers x 256 (default model), seq {FLAGS.seq_len}, batch {FLAGS.batch_size}",
        "student": f"{FLAGS.student_layers} layers x {FLAGS.student_width}",
        "flops": flop_figures(),
        "summary": summarize(list(per_seed.values())), "per_seed": list(per_seed.values()),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    s, f, seeds = result["summary"], result["flops"], result["seeds"]
    pm = lambda v, e, n: f"{v:.3f}" + (f" ± {e:.3f}" if n > 1 else "")
    mib = 2**20
    lines = [
        "# Compression: validation loss and bytes",
        "",
        f"Command: `{command}`  ",
        (
            f"Date: {result['date']}; wall time {result['wall_s'] / 60:.1f} min on a shared 2-core "
            f"CPU (load ~{result['load']:.0f} when written); seeds {', '.join(map(str, seeds))}: "
            "mean ± std over the seeds that have the run (column n; no ± where n = 1). Gaps are "
            "taken within a seed."
        ),
        "",
        (
            f"Teacher / dense baseline: {result['model']}, {result['steps']} steps of "
            f"{f['tokens_per_step']} tokens. Losses are nats/token on the held-out validation split."
        ),
        "",
        "## Quantization (parameters of the whole model: bytes in memory, on disk)",
        "",
        "| variant | n | val loss | gap vs float32 | MiB in memory | MiB on disk |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in QUANT_ROWS.items():
        r = s[key]
        lines.append(f"| {label} | {r['n']} | {pm(r['mean'], r['std'], r['n'])} | "
                     f"{pm(r['gap_mean'], r['gap_std'], r['n'])} "
                     f"| {r['memory_after'] / mib:.2f} | {r['disk_after'] / mib:.2f} |")  # fmt: skip
    lines += ["", "## Pruning at equal training steps", "",
              "| variant | n | val loss | gap vs dense |", "|---|---|---|---|"]  # fmt: skip
    for key, label in PRUNE_ROWS.items():
        r = s[key]
        lines.append(
            f"| {label} | {r['n']} | {pm(r['mean'], r['std'], r['n'])} | "
            f"{pm(r['gap_mean'], r['gap_std'], r['n'])} |"
        )
    lines += [
        "", f"## Distillation: student {result['student']}", "",
        "| run | n | steps | total GFLOP (teacher forward charged) | val loss | vs scratch |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, label in STUDENT_ROWS.items():
        r = s[key]
        total = student_flops(key, r["steps"], f) / 1e9
        lines.append(f"| {label} | {r['n']} | {r['steps']} | {total:.0f} | "
                     f"{pm(r['mean'], r['std'], r['n'])} | "
                     f"{pm(r['gap_mean'], r['gap_std'], r['n'])} |")  # fmt: skip
    teacher_train = f["teacher_train"] * f["tokens_per_step"] * result["steps"] / 1e9
    lines += [
        "",
        (
            f"Per token: student training {f['student_train'] / 1e6:.2f} MFLOP, teacher forward "
            f"{f['teacher_forward'] / 1e6:.2f} MFLOP; the teacher's own training cost "
            f"{teacher_train:.0f} GFLOP (not in the table; charge it only if the teacher exists for "
            "nothing else)."
        ),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(result, out)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    del argv
    out = pathlib.Path(FLAGS.out_dir)
    if FLAGS.replot:
        plot_results(json.loads((out / "results.json").read_text()), out)
        return
    command = " ".join(["python -m experiments.studies.compression", *sys.argv[1:]])
    seeds, groups = [int(s) for s in FLAGS.seeds], list(FLAGS.groups)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise app.UsageError(f"--groups: unknown {unknown}; choose from {GROUPS}.")
    earlier = json.loads((out / "results.json").read_text()) if FLAGS.merge else {}
    if earlier and earlier["steps"] != FLAGS.steps:
        raise app.UsageError(f"--merge: results.json has --steps={earlier['steps']}: use it.")
    merged = dict(zip(earlier.get("seeds", []), earlier.get("per_seed", [])))
    if earlier:
        command += f" (merged with: {earlier.get('command', 'an earlier run')})"
    start = time.perf_counter()
    for seed in seeds:  # a run done again replaces the earlier one; results after each seed
        new = seed_rows(seed, pathlib.Path(FLAGS.workdir), groups)
        merged[seed] = {**merged.get(seed, {}), **new}
        write_results(merged, out, command, earlier.get("wall_s", 0) + time.perf_counter() - start)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
