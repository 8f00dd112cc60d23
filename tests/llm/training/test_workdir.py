"""One writer per workdir, resume checks derived from the saved state, and a record of every
start (llm.training.workdir, llm.training.checkpoint.check_restorable): a refused or failed start
leaves the workdir exactly as it was."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.training import checkpoint, workdir
from llm.training.metrics import read_metrics

ROOT = pathlib.Path(__file__).parents[3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config_shared) -> pathlib.Path:
    """A finished 6-step run (checkpoints at 3 and 6) logging every 2 steps, evaluating every 3."""
    path = tmp_path_factory.mktemp("trained") / "run"
    config = config_lib.with_overrides(tiny_config_shared, {"log_every": 2, "eval_every": 3})
    train.train_and_evaluate(config, str(path))
    return path


@pytest.fixture
def run(trained, tmp_path) -> pathlib.Path:
    """A copy of `trained` to resume."""
    return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def overrides(tiny_config, **fields):
    return config_lib.with_overrides(tiny_config, {"log_every": 2, "eval_every": 3, **fields})


def tree_hash(path: pathlib.Path) -> str:
    """Every file's name and bytes under `path` (but the lock file, whose holder line changes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock"):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def test_evaluations_follow_their_own_schedule(trained):
    records = read_metrics(trained)
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"optimizer.b2": 0.99}, "optimizer.b2: 0.95 -> 0.99"),
        ({"batch_size": 16}, "batch_size: 8 -> 16"),
        ({"data.tokenizer": "/elsewhere/sp.model"}, "data.tokenizer: '' -> '/elsewhere/sp.model'"),
        ({"model.embed_dim": 96}, "model.embed_dim: 64 -> 96"),
    ],
)
def test_a_resume_that_changes_what_is_trained_is_refused(run, tiny_config, fields, named):
    before = tree_hash(run)
    with pytest.raises(workdir.ResumeChangeError, match=named):
        train.train_and_evaluate(overrides(tiny_config, steps=8, **fields), str(run))
    assert tree_hash(run) == before


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"loss_spike.window": 8}, "guard/losses: saved float32[1], expected float32[8]"),
        ({"model.attention_pattern": "nsa", "model.attention_window": 16}, "not in the checkpoint"),
        (
            {"model.mlp_dim": 96},
            "model fields that fix parameter shapes changed (model.mlp_dim: 128 -> 96)",
        ),
    ],
)
def test_a_different_state_is_a_mismatch_never_corruption(run, tiny_config, fields, path):
    """Allowed by the policy, a change of the state's structure is still refused: by the saved
    state's metadata, naming arrays and fields; the checkpoint stays where it is."""
    before = tree_hash(run)
    config = overrides(tiny_config, steps=8, resume_policy="allow_changes", **fields)
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        train.train_and_evaluate(config, str(run))
    message = str(error.value)
    assert path in message and "intact" in message and "corrupt" not in message
    assert f"{next(iter(fields))}: " in message, message
    assert tree_hash(run) == before and not (run / "corrupt_checkpoints").exists()


def test_steps_below_the_checkpoint_are_refused_and_equal_steps_finish(run, tiny_config):
    before = tree_hash(run)
    with pytest.raises(ConfigError, match=r"config.steps=4 is below this workdir's checkpoint"):
        train.train_and_evaluate(overrides(tiny_config, steps=4), str(run))
    assert train.train_and_evaluate(overrides(tiny_config), str(run))["eval_loss"] > 0
    assert tree_hash(run) == before


@pytest.mark.parametrize("resume_schedule", ["original", "stretch"])
def test_more_steps_continue_the_schedule_as_configured(run, tiny_config, resume_schedule):
    config = overrides(tiny_config, steps=8, resume_schedule=resume_schedule)
    train.train_and_evaluate(config, str(run))
    learning_rate = {r["step"]: r["learning_rate"] for r in read_metrics(run)}
    final = 3e-3 * 0.1  # the default peak x min_learning_rate_ratio, reached at step 6
    if resume_schedule == "original":
        assert learning_rate[8] == pytest.approx(final)
    else:  # replanned over 8 steps: step 8's rate is the new schedule's, above its end
        assert learning_rate[8] > 1.5 * final
    history = workdir.read_history(run)
    assert [h["start_step"] for h in history] == [0, 6]
    changed = {c["field"]: (c["from"], c["to"]) for c in history[1]["changes"]}
    assert changed.pop("steps") == (6, 8)
    assert changed == (
        {"resume_schedule": ("original", "stretch")} if resume_schedule == "stretch" else {}
    )
    assert history[0]["schedule"] == {"steps": 6, "warmup_steps": 2}
    assert history[1]["schedule"] == {
        "steps": 6 if resume_schedule == "original" else 8,
        "warmup_steps": 2,
    }
    assert json.loads((run / "config.json").read_text())["steps"] == 8


def test_the_record_follows_the_umask_and_a_damaged_one_names_its_copy(run, tiny_config):
    mode = (run / "config.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    (run / "config.json").write_text('{"steps": 6, ')  # cut short
    with pytest.raises(ConfigError, match="config_history.jsonl"):
        train.train_and_evaluate(overrides(tiny_config, steps=8), str(run))


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(workdir.WorkdirWriteError, match="No space left on device"):
        workdir.record_start(tmp_path, "{}", 0, [], {"steps": 1, "warmup_steps": 0})
    assert list(tmp_path.iterdir()) == []


def test_the_lock_names_its_holder(tmp_path):
    busy = pytest.raises(workdir.WorkdirBusyError, match=f"pid {os.getpid()} on host")
    with workdir.lock(tmp_path), busy, workdir.lock(tmp_path):
        pass
    with workdir.lock(tmp_path):  # released
        pass


def test_a_second_trainer_is_refused_while_the_first_saves(tmp_path, tiny_config):
    """The first trainer pauses inside its first asynchronous save (a temporary checkpoint
    directory on disk); a second one on the same workdir exits 2 at once naming it, and the
    first finishes its run intact: the same losses as a lone run."""
    flags = [
        f"--workdir={tmp_path / 'run'}",
        "--config.steps=4",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.optimizer.warmup_steps=1",
        "--config.sample_prompt=",
        f"--config.data.text_dir={tiny_config.data.text_dir}",
        f"--config.data.data_dir={tiny_config.data.data_dir}",
        "--config.batch_size=8",
        "--config.seq_len=32",
        "--config.model.num_layers=1",
        "--config.model.embed_dim=32",
        "--config.model.mlp_dim=64",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "llm.train", *flags]
    first = subprocess.Popen(
        command,
        env={**env, "LLM_LAB_PAUSE": "save#1:60", "LLM_LAB_RESUME": str(tmp_path / "resume")},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in first.stderr:
            if "paused at save" in line:
                break
        temporary = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if "tmp" in p.name]
        assert temporary, "the first trainer's save should be in progress"
        started = time.time()
        second = subprocess.run(
            command, check=False, env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another training process (pid {first.pid} on host" in second.stderr
        assert time.time() - started < 25  # refused before the first resumes
        assert all(p.exists() for p in temporary)
        (tmp_path / "resume").touch()  # the first trainer's save goes on
        first.stderr.read()
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    lone = [a.replace(str(tmp_path / "run"), str(tmp_path / "lone")) for a in command]
    subprocess.run(lone, check=True, env=env, cwd=ROOT, capture_output=True)
    records, alone = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "lone")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in alone]  # bit-identical
    assert len(workdir.read_history(tmp_path / "run")) == 1
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["2", "4"]
