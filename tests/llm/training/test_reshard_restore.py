"""A checkpoint saved under one mesh resumes under another with the same losses, and the
memory report sees FSDP divide the parameter bytes."""

import jax
import pytest

from llm import config as config_lib
from llm import train
from llm.parallel import partitioning
from llm.training import instruments, loop
from llm.training.metrics import read_metrics


def with_mesh(config, **sizes):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    return config_lib.with_overrides(config, {f"mesh.{axis}": n for axis, n in sizes.items()})


def test_save_under_fsdp_resume_under_tensor_and_data(
    tmp_path, tiny_config, train_until_first_save
):
    train.train_and_evaluate(with_mesh(tiny_config, data=8), str(tmp_path / "full"))
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}

    train_until_first_save(with_mesh(tiny_config, fsdp=8), str(tmp_path / "resharded"))
    train.train_and_evaluate(with_mesh(tiny_config, data=4, tensor=2), str(tmp_path / "resharded"))

    records = read_metrics(tmp_path / "resharded")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert record["loss"] == pytest.approx(expected[record["step"]], rel=1e-5)


def test_memory_report_shrinks_parameters_by_the_fsdp_factor(tiny_config):
    reports = {}
    for fsdp in (1, 8):
        config = with_mesh(tiny_config, data=8 // fsdp, fsdp=fsdp)
        mesh = partitioning.make_mesh(config.mesh.to_dict())
        with jax.set_mesh(mesh), partitioning.axis_rules(tuple(config.axis_rules)):
            setup = loop.setup_state(config_lib.resolve(config), mesh)
            abstract_batch = {
                k: jax.ShapeDtypeStruct(
                    (config.batch_size, config.seq_len),
                    dtype,
                    sharding=partitioning.batch_sharding(mesh, tuple(config.axis_rules)),
                )
                for k, dtype in (
                    ("inputs", "int32"),
                    ("targets", "int32"),
                    ("positions", "int32"),
                    ("segment_ids", "int32"),
                    ("weights", "float32"),
                )
            }
            compiled = loop.compile_train_step(config_lib.resolve(config), setup, abstract_batch)
            reports[fsdp] = partitioning.memory_report(setup.state, compiled)
    print({k: instruments.format_memory(v) for k, v in reports.items()})
    assert reports[8]["params"] * 8 == reports[1]["params"]
    assert reports[8]["optimizer"] < reports[1]["optimizer"] / 7  # mu, nu split; the count is not
    assert reports[1]["temp"] > 0
