"""Two real processes on localhost train like one (data parallel; pipelined across them, dense and
MoE): same losses, disjoint data shards, a checkpoint written together."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import train
from llm.config import ConfigError
from llm.parallel import distributed
from llm.training.metrics import read_metrics

PROCESSES = 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def flags_of(config) -> list[str]:
    """The tiny config as command-line overrides of experiments/default.py."""
    fields = {
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "log_every": config.log_every,
        "eval_every": config.eval_every,
        "eval_batches": config.eval_batches,
        "checkpoint_every": config.checkpoint_every,
        "sample_prompt": "",
        "optimizer.warmup_steps": config.optimizer.warmup_steps,
        "data.text_dir": config.data.text_dir,
        "data.data_dir": config.data.data_dir,
        **{
            f"model.{k}": config.model[k]
            for k in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim")
        },
    }
    return [f"--config.{k}={v}" for k, v in fields.items()]


# Pipelined: stage (the outermost mesh axis) across the two processes, its activations and
# gradients sent between them; each process loads the whole batch, which both stages need.
PIPELINE = {"mesh.stage": 2, "model.scan_layers": True, "pipeline.microbatches": 2}
# MoE in every layer with a shared expert and loss-free balancing; the one-process run pipelines
# too (its auxiliary losses are per microbatch, so a run without the pipeline differs).
MOE = {
    "model.moe.num_experts": 4,
    "model.moe.expert_mlp_dim": 32,
    "model.moe.num_shared_experts": 1,
    "model.moe.bias_update_rate": 1e-3,
}


@pytest.mark.parametrize("pipeline", [None, "dense", "moe"], ids=["data", "stage=2", "stage=2,moe"])
def test_two_processes_match_one(tmp_path, tiny_config, pipeline):
    extra = []
    if pipeline:  # the one-process run: the same stacked layers, no pipeline (MoE: pipelined)
        tiny_config.model.scan_layers = True
        extra = [f"--config.{k}={v}" for k, v in PIPELINE.items()]
    if pipeline == "moe":
        tiny_config = config_lib.with_overrides(tiny_config, {**PIPELINE, **MOE})
        extra += [f"--config.{k}={v}" for k, v in MOE.items()]
    train.train_and_evaluate(tiny_config, str(tmp_path / "single"))  # also builds the dataset once
    expected = [r["loss"] for r in read_metrics(tmp_path / "single")]

    port, workdir = free_port(), tmp_path / "multi"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llm.train",
                "--config=experiments/default.py",
                f"--workdir={workdir}",
            ]
            + flags_of(tiny_config)
            + extra
            + [
                f"--coordinator_address=localhost:{port}",
                f"--num_processes={PROCESSES}",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("multi-process run timed out")
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert "4 cpu device(s) in 2 process(es)" in outputs[0]
    assert ("pipeline: 1f1b, 2 stages" in outputs[0]) == bool(pipeline)

    got = [r["loss"] for r in read_metrics(workdir)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == tiny_config.steps


def test_process_shards_are_disjoint_and_cover_the_global_batch(tiny_config):
    _, data, _ = config_lib.resolve(tiny_config).load_data()
    for step in range(3):
        whole = data.batch(step, tiny_config.batch_size)
        parts = [
            data.batch(step, tiny_config.batch_size, process_index=i, process_count=PROCESSES)
            for i in range(PROCESSES)
        ]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
        rows = [{r.tobytes() for r in p["inputs"]} for p in parts]
        assert not rows[0] & rows[1]


def test_partial_multiprocess_flags_are_a_config_error():
    with pytest.raises(ConfigError, match="--num_processes=N"):
        distributed.initialize(coordinator_address="localhost:1234")


def test_single_process_initialize_is_a_no_op():
    distributed.initialize()
    assert jax.process_count() == 1
