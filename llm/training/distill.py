"""`config.distill`: knowledge distillation from a frozen teacher, in the same jitted train step.

    --config.distill.teacher=workdir:/tmp/big      # a training run's latest checkpoint (@STEP: that one)
    --config.distill.teacher=hf:/path/to/model     # a Hugging Face directory (llm.hf)
    --config.distill.cache=/tmp/topk               # the teacher's top-k logits, by llm.distill_cache

Per target token (Hinton et al. 2015; the T^2 keeps the soft term's gradient the same size
whatever T):

    loss = alpha * CE(student) + (1 - alpha) * T^2 * KL(p_T || q_T)      kl="forward" (default)
                                                     KL(q_T || p_T)      kl="reverse"

with p_T = softmax(teacher logits / T), q_T = softmax(student logits / T); CE keeps the z-loss.
The teacher (any size and layout, the student's vocabulary) runs forward inside the step on
`TrainState.teacher`, under stop_gradient; it is never trained nor checkpointed: every start
reloads it from its source. With a cache the teacher does not run: p_T is the softmax of its
top-k logits and one "tail" outcome for all other ids (`top_k_kl`: exact for k = V, a lower
bound of the KL otherwise; `llm.distill_cache` prints the mass the top k hold), so only the
forward KL is available, at the temperature the cache was written for.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.cross_entropy.reference import cross_entropy
from llm import hf
from llm.errors import ConfigError, check
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.science import flops
from llm.training import checkpoint, init_from
from llm.training.state import Batch

KL_DIRECTIONS = ("forward", "reverse")
# A cache's arrays in the batch: the teacher's top-k logits and ids [B, L, k], and the logsumexp
# [B, L] of all its logits / T (so the mass outside the top k is known).
CACHE_KEYS = ("teacher_logits", "teacher_ids", "teacher_lse")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """config.distill (module docstring)."""

    teacher: str = ""  # "" (off) | workdir:DIR[@STEP] | hf:DIR
    alpha: float = 0.5  # weight of the cross-entropy; 1 - alpha: of T^2 * KL
    temperature: float = 1.0  # T, softening both distributions
    kl: str = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    cache: str = ""  # a directory written by llm.distill_cache: top-k logits instead of the teacher

    def __post_init__(self):
        check(
            isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1,
            f"config.distill.alpha must be in [0, 1], got {self.alpha!r}.",
        )
        check(
            isinstance(self.temperature, (int, float)) and self.temperature > 0,
            f"config.distill.temperature must be > 0, got {self.temperature!r}.",
        )
        check(
            self.kl in KL_DIRECTIONS,
            f"config.distill.kl must be one of {KL_DIRECTIONS}, got {self.kl!r}.",
        )
        if self.teacher:
            init_from.parse(self.teacher, field="distill.teacher")
        check(
            not self.cache or self.kl == "forward",
            "config.distill.kl=reverse needs the teacher's whole distribution: drop "
            "distill.cache (top-k logits only) or use kl=forward.",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.cache)


def kl_divergence(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float, kl: str = "forward"
) -> jax.Array:
    """KL(p_T || q_T) (forward) or KL(q_T || p_T) (reverse) per position: [..., V] -> [...]."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if kl == "reverse":
        log_p, log_q = log_q, log_p
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def top_k_kl(
    teacher_logits: jax.Array,
    teacher_ids: jax.Array,
    teacher_lse: jax.Array,
    student_logits: jax.Array,
    temperature: float,
) -> jax.Array:
    """Forward KL over k + 1 outcomes: the teacher's top k ids and "any other id" (the tail),
    exact for k = V and never above the full KL. teacher_logits, teacher_ids: [..., k];
    teacher_lse: [...] logsumexp of all the teacher's logits / T; student_logits: [..., V]."""
    log_p = teacher_logits.astype(jnp.float32) / temperature - teacher_lse[..., None]  # [..., k]
    p_tail = jnp.clip(1.0 - jnp.sum(jnp.exp(log_p), axis=-1), 0.0, 1.0)  # [...]
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    flat, ids = log_q.reshape(-1, log_q.shape[-1]), teacher_ids.reshape(-1, teacher_ids.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    in_top = jnp.zeros(flat.shape, bool).at[rows, ids].set(True).reshape(log_q.shape)
    log_q_tail = jax.nn.logsumexp(jnp.where(in_top, -1e30, log_q), axis=-1)  # finite if empty
    log_q = jnp.take_along_axis(log_q, teacher_ids, axis=-1)
    has_tail = p_tail > 1e-6
    safe_p_tail = jnp.where(has_tail, p_tail, 1.0)
    tail = jnp.where(has_tail, safe_p_tail * (jnp.log(safe_p_tail) - log_q_tail), 0.0)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) + tail


@dataclasses.dataclass(frozen=True)
class Distiller:
    """The distillation loss of the train step; `teacher_graphdef` None: a cache in the batch."""

    cfg: DistillConfig
    teacher_graphdef: nnx.GraphDef | None = None
    teacher_cfg: ModelConfig | None = None

    def teacher_flops(self, seq_len: int) -> float:
        """The teacher's forward FLOPs per trained token (0 with a cache), counted apart from the
        student's: MFU stays the student's."""
        if self.teacher_cfg is None:
            return 0.0
        return flops.forward_flops_per_token(self.teacher_cfg, seq_len)

    def losses(
        self, model: Transformer, teacher: nnx.State | None, batch: Batch, z_loss: float
    ) -> tuple[jax.Array, jax.Array, dict, dict[str, jax.Array]]:
        """Summed loss (module docstring), summed cross-entropy, the MoE auxiliary values and
        {"distill_kl": the summed KL} over the batch's weighted tokens."""
        cfg, weights = self.cfg, batch["weights"]
        inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
        logits, moe_aux = model(*inputs, return_aux=True)  # [B, L, V]
        loss_sum, ce_sum = cross_entropy(logits, batch["targets"], weights, z_loss)
        if self.teacher_graphdef is None:
            cached = [batch[k] for k in CACHE_KEYS]
            kl = top_k_kl(*cached, logits, cfg.temperature)
        else:
            teacher_logits = nnx.merge(self.teacher_graphdef, teacher)(*inputs)
            kl = kl_divergence(
                jax.lax.stop_gradient(teacher_logits), logits, cfg.temperature, cfg.kl
            )
        kl_sum = jnp.sum(kl * weights)
        soft = (1.0 - cfg.alpha) * cfg.temperature**2 * kl_sum
        return cfg.alpha * loss_sum + soft, ce_sum, moe_aux, {"distill_kl": kl_sum}


def teacher_config(cfg: DistillConfig, student: ModelConfig, tokenizer: str) -> ModelConfig:
    """The teacher's ModelConfig from its source (in the student's compute dtype); ConfigError if
    it is missing or has another vocabulary than the student (vocab_size, or for a training run
    data.tokenizer)."""
    spec = cfg.teacher
    init_from.check_source(spec, field="distill.teacher")
    kind, directory, _ = init_from.parse(spec, field="distill.teacher")
    if kind == "hf":
        try:
            teacher = hf.read_config(directory, dtype=student.dtype)
        except (OSError, ConfigError) as e:
            raise ConfigError(f"config.distill.teacher={spec!r}: {e}") from None
        recorded_tokenizer = tokenizer
    else:
        path = pathlib.Path(directory) / "config.json"
        check(
            path.is_file(),
            f"config.distill.teacher={spec!r}: {path} not found; point it at a training run's "
            "workdir.",
        )
        recorded = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(ModelConfig) if f.init}
        teacher = ModelConfig(**{k: v for k, v in recorded["model"].items() if k in known})
        teacher = dataclasses.replace(teacher, dtype=student.dtype)
        recorded_tokenizer = recorded.get("data", {}).get("tokenizer", "")
    check(
        teacher.vocab_size == student.vocab_size and recorded_tokenizer == tokenizer,
        f"config.distill.teacher={spec!r} has another vocabulary (vocab_size {teacher.vocab_size}, "
        f"tokenizer {recorded_tokenizer!r}) than the student (model.vocab_size "
        f"{student.vocab_size}, data.tokenizer {tokenizer!r}): distill from a teacher with the "
        "student's tokenizer and vocab_size.",
    )
    return teacher


def load_teacher(
    cfg: DistillConfig, student: ModelConfig, tokenizer: str, mesh, rules
) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
    """The frozen teacher placed on `mesh` by `rules` (call under them): its graphdef, state and
    config. ConfigError naming config.distill.teacher if it is missing, corrupt or another
    vocabulary's."""
    teacher_cfg = teacher_config(cfg, student, tokenizer)
    graphdef = None

    def build() -> nnx.State:
        nonlocal graphdef  # static structure, recorded while tracing
        graphdef, state = nnx.split(Transformer(teacher_cfg, rngs=nnx.Rngs(0)))
        return state

    abstract = jax.eval_shape(build)
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    try:
        state = init_from.load_params(
            cfg.teacher, partitioning.with_shardings(abstract, shardings), field="distill.teacher"
        )
    except (checkpoint.CheckpointNotFoundError, checkpoint.CheckpointCorruptError) as e:
        raise ConfigError(f"config.distill.teacher={cfg.teacher!r}: {e}") from None
    return graphdef, state, teacher_cfg


def make(
    cfg: DistillConfig, student: ModelConfig, tokenizer: str, mesh, rules
) -> tuple[Distiller | None, nnx.State | None]:
    """The train step's Distiller and the teacher's state for `TrainState.teacher` (None with a
    cache); (None, None) without distillation."""
    if not cfg.enabled:
        return None, None
    if cfg.cache:
        return Distiller(cfg), None
    graphdef, teacher, teacher_cfg = load_teacher(cfg, student, tokenizer, mesh, rules)
    return Distiller(cfg, graphdef, teacher_cfg), teacher


class Cache:
    """The teacher's top-k logits per training step, written by llm.distill_cache:
    DIR/manifest.json, DIR/teacher_logits.npy float32[steps, B, L, k], DIR/teacher_ids.npy
    int32[steps, B, L, k], DIR/teacher_lse.npy float32[steps, B, L] (global batches,
    memory-mapped)."""

    def __init__(self, cfg: DistillConfig, expected: dict, steps: int):
        """Opens cfg.cache; ConfigError unless its manifest matches `expected` (what fixes the
        run's batches and vocabulary, `Experiment.batches_key`) and cfg.temperature, and it
        holds `steps` steps."""
        directory, expected = cfg.cache, {**expected, "temperature": cfg.temperature}
        path = pathlib.Path(directory) / "manifest.json"
        check(
            path.is_file(),
            f"config.distill.cache={directory!r}: {path} not found; write it first with "
            "`python -m llm.distill_cache`.",
        )
        self.manifest = json.loads(path.read_text())
        differ = {
            k: (self.manifest.get(k), v) for k, v in expected.items() if self.manifest.get(k) != v
        }
        check(
            not differ,
            f"config.distill.cache={directory!r} was written for other batches or temperature (cache vs this "
            f"run: {differ}): rewrite it with this run's config.",
        )
        self.arrays = {
            k: np.load(pathlib.Path(directory) / f"{k}.npy", mmap_mode="r") for k in CACHE_KEYS
        }

    @property
    def steps(self) -> int:
        return self.arrays["teacher_ids"].shape[0]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of step `step` (as llm's data pipeline splits a global batch)."""
        rows = self.arrays["teacher_ids"].shape[1] // process_count
        start = process_index * rows
        return {k: np.asarray(a[step, start : start + rows]) for k, a in self.arrays.items()}
