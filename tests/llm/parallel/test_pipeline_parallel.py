"""Pipeline parallelism (llm.parallel.pipeline) trains like one device: loss, gradient norm and
parameters after three AdamW steps, for each schedule, dense and MoE (with expert parallelism);
1F1B's compiled step needs less temporary memory than GPipe's; the parameters sit where the rules
table says; checkpoints resume across stage counts, dense and MoE; bad input is one line."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import pytest

from experiments import default
from llm import config as config_lib
from llm.errors import ConfigError
from llm.parallel import partitioning, pipeline
from llm.training import checkpoint, loop
from llm.training.state import TrainState

B, L, V = 8, 16, 128
TINY = {
    "batch_size": B,
    "seq_len": L,
    "steps": 3,
    "sample_prompt": "",
    "optimizer.warmup_steps": 1,
    "model.num_layers": 4,
    "model.embed_dim": 32,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.mlp_dim": 64,
    "model.vocab_size": V,
    "model.scan_layers": True,
    "mesh.data": 1,
}
MOE = {  # every layer MoE (stacked), a shared expert, loss-free balancing on
    "model.moe.num_experts": 4,
    "model.moe.top_k": 2,
    "model.moe.expert_mlp_dim": 16,
    "model.moe.num_shared_experts": 1,
    "model.moe.bias_update_rate": 1e-3,
}


def experiment(**overrides):
    return config_lib.resolve(
        config_lib.with_overrides(default.get_config(), {**TINY, **overrides})
    )


def batch(i: int) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(i).integers(0, V, (B, L + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    segments = np.ones((B, L), np.int32)
    segments[::2, L // 2 :] = 2  # packed rows: two documents
    positions = np.where(segments == 2, positions - L // 2, positions)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((B, L), np.float32),
        "positions": positions,
        "segment_ids": segments,
    }


class Run(NamedTuple):
    losses: list[float]
    norms: list[float]
    state: TrainState  # after three steps
    temp: int  # the compiled step's temporary bytes per device
    resume: Callable[[str], float]  # a checkpoint directory -> the loss of step 3 from it
    saved: str  # the checkpoint of step 2
    hlo: str  # the compiled step


def train(exp, directory, rows: np.ndarray | None = None) -> Run:
    """Three steps of `exp` on as many devices as its mesh has (a checkpoint after the second),
    each batch's rows in the order `rows` (default: as they are)."""
    sizes = dict(exp.mesh.sizes)
    mesh = partitioning.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])
    exp.check_fits(mesh)
    sharding = partitioning.batch_sharding(mesh, exp.mesh.rules)

    def put(b):
        return {k: jax.device_put(v if rows is None else v[rows], sharding) for k, v in b.items()}

    with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
        setup = loop.setup_state(exp, mesh)
        step = loop.compile_train_step(exp, setup, put(batch(0)))
        state, losses, norms = setup.state, [], []
        manager = checkpoint.make_manager(directory, async_save=False)
        for i in range(3):
            state, metrics = step(state, put(batch(i)))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
            if i == 1:
                checkpoint.save(manager, state)
                checkpoint.wait(manager)

    def resume(saved: str) -> float:
        """Restores the step-2 checkpoint in `saved` onto this run's mesh; step 3's loss."""
        with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
            restored = loop.setup_state(exp, mesh, checkpoint.make_manager(saved, create=False))
            assert int(restored.state.step) == 2
            return float(step(restored.state, put(batch(2)))[1]["loss"])

    temp = step.memory_analysis().temp_size_in_bytes
    return Run(losses, norms, state, temp, resume, str(directory), step.as_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(experiment(), tmp_path_factory.mktemp("one_device"))


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """(schedule, S, M, v=1, moe=False, loss impl="plain", **other mesh axes) -> its Run, each
    compiled once per module."""
    runs = {}

    def run(schedule, stages, micro, virtual=1, moe=False, loss="plain", **mesh):
        key = (schedule, stages, micro, virtual, moe, loss, tuple(sorted(mesh.items())))
        if key not in runs:
            exp = experiment(
                **(MOE if moe else {}),
                **{"loss.impl": loss},
                **{f"mesh.{k}": v for k, v in mesh.items()},
                **{
                    "mesh.stage": stages,
                    "pipeline.schedule": schedule,
                    "pipeline.microbatches": micro,
                    "pipeline.virtual_stages": virtual,
                },
            )
            runs[key] = train(exp, tmp_path_factory.mktemp("pipelined"))
        return runs[key]

    return run


CASES = [  # (schedule, S, M, v, other mesh axes)
    ("gpipe", 2, 2, 1, {}),
    ("1f1b", 2, 4, 1, {}),
    ("gpipe", 4, 8, 1, {}),
    ("1f1b", 4, 8, 1, {}),
    ("interleaved_1f1b", 2, 4, 2, {}),
    ("zb_h1", 2, 4, 1, {}),
    ("1f1b", 2, 2, 1, {"data": 2, "tensor": 2}),
]


@pytest.mark.parametrize("schedule,stages,micro,virtual,mesh", CASES, ids=str)
def test_matches_one_device(reference, pipelined, schedule, stages, micro, virtual, mesh):
    run = pipelined(schedule, stages, micro, virtual, **mesh)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.norms, reference.norms, rtol=1e-5, atol=1e-6)
    assert_same_and_placed(run.state, reference.state)


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_last_stage_splits_the_vocabulary_over_tensor(reference, pipelined, loss):
    """With mesh.tensor = 2 the last stage's output projection and loss are split over the
    vocabulary (no device holds a microbatch's whole logits) and train like one device."""
    run = pipelined("1f1b", 2, 2, 1, loss=loss, data=2, tensor=2)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.norms, reference.norms, rtol=1e-5, atol=1e-6)
    rows = B // 2 // 2  # a microbatch's rows on one device: B / M / data
    assert f"f32[{rows},{L},{V // 2}]" in run.hlo  # half the vocabulary's logits or tiles
    assert f"f32[{rows},{L},{V}]" not in run.hlo  # never the whole vocabulary's


def assert_same_and_placed(state: TrainState, reference: TrainState) -> None:
    """The parameters (and MoE expert biases) of `state` equal `reference`'s, and each array is
    where the rules table puts it: the stacked layers split over the stages."""
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    rules = experiment().mesh.rules
    for variable in jax.tree.leaves(state.params, is_leaf=lambda x: hasattr(x, "get_metadata")):
        names = variable.get_metadata()["out_sharding"]
        spec = partitioning.logical_to_spec(names, rules)
        assert variable[...].sharding.spec == spec, names
        assert ("layers" in names) == (tuple(spec)[:1] == ("stage",))


MOE_M = 2  # microbatches of the MoE runs


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    """One device accumulating gradients over the pipeline's microbatches: MoE auxiliary losses
    are per microbatch, as under gradient accumulation. The pipeline's microbatch m holds rows
    m, m + M, ...; these rows in that order make accumulation step m the same rows."""
    rows = np.arange(B).reshape(B // MOE_M, MOE_M).T.reshape(-1)
    exp = experiment(**MOE, grad_accum_steps=MOE_M)
    return train(exp, tmp_path_factory.mktemp("moe_one_device"), rows)


MOE_CASES = [  # (schedule, v, other mesh axes), S = 2
    ("1f1b", 1, {"expert": 2}),
    ("interleaved_1f1b", 2, {"data": 2}),
    ("zb_h1", 1, {"tensor": 2}),
]


@pytest.mark.parametrize("schedule,virtual,mesh", MOE_CASES, ids=str)
def test_moe_matches_one_device(moe_reference, pipelined, schedule, virtual, mesh):
    """MoE layers inside the stages (their all-to-all over `expert` too, their expert weights split
    over `tensor`): losses, gradient norms, parameters and balancing biases as on one device."""
    run = pipelined(schedule, 2, MOE_M, virtual, moe=True, **mesh)
    np.testing.assert_allclose(run.losses, moe_reference.losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.norms, moe_reference.norms, rtol=1e-5, atol=1e-6)
    assert_same_and_placed(run.state, moe_reference.state)
    bias = np.asarray(run.state.params["blocks"]["mlp"]["expert_bias"][...])  # [layers, E]
    assert np.all(np.abs(bias).max(axis=1) > 0)  # every layer's balancing step taken
    if "expert" in mesh:
        assert "all-to-all" in run.hlo


def test_moe_checkpoints_resume_across_stage_2_and_stage_1(moe_reference, pipelined):
    """MoE expert weights and balancing biases saved at stage=2 x tensor=2 resume on one device,
    and the reverse, with the next loss of the uninterrupted run."""
    staged = pipelined("zb_h1", 2, MOE_M, 1, moe=True, tensor=2)
    want = moe_reference.losses[2]
    np.testing.assert_allclose(moe_reference.resume(staged.saved), want, rtol=1e-5)
    np.testing.assert_allclose(staged.resume(moe_reference.saved), want, rtol=1e-5)


def test_1f1b_needs_less_temporary_memory_than_gpipe(pipelined):
    """At M = 2S GPipe holds 2S microbatches' residuals per stage, 1F1B at most S."""
    gpipe = pipelined("gpipe", 4, 8).temp
    one_f_one_b = pipelined("1f1b", 4, 8).temp
    ratio = one_f_one_b / gpipe
    print(
        f"temporary bytes per device, S=4 M=8: 1f1b {one_f_one_b}, gpipe {gpipe}, ratio {ratio:.2f}"
    )
    assert ratio < 0.7


def test_checkpoints_resume_across_stage_4_and_stage_1(reference, pipelined):
    """A checkpoint holds the logical parameter tree: one saved at stage=4 resumes on one device,
    and the reverse, with the next loss of the uninterrupted run."""
    staged = pipelined("1f1b", 4, 8)
    want = reference.losses[2]
    np.testing.assert_allclose(reference.resume(staged.saved), want, rtol=1e-5)
    np.testing.assert_allclose(staged.resume(reference.saved), want, rtol=1e-5)


def test_banner_names_the_bubble_fraction():
    exp = experiment(**{"mesh.stage": 4, "pipeline.microbatches": 8})
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes), jax.devices()[:4])
    line = pipeline.describe(exp.pipeline, mesh)
    assert "1f1b, 4 stages" in line and "bubble fraction 0.273" in line  # 3 / 11


BAD = [
    ({"model.num_layers": 6}, 4, "num_layers=6 does not split"),
    ({"pipeline.microbatches": 2}, 4, "microbatches=2 < mesh.stage=4"),
    (
        {"pipeline.microbatches": 3, "batch_size": 8},
        2,
        "does not split into pipeline.microbatches=3",
    ),
    ({"pipeline.virtual_stages": 2}, 2, "needs pipeline.schedule=interleaved_1f1b"),
    ({"pipeline.schedule": "interleaved_1f1b"}, 2, "virtual_stages >= 2"),
    ({"model.scan_layers": False}, 2, "set --config.model.scan_layers=True"),
    ({"mesh.sequence": 2}, 2, "mesh.sequence > 1 is not supported"),
    ({**MOE, "model.moe.first_dense_layers": 1}, 2, "every layer must be MoE"),
    ({"pipeline.schedule": "zb"}, 2, "pipeline.schedule must be one of"),
]


@pytest.mark.parametrize("overrides,stages,message", BAD, ids=lambda x: str(x)[:40])
def test_bad_input_is_one_line_before_compiling(overrides, stages, message):
    with pytest.raises(ConfigError, match=message) as error:
        exp = experiment(**{"mesh.stage": stages, **overrides})
        sizes = dict(exp.mesh.sizes)
        mesh = partitioning.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])
        exp.check_fits(mesh)
    assert "\n" not in str(error.value)
