"""config.distill: the loss equals its formula on hand-made logits (numpy references), the T^2
scaling of its gradient, KL 0 with the teacher equal to the student, an online teacher from a run
and the same loss from its cached top-k logits, and every bad input in one line."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm import config as config_lib
from llm import distill_cache, train
from llm.errors import ConfigError
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.science import flops
from llm.training import distill
from llm.training.distill import DistillConfig, Distiller
from llm.training.metrics import read_metrics
from llm.training.state import TrainState
from llm.training.step import make_train_step

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(2, 3, 7)) * 2  # hand-made logits [B, L, V]
TEACHER = RNG.normal(size=(2, 3, 7)) * 2


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_equals_its_formula(temperature):
    log_p, log_q = _log_softmax(TEACHER / temperature), _log_softmax(STUDENT / temperature)
    forward = distill.kl_divergence(jnp.asarray(TEACHER), jnp.asarray(STUDENT), temperature)
    np.testing.assert_allclose(forward, _kl(log_p, log_q), rtol=1e-5)
    reverse = distill.kl_divergence(
        jnp.asarray(TEACHER), jnp.asarray(STUDENT), temperature, "reverse"
    )
    np.testing.assert_allclose(reverse, _kl(log_q, log_p), rtol=1e-5)
    # The teacher's top k and a tail outcome: a lower bound of the KL, exact for k = V.
    lse = np.log(np.exp(TEACHER / temperature).sum(-1))
    for k in (1, 3, 7):
        ids = np.argsort(-TEACHER, axis=-1)[..., :k]
        values = np.take_along_axis(TEACHER, ids, -1)
        truncated = distill.top_k_kl(
            jnp.asarray(values), jnp.asarray(ids), jnp.asarray(lse), jnp.asarray(STUDENT),
            temperature,
        )  # fmt: skip
        p_k, q_k = (
            np.exp(np.take_along_axis(log_p, ids, -1)),
            np.exp(np.take_along_axis(log_q, ids, -1)),
        )
        p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
        want = (p_k * np.log(p_k / q_k)).sum(-1)
        if k < 7:
            want += p_tail * np.log(p_tail / q_tail)
            assert (np.asarray(truncated) <= _kl(log_p, log_q) + 1e-6).all()
        np.testing.assert_allclose(truncated, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(truncated, forward, rtol=1e-5)


class _Logits:
    """A stand-in student whose logits are given."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *inputs, return_aux):
        return self.logits, {}


def test_loss_equals_its_formula_on_hand_made_logits():
    alpha, temperature, z_loss = 0.3, 2.0, 1e-3
    targets = RNG.integers(0, 7, (2, 3))
    weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
    ids = np.broadcast_to(np.arange(7), TEACHER.shape)  # a cache of all V logits
    batch = {
        "inputs": jnp.zeros((2, 3), jnp.int32),
        "positions": jnp.zeros((2, 3), jnp.int32),
        "segment_ids": jnp.ones((2, 3), jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "weights": jnp.asarray(weights, jnp.float32),
        "teacher_logits": jnp.asarray(TEACHER, jnp.float32),
        "teacher_ids": jnp.asarray(ids, jnp.int32),
        "teacher_lse": jnp.asarray(np.log(np.exp(TEACHER / temperature).sum(-1)), jnp.float32),
    }
    cfg = DistillConfig(cache="/unused", alpha=alpha, temperature=temperature)
    loss, ce, _, extra = Distiller(cfg).losses(
        _Logits(jnp.asarray(STUDENT, jnp.float32)), None, batch, z_loss
    )
    lse = np.log(np.exp(STUDENT).sum(-1))
    token_ce = lse - np.take_along_axis(STUDENT, targets[..., None], -1)[..., 0]
    kl = _kl(_log_softmax(TEACHER / temperature), _log_softmax(STUDENT / temperature))
    want_ce = (weights * token_ce).sum()
    want = alpha * (weights * (token_ce + z_loss * lse**2)).sum()
    want += (1 - alpha) * temperature**2 * (weights * kl).sum()
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(extra["distill_kl"], (weights * kl).sum(), rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_the_soft_loss_gradient_is_t_times_q_minus_p(temperature):
    """d/ds of T^2 KL(p_T || q_T) = T (q_T - p_T): the T^2 keeps it the size of T's gradient at
    T = 1 (for large T: (s - t) / V for zero-mean logits, independent of T; Hinton et al.)."""

    def soft(s):
        return temperature**2 * jnp.sum(distill.kl_divergence(TEACHER, s, temperature))

    grad = jax.grad(soft)(jnp.asarray(STUDENT, jnp.float32))
    p = np.exp(_log_softmax(TEACHER / temperature))
    q = np.exp(_log_softmax(STUDENT / temperature))
    np.testing.assert_allclose(grad, temperature * (q - p), rtol=1e-4, atol=1e-6)
    if temperature == 8.0:
        centred = (STUDENT - STUDENT.mean(-1, keepdims=True)) - (
            TEACHER - TEACHER.mean(-1, keepdims=True)
        )
        np.testing.assert_allclose(grad, centred / 7, rtol=0.5, atol=0.02)


def test_a_teacher_equal_to_the_student_gives_kl_zero(tiny_config):
    """The KL is 0 and has no gradient there: the step's update is alpha times plain CE's (the
    z-loss included), over two micro-batches."""
    exp = config_lib.resolve(tiny_config)
    graphdef, params = nnx.split(Transformer(exp.model, rngs=nnx.Rngs(0)))
    tx = optax.sgd(1.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), guard={}, teacher=params)
    tokens = RNG.integers(0, exp.model.vocab_size, (4, 17))
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "weights": jnp.ones((4, 16), jnp.float32),
    }
    cfg = DistillConfig(teacher="workdir:/unused", alpha=0.25, temperature=2.0)
    updates = []
    for distiller in (None, Distiller(cfg, graphdef)):
        step = make_train_step(
            graphdef, tx, optax.constant_schedule(1.0), grad_accum_steps=2, z_loss=1e-4,
            distill=distiller,
        )  # fmt: skip
        new, metrics = jax.jit(step)(state, batch)
        updates.append(jax.tree.map(jnp.subtract, new.params, params))
    assert abs(float(metrics["distill_kl"])) < 1e-6
    for plain, distilled in zip(*map(jax.tree.leaves, updates), strict=True):
        scale = float(jnp.max(jnp.abs(plain)))  # the KL's gradient is 0 up to rounding
        np.testing.assert_allclose(distilled, 0.25 * plain, rtol=1e-3, atol=1e-4 * scale)


STUDENT_RUN = {  # a smaller student of the tiny teacher (tiny_run: 2 layers x 64)
    "model.num_layers": 1,
    "model.embed_dim": 32,
    "model.mlp_dim": 64,
    "steps": 2,
    "optimizer.warmup_steps": 1,
    "eval_every": 0,
    "checkpoint_every": 0,
    "distill.temperature": 2.0,
}


def test_online_teacher_and_its_cache_give_the_same_loss(tiny_run, tiny_config, tmp_path):
    config = config_lib.with_overrides(
        tiny_config, {**STUDENT_RUN, "distill.teacher": f"workdir:{tiny_run}"}
    )
    train.train_and_evaluate(config, str(tmp_path / "online"))
    online = read_metrics(tmp_path / "online")
    assert online[0]["distill_kl"] > 1e-3  # two nearly untrained models: a small KL
    ratio = online[0]["teacher_tflops_per_device"] / online[0]["tflops_per_device"]
    teacher = config_lib.resolve(config_lib.with_overrides(tiny_config, {}))
    student = config_lib.resolve(config)
    want = flops.forward_flops_per_token(teacher.model, 32) / flops.train_flops_per_token(
        student.model, 32
    )
    assert ratio == pytest.approx(want, rel=1e-6)
    # The whole vocabulary cached: the same loss without the teacher in the step.
    mass = distill_cache.write_cache(student, str(tmp_path / "cache"), top_k=4096)
    assert mass == pytest.approx(1.0, abs=1e-5)
    cached_config = config_lib.with_overrides(
        config, {"distill.teacher": "", "distill.cache": str(tmp_path / "cache")}
    )
    train.train_and_evaluate(cached_config, str(tmp_path / "cached"))
    cached = read_metrics(tmp_path / "cached")
    for a, b in zip(online, cached, strict=True):
        assert b["distill_kl"] == pytest.approx(a["distill_kl"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "teacher_tflops_per_device" not in cached[0]
    with pytest.raises(ConfigError, match="distill.cache=.* was written for other batches"):
        train.train_and_evaluate(
            config_lib.with_overrides(cached_config, {"seed": 1}), str(tmp_path / "seed1")
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill.teacher": "elsewhere:/x"}, "config.distill.teacher='elsewhere:/x' must be"),
        ({"distill.alpha": 1.5}, r"distill.alpha must be in \[0, 1\]"),
        ({"distill.temperature": 0.0}, "distill.temperature must be > 0"),
        ({"distill.kl": "js"}, "distill.kl must be one of"),
        ({"distill.cache": "/x", "distill.kl": "reverse"}, "kl=reverse needs the teacher's"),
        ({"distill.teacher": "hf:/x", "loss.impl": "chunked"}, "set loss.impl=plain"),
    ],
)
def test_bad_distill_configs_are_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_lib.resolve(config_lib.with_overrides(tiny_config, overrides))
    assert "\n" not in str(error.value)


def test_a_bad_teacher_is_one_line_before_compiling(tiny_run, tiny_config, tmp_path):
    """Each bad teacher is refused by distill.make, which the loop calls before compiling (the
    first case runs the whole command: no metrics are written)."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    for step in (3, 6):
        array_file = min((corrupt / "checkpoints" / str(step) / "params" / "d").glob("*"))
        array_file.write_bytes(array_file.read_bytes()[:10])
    config = config_lib.with_overrides(
        tiny_config, {**STUDENT_RUN, "distill.teacher": f"workdir:{tmp_path}/missing"}
    )
    with pytest.raises(ConfigError, match="config.distill.teacher=.*missing/checkpoints not found"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    cases = [
        ({"distill.teacher": f"workdir:{tiny_run}@4"}, r"its steps are \[3, 6\]"),
        ({"distill.teacher": f"workdir:{corrupt}"}, "is corrupt or partial"),
        ({"distill.teacher": f"hf:{tiny_run}"}, "Unsupported Hugging Face config"),
        (
            {"distill.teacher": f"workdir:{tiny_run}", "model.vocab_size": 4104},
            "has another vocabulary .* distill from a teacher with the student's tokenizer",
        ),
    ]
    for overrides, message in cases:
        exp = config_lib.resolve(
            config_lib.with_overrides(tiny_config, {**STUDENT_RUN, **overrides})
        )
        mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
        with (
            jax.set_mesh(mesh),
            partitioning.axis_rules(exp.mesh.rules),
            pytest.raises(ConfigError, match=f"config.distill.teacher=.*{message}") as e,
        ):
            distill.make(exp.distill, exp.model, exp.data.tokenizer, mesh, exp.mesh.rules)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="config.distill.cache=.*manifest.json not found"):
        distill.Cache(DistillConfig(cache=str(tmp_path)), {}, 2)
