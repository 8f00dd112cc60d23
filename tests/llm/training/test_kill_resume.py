"""kill -9 at any moment, a SIGTERM during compilation: rerunning the same command resumes from the
last committed checkpoint, leaves no temporary directory, and reproduces an uninterrupted run's
losses and batches bit for bit (CPU), across epoch boundaries."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from data import pipeline, text_corpus, tokenizer
from llm.training import debug
from llm.training.metrics import MetricsWriter, last_per_step, read_metrics

STEPS, BATCH = 12, 8


def _flags(workdir, config):
    return [
        f"--workdir={workdir}",
        f"--config.steps={STEPS}",
        "--config.checkpoint_every=3",
        "--config.eval_every=0",
        "--config.log_every=1",
        "--config.optimizer.warmup_steps=2",
        f"--config.data.text_dir={config.data.text_dir}",
        f"--config.data.data_dir={config.data.data_dir}",
        "--config.data.train_split=train[:2]",  # two documents: an epoch is a few steps
        "--config.data.eval_split=train[:2]",  # (not evaluated)
        f"--config.batch_size={BATCH}",
        "--config.seq_len=64",
        "--config.model.num_layers=1",
        "--config.model.embed_dim=32",
        "--config.model.mlp_dim=64",
        "--config.sample_prompt=",
        "--config.debug.log_batch_hashes=True",
    ]


class Run:
    """`python -m llm.train` in a subprocess; a thread collects its stderr lines."""

    def __init__(self, workdir, config, cache, pause=None):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: quick
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
        if pause:
            env["LLM_LAB_PAUSE"] = pause
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llm.train", *_flags(workdir, config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self.lines.extend, args=(self.process.stderr,))
        self._reader.start()

    def tail(self) -> str:
        return "".join(self.lines[-30:])[-3000:]

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None and self.finish() is not None:
                assert any(text in line for line in self.lines), self.tail()
            assert time.time() < deadline, f"no {text!r} in {timeout} s"
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 300) -> int:
        self.process.wait(timeout)
        self._reader.join(timeout)
        return self.process.returncode


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _temporary(workdir) -> list[str]:
    return [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]


def _kill(run: Run) -> None:
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL


def test_kills_and_signals_resume_bit_identically(tmp_path, tiny_config):
    cache = tmp_path / "jax_cache"
    reference = Run(tmp_path / "reference", tiny_config, cache)
    assert reference.finish() == 0, reference.tail()
    expected = last_per_step(read_metrics(tmp_path / "reference"))
    expected_hashes = last_per_step(read_metrics(tmp_path / "reference", "batch_hashes.jsonl"))
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert sorted(expected_hashes) == list(range(STEPS))
    rows = pipeline.load_dataset(
        name="text_corpus",
        builder_kwargs={"config": text_corpus.config_for_directory(tiny_config.data.text_dir)},
        split="train[:2]",
        seq_len=64,
        tokenizer=tokenizer.Tokenizer(),
        data_dir=tiny_config.data.data_dir,
        seed=0,
    ).num_rows
    assert STEPS * BATCH > rows, "the run must cross an epoch boundary"

    run = tmp_path / "run"
    # 1. kill -9 inside the second save (step 6): its temporary directory is on disk.
    process = Run(run, tiny_config, cache, pause="save#2:120")
    process.wait_for("paused at save")
    assert _steps(run) == [3] and _temporary(run), "killed mid-save"
    _kill(process)

    # 2. SIGTERM while compiling the resumed run: nothing new trained or saved, exit 143.
    logged = len(read_metrics(run))
    process = Run(run, tiny_config, cache, pause="compile:3")
    process.wait_for("paused at compile")
    assert not _temporary(run), "the partial save of the killed run was cleaned at start"
    process.signal(signal.SIGTERM)
    assert process.finish() == 128 + signal.SIGTERM, process.tail()
    assert _steps(run) == [3] and len(read_metrics(run)) == logged

    # 3. kill -9 wherever the run is once it has logged step 8.
    process = Run(run, tiny_config, cache)
    deadline = time.time() + 240
    while max((r["step"] for r in read_metrics(run)), default=0) < 8:
        assert process.process.poll() is None and time.time() < deadline, process.tail()
        time.sleep(0.05)
    _kill(process)

    # 4. The last rerun finishes.
    process = Run(run, tiny_config, cache)
    assert process.finish() == 0, process.tail()
    assert not _temporary(run)
    assert _steps(run)[-1] == STEPS

    records = read_metrics(run)
    assert sorted(last_per_step(records)) == list(range(1, STEPS + 1))
    assert len(records) > STEPS, "steps after a restored checkpoint are logged again"
    for record in records:  # every record, first or replayed, equals the uninterrupted run's
        want = expected[record["step"]]
        assert (record["loss"], record["grad_norm"]) == (want["loss"], want["grad_norm"])
    hashes = read_metrics(run, "batch_hashes.jsonl")
    assert sorted(last_per_step(hashes)) == list(range(STEPS))
    for record in hashes:
        assert record["sha256"] == expected_hashes[record["step"]]["sha256"], record


@pytest.mark.parametrize("nth", [1, 2])
def test_pause_points_count_hits(monkeypatch, capsys, nth):
    monkeypatch.setattr(debug, "_hits", debug.collections.Counter())
    monkeypatch.setenv(debug.PAUSE_VARIABLE, f"save#{nth}:0")
    debug.pause("compile")
    debug.pause("save")
    assert ("paused at save" in capsys.readouterr().err) == (nth == 1)
    debug.pause("save")
    assert ("paused at save" in capsys.readouterr().err) == (nth == 2)


def test_a_pause_ends_when_its_resume_file_exists(monkeypatch, tmp_path):
    monkeypatch.setattr(debug, "_hits", debug.collections.Counter())
    monkeypatch.setenv(debug.PAUSE_VARIABLE, "save:30")
    monkeypatch.setenv(debug.RESUME_VARIABLE, str(tmp_path / "resume"))
    threading.Timer(0.5, (tmp_path / "resume").touch).start()
    started = time.monotonic()
    debug.pause("save")
    assert 0.4 < time.monotonic() - started < 10


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    MetricsWriter(tmp_path, tensorboard=False).write(2, {"loss": 1.5})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]

    (tmp_path / "batch_hashes.jsonl").write_text('{"step": 0, "sha256": "ab')
    debug.log_batch_hash(tmp_path, 0, {"inputs": np.zeros(3)})
    assert [r["step"] for r in read_metrics(tmp_path, "batch_hashes.jsonl")] == [0]
