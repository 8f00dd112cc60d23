"""The compression study's figures (quantization.png, pruning.png, distillation.png) from its
results (experiments.studies.compression), and the names of its rows."""

from __future__ import annotations

import pathlib

import numpy as np

QUANT_ROWS = {
    "float32": "float32 (trained)",
    "qat_int8": "QAT int8 (fake-quant training, weights kept float32)",
    "qat_int8_w8a8_stored": "QAT int8, then stored int8 (w8a8)",
    "ptq_int8": "PTQ int8 weights",
    "ptq_int8_w8a8": "PTQ int8 weights + activations",
    "ptq_int4": "PTQ int4 weights (groups of 128)",
}
PRUNE_ROWS = {"float32": "dense", "magnitude_50": "50% magnitude", "nm_2_4": "2:4"}
STUDENT_ROWS = {
    "student_scratch": "student from scratch",
    "student_distilled": "student distilled",
    "student_scratch_equal_flops": "student from scratch, FLOPs of the distilled run",
}


def student_flops(name: str, steps: int, f: dict) -> float:
    """Total FLOPs of a student run at `steps`, the teacher's forward charged when distilled."""
    per_token = f["student_train"] + (f["teacher_forward"] if name == "student_distilled" else 0)
    return per_token * f["tokens_per_step"] * steps


def plot_results(result: dict, out: pathlib.Path) -> None:
    """quantization.png, pruning.png, distillation.png from a results dict."""
    from matplotlib import ticker  # matplotlib only when plotting

    from llm.science import plots

    s, f = result["summary"], result["flops"]

    def spread(key) -> float:  # no error bar from one seed
        return s[key]["gap_std"] if s[key]["n"] > 1 else np.nan

    def note(keys) -> str:
        n = sorted({s[k]["n"] for k in keys})
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        return f"{seeds} seeds per point; error bars: std over seeds (none with one seed)"

    keys = [k for k in QUANT_ROWS if k != "float32"]
    fig, (gap, size) = plots.figure(2, 1, size=(7, 0.9 * len(QUANT_ROWS) + 2))
    for ax, key, value, xlabel in (
        (gap, keys, "gap_mean", "validation loss − float32's (nats/token)"),
        (size, list(QUANT_ROWS), "disk_after", "parameters on disk (MiB)"),
    ):
        y = np.arange(len(key))
        scale = 2**-20 if value == "disk_after" else 1
        colors = [plots.COLORS[list(QUANT_ROWS).index(k)] for k in key]  # one per variant
        ax.barh(y, [s[k][value] * scale for k in key], color=colors,
                xerr=[spread(k) for k in key] if value == "gap_mean" else None,
                capsize=3)  # fmt: skip
        ax.set_yticks(y, [f"{QUANT_ROWS[k]} (n={s[k]['n']})" for k in key])
        ax.invert_yaxis()
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set(xlabel=xlabel)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    fig.suptitle("Quantization: validation-loss gap and size (float32 = the trained baseline)")
    plots.save(fig, out / "quantization.png", note=note(QUANT_ROWS))

    keys = [k for k in PRUNE_ROWS if k != "float32"]
    fig, ax = plots.figure(size=(6, 2.5))
    y = np.arange(len(keys))
    ax.barh(y, [s[k]["gap_mean"] for k in keys], color=plots.COLORS[: len(keys)],
            xerr=[spread(k) for k in keys], capsize=3)  # fmt: skip
    ax.set_yticks(y, [f"{PRUNE_ROWS[k]} (n={s[k]['n']})" for k in keys])
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    ax.set(xlabel="validation loss − dense's (nats/token)",
           title=f"Pruning vs dense at equal steps ({result['steps']})")  # fmt: skip
    plots.save(fig, out / "pruning.png", note=note(PRUNE_ROWS))

    fig, ax = plots.figure(size=(7, 4))
    per_seed = result["per_seed"]
    for i, key in enumerate(STUDENT_ROWS):
        have = [rows[key]["curve"] for rows in per_seed if key in rows]
        curves = np.array([[loss for _, loss in curve] for curve in have])
        steps = np.array([step for step, _ in have[0]])
        ax.errorbar(student_flops(key, steps, f), curves.mean(0),
                    yerr=curves.std(0, ddof=1) if len(curves) > 1 else None,
                    fmt="o-", capsize=2, color=plots.COLORS[i], label=STUDENT_ROWS[key])  # fmt: skip
    ax.set(xscale="log", xlabel="total training FLOPs (student + teacher forward)",
           ylabel="validation loss (nats/token)",
           title=f"Student {result['student']}: scratch vs distilled")  # fmt: skip
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels overlapped
    fig.legend(loc="outside right upper")
    plots.save(fig, out / "distillation.png",
               note=note(STUDENT_ROWS) + "; points: a run's evaluations")  # fmt: skip
