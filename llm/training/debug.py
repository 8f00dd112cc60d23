"""Debugging aids for the fault-tolerance tests: pause points and per-step batch hashes.

Pause points let a test kill or signal a real training process at a chosen moment:

    LLM_LAB_PAUSE="save#2:60" python -m llm.train ...   # sleep 60 s inside the 2nd checkpoint save
    LLM_LAB_PAUSE="compile:3" python -m llm.train ...   # sleep 3 s just before compiling

At a pause the process prints `paused at POINT` to stderr, then sleeps for SECONDS, or until the
file named by $LLM_LAB_RESUME exists (a test resumes it once it has seen what it waited for). The
points are "compile" (before compiling the train step) and "save" (inside the asynchronous save,
after every file is written to the temporary directory and before orbax renames it: a kill there
leaves a partial checkpoint). Without the variable a pause costs one dictionary lookup.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

from llm.training.metrics import drop_partial_line

PAUSE_VARIABLE = "LLM_LAB_PAUSE"
RESUME_VARIABLE = "LLM_LAB_RESUME"
_hits: collections.Counter = collections.Counter()
_repaired: set[pathlib.Path] = set()


def pause(point: str) -> None:
    """Sleeps if $LLM_LAB_PAUSE asks for `point` ("POINT[#N]:SECONDS", N-th hit, default 1st),
    until SECONDS pass or the file $LLM_LAB_RESUME names exists."""
    spec = os.environ.get(PAUSE_VARIABLE)
    if not spec:
        return
    where, _, seconds = spec.partition(":")
    name, _, nth = where.partition("#")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] == int(nth or 1):
        print(f"paused at {point}", file=sys.stderr, flush=True)
        deadline, resume = time.monotonic() + float(seconds or 60), os.environ.get(RESUME_VARIABLE)
        while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
            time.sleep(0.05)


def batch_hash(batch: dict[str, np.ndarray]) -> str:
    """SHA-256 of a batch's arrays (keys in sorted order): equal hashes, equal batches."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()


def log_batch_hash(workdir: str | os.PathLike, step: int, batch: dict[str, np.ndarray]) -> None:
    """Appends {"step": step, "sha256": ...} to WORKDIR/batch_hashes.jsonl; `step` is the batch
    index (the step the batch trains). Like metrics.jsonl, steps replayed after a resume appear
    again: a reader keeps the last record of each step."""
    path = pathlib.Path(workdir) / "batch_hashes.jsonl"
    if path not in _repaired:  # once per run: a line cut short by a kill
        drop_partial_line(path)
        _repaired.add(path)
    with path.open("a") as f:
        f.write(json.dumps({"step": int(step), "sha256": batch_hash(batch)}) + "\n")
