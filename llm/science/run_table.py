"""A table of runs for the scaling-law fits (llm.science.scaling): the CSV read as columns and
checked, rows selected, each run's final row, each row's IsoFLOP budget.

The CSV has one row per evaluated checkpoint: params, non_embedding_params, active_params, tokens,
flops, loss, plus config columns. `run` names a row's run (absent: every row is its own run) and
`budget` its IsoFLOP budget (absent: rows are grouped by flops); a run's final row has its most
tokens.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np

REQUIRED_COLUMNS = ("params", "non_embedding_params", "active_params", "tokens", "flops", "loss")

Table = dict[str, np.ndarray]


def read_runs(path: str | pathlib.Path) -> Table:
    """The CSV as columns: numeric columns as float arrays, the others as string arrays."""
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    if not records:
        raise ValueError(f"{path} has no rows.")
    missing = [c for c in REQUIRED_COLUMNS if c not in records[0]]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; it needs {list(REQUIRED_COLUMNS)}.")
    table = {}
    for key in records[0]:
        values = [r[key] for r in records]
        try:
            table[key] = np.array([float(v) for v in values])
        except ValueError:
            table[key] = np.array(values)
    for key in REQUIRED_COLUMNS:  # rows are lines 2, 3, ... of the file
        column = table[key]
        if column.dtype.kind != "f":
            row = next(i for i, v in enumerate(column) if not _is_number(v))
            raise ValueError(f"{path}: column {key!r} has a non-number on line {row + 2}.")
        bad = np.flatnonzero(~np.isfinite(column) | (column <= 0))
        if bad.size:
            raise ValueError(
                f"{path}: column {key!r} must be finite and > 0; line {bad[0] + 2} has "
                f"{column[bad[0]]} ({bad.size} such rows)."
            )
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def select(table: Table, mask: np.ndarray) -> Table:
    return {k: v[mask] for k, v in table.items()}


def run_ids(table: Table) -> np.ndarray:
    return table["run"].astype(str) if "run" in table else np.arange(len(table["loss"])).astype(str)


def final_rows(table: Table) -> Table:
    """Each run's last row (most tokens)."""
    ids = run_ids(table)
    keep = np.zeros(len(ids), bool)
    for run in np.unique(ids):
        rows = np.flatnonzero(ids == run)
        keep[rows[np.argmax(table["tokens"][rows])]] = True
    return select(table, keep)


def budgets(table: Table, rtol: float = 0.05) -> np.ndarray:
    """Each row's IsoFLOP budget: the `budget` column, else its flops grouped within `rtol`."""
    if "budget" in table:
        return table["budget"].astype(float)
    flops = table["flops"]
    out = np.empty_like(flops)
    group: list[int] = []
    for i in [*np.argsort(flops), None]:
        if group and (i is None or flops[i] > flops[group[0]] * (1 + rtol)):
            out[group] = np.exp(np.mean(np.log(flops[group])))
            group = []
        if i is not None:
            group.append(i)
    return out
