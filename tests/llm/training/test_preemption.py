"""SIGTERM: the run saves at the next step boundary, commits, exits 143, and resumes from there."""

import json
import signal
import subprocess
import sys
import time

import pytest

from llm.training.metrics import read_metrics
from llm.training.preemption import PreemptionWatcher


def test_sigterm_saves_and_the_rerun_resumes(tmp_path, tiny_config):
    workdir = tmp_path / "run"
    flags = [
        f"--workdir={workdir}",
        "--config.steps=100000",
        "--config.checkpoint_every=0",
        "--config.eval_every=0",
        "--config.log_every=1",
        "--config.optimizer.warmup_steps=2",
        f"--config.data.text_dir={tiny_config.data.text_dir}",
        f"--config.data.data_dir={tiny_config.data.data_dir}",
        "--config.batch_size=8",
        "--config.seq_len=32",
        "--config.model.num_layers=1",
        "--config.model.embed_dim=32",
        "--config.model.mlp_dim=64",
        "--config.sample_prompt=",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "llm.train", *flags], stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "training never logged three steps"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "rerun the same command to resume" in stderr

    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last_logged = read_metrics(workdir)[-1]["step"]
    assert saved == [last_logged]  # the step reached when the signal arrived, and nothing partial
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]

    config = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == 100000
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm.train",
            *flags[:1],
            f"--config.steps={last_logged + 2}",
            *flags[2:],
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps[-2:] == [last_logged + 1, last_logged + 2]


def test_a_second_ctrl_c_stops_at_once():
    with PreemptionWatcher() as watcher:
        signal.raise_signal(signal.SIGINT)
        assert watcher.signal == signal.SIGINT  # recorded, acted on at the next step boundary
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
