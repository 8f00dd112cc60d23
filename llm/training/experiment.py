"""One experiment, typed: what `llm.config.resolve` makes of a config file and its overrides.

Each part is built (and so checked) by the module that owns it: the model (llm.model.config),
the optimizer, the guard, checkpoints, data, the mesh. The fields below are config's top-level
ones; `Experiment` checks them and the rules that span parts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax

from llm.errors import check, check_positive, is_int
from llm.harness.config import HarnessConfig
from llm.model import patterns
from llm.model.config import ModelConfig
from llm.model.lora import LoRAConfig
from llm.parallel import context, partitioning, pipeline
from llm.parallel.partitioning import MeshConfig
from llm.parallel.pipeline import PipelineConfig
from llm.science import flops
from llm.training import init_from, inputs, post_training, prune
from llm.training.checkpoint import CheckpointConfig
from llm.training.distill import DistillConfig
from llm.training.guard import GuardConfig
from llm.training.inputs import DataConfig
from llm.training.optimizer import OptimizerConfig
from llm.training.post_training import PostTrainingConfig
from llm.training.prune import PruneConfig
from llm.training.step import LossConfig
from llm.training.workdir import RESUME_POLICIES

# A resume that raises `steps`: continue the schedule the run started with (held at its final
# learning rate after its end), or replan warmup and decay over the new steps.
RESUME_SCHEDULES = ("original", "stretch")

TRACKERS = ("", "wandb")  # config.tracker: where metrics go besides metrics.jsonl and TensorBoard


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    guard: GuardConfig
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # llm.model.lora
    post_training: PostTrainingConfig = dataclasses.field(default_factory=PostTrainingConfig)
    harness: HarnessConfig = dataclasses.field(default_factory=HarnessConfig)  # config.eval
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    seed: int = 0
    steps: int = 300
    batch_size: int = 16  # global batch, in sequences
    grad_accum_steps: int = 1  # micro-batches per step
    seq_len: int = 256
    log_every: int = 10
    eval_every: int = 100  # 0 disables
    eval_batches: int = 8
    z_loss: float = 1e-4
    sample_prompt: str = ""  # decoded at the end of training; "" to skip
    sample_tokens: int = 48
    log_batch_hashes: bool = False  # config.debug.log_batch_hashes
    log_activation_rms: bool = False  # config.debug.log_activation_rms
    profile_start: int = -1  # config.profile.start_step: first step traced; -1 = none
    profile_steps: int = 3  # config.profile.steps
    init_from: str = ""  # "" | workdir:DIR[@STEP] | hf:DIR: a fresh start's weights (init_from.py)
    resume_policy: str = "strict"  # strict | allow_changes (llm.training.workdir)
    resume_schedule: str = "original"  # original | stretch: the schedule when a resume adds steps
    schedule_steps: int | None = None  # learning-rate schedule length; None: steps
    tracker: str = ""  # config.tracker: "" or "wandb" (Weights & Biases, besides metrics.jsonl)
    config_json: str = "{}"  # the config as given, for WORKDIR/config.json

    def __post_init__(self):
        for field in ("steps", "batch_size", "seq_len", "log_every", "grad_accum_steps"):
            check_positive(getattr(self, field), field)
        check_positive(self.eval_batches, "eval_batches")
        check(
            self.eval_every >= 0,
            f"config.eval_every must be >= 0 (0 disables), got {self.eval_every}.",
        )
        check(
            self.batch_size % self.grad_accum_steps == 0,
            f"config.batch_size={self.batch_size} is not divisible by config.grad_accum_steps="
            f"{self.grad_accum_steps}: pick a batch size that splits into equal micro-batches.",
        )
        check(
            self.seq_len <= self.model.max_seq_len,
            f"config.seq_len={self.seq_len} is longer than the model accepts "
            f"(config.model.max_seq_len={self.model.max_seq_len}): lower seq_len or raise "
            "max_seq_len.",
        )
        patterns.validate_fits(self.model, self.seq_len)
        self.lora.check_model(self.model)
        check(
            not (self.lora.rank and (self.prune.method != "none" or self.distill.enabled)),
            "config.lora with config.prune or config.distill: both act on the full weights the "
            "adapters freeze; set lora.rank=0, or prune.method=none and distill.teacher=''.",
        )
        self.optimizer.check_schedule(self.schedule_length)
        if self.init_from:
            init_from.parse(self.init_from)
        self.post_training.check_run(self.init_from, self.log_activation_rms)
        check(
            is_int(self.seed) and self.seed >= 0,
            f"config.seed must be an integer >= 0, got {self.seed!r}.",
        )
        check(
            self.resume_policy in RESUME_POLICIES,
            f"config.resume_policy must be one of {RESUME_POLICIES}, got {self.resume_policy!r}.",
        )
        check(
            self.resume_schedule in RESUME_SCHEDULES,
            f"config.resume_schedule must be one of {RESUME_SCHEDULES}, got "
            f"{self.resume_schedule!r}.",
        )
        check(
            self.model.param_dtype == "float32",
            f"config.model.param_dtype={self.model.param_dtype}: training keeps float32 "
            "parameters (AdamW's updates and state need them); set model.dtype=bfloat16 for "
            "bfloat16 compute with float32 parameters.",
        )
        check(
            self.loss.impl == "plain" or self.model.final_logit_softcap is None,
            "config.loss.impl=chunked does not apply model.final_logit_softcap (Gemma): use "
            "loss.impl=plain for a soft-capped model.",
        )
        check(
            self.model.dtype != "float16",
            "config.model.dtype=float16 needs loss scaling, which this trainer does not have: "
            "use bfloat16 (same memory, float32's range).",
        )
        prune.check_model(self.prune, self.model)
        check(
            not self.distill.enabled or self.loss.impl == "plain",
            "config.distill needs the student's logits: set loss.impl=plain.",
        )
        check(
            not self.distill.enabled or self.post_training.format != "preference",
            "config.distill does not apply to preference training (post_training.format="
            "preference): unset distill.teacher and distill.cache.",
        )
        check(self.z_loss >= 0, f"config.z_loss must be >= 0, got {self.z_loss}.")
        check(
            is_int(self.profile_start) and self.profile_start >= -1,
            f"config.profile.start_step must be a step >= 0, or -1 for no trace, got "
            f"{self.profile_start!r}.",
        )
        check_positive(self.profile_steps, "profile.steps")
        check(
            self.tracker in TRACKERS,
            f"config.tracker must be one of {TRACKERS}, got {self.tracker!r}.",
        )
        check(
            self.tracker != "wandb" or importlib.util.find_spec("wandb") is not None,
            'config.tracker="wandb" needs the wandb package: pip install -e ".[wandb]", or '
            'set --config.tracker="".',
        )
        check(
            isinstance(self.log_batch_hashes, bool),
            f"config.debug.log_batch_hashes must be True or False, got {self.log_batch_hashes!r}.",
        )
        check(
            isinstance(self.log_activation_rms, bool),
            "config.debug.log_activation_rms must be True or False, got "
            f"{self.log_activation_rms!r}.",
        )

    @property
    def schedule_length(self) -> int:
        """Steps of the learning-rate schedule (after them: its final rate)."""
        return self.schedule_steps or self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def batches_key(self) -> dict:
        """What fixes the training batches and their vocabulary (llm.distill_cache's manifest)."""
        data = dataclasses.asdict(self.data)
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "vocab_size": self.model.vocab_size, "data": data}  # fmt: skip

    def load_data(self):
        """The tokenizer and the packed train and eval splits of this experiment."""
        load = inputs.load_data
        if self.post_training.format != "pretrain":  # JSONL records (llm.training.post_training)
            load = functools.partial(post_training.load_data, self.post_training)
        return load(
            self.data,
            vocab_size=self.model.vocab_size,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def sharded_dims(self) -> dict[str, tuple[str, int]]:
        """Logical axes the rules table may shard -> (the config field setting the size, size)."""
        m = self.model
        return {
            "batch": ("batch_size", self.batch_size),
            "seq": ("seq_len", self.seq_len),
            "embed": ("model.embed_dim", m.embed_dim),
            "heads": ("model.num_heads", m.num_heads),
            "kv_heads": ("model.num_kv_heads", m.num_kv_heads),
            "head_dim": ("model.head_dim", m.head_dim),
            "mlp": ("model.mlp_dim", m.mlp_dim),
            "vocab": ("model.vocab_size", m.vocab_size),
            "expert": ("model.moe.num_experts", m.moe.num_experts),
        }

    def check_fits(self, mesh: jax.sharding.Mesh) -> None:
        """The experiment splits over `mesh`: each sharded dimension evenly, the sequence as
        context parallelism needs, the global batch over the processes (an equal share each)."""
        rules = self.mesh.rules
        partitioning.check_sharding(self.sharded_dims(), mesh, rules)
        context.validate(self.model, self.seq_len, mesh, rules)
        pipeline.validate(
            self.pipeline, self.model, mesh, rules, self.batch_size // self.grad_accum_steps
        )
        check(
            pipeline.stages_of(mesh) == 1
            or not (self.distill.enabled or self.lora.rank)
            and self.post_training.format != "preference",
            f"mesh.stage={pipeline.stages_of(mesh)} pipelines full-weight pretraining and SFT "
            "only: distillation, LoRA and preference training need mesh.stage=1.",
        )
        self.check_memory(mesh)
        processes = jax.process_count()
        check(
            self.batch_size % processes == 0,
            f"config.batch_size={self.batch_size} does not split over {processes} processes: "
            f"use a multiple of {processes}.",
        )

    def memory_estimate(self, mesh: jax.sharding.Mesh) -> int:
        """A lower bound of a device's training memory in bytes: float32 parameters, gradients and
        AdamW's two moments (16 bytes a parameter, split over fsdp x tensor) and the float32
        logits with their gradient (split over the batch axes and tensor)."""
        shape = dict(mesh.shape)
        param_split = shape.get("fsdp", 1) * shape.get("tensor", 1)
        batch_split = shape.get("data", 1) * shape.get("fsdp", 1) * shape.get("expert", 1)
        tokens = self.tokens_per_step / self.grad_accum_steps / batch_split
        logits = 2 * 4 * tokens * self.model.vocab_size / shape.get("tensor", 1)
        return int(16 * flops.param_counts(self.model)["total"] / param_split + logits)

    def check_memory(self, mesh: jax.sharding.Mesh) -> None:
        """ConfigError when `memory_estimate` exceeds the memory there is: a device's own (GPU,
        TPU), or this host's RAM shared by its CPU devices."""
        need = self.memory_estimate(mesh)
        device = jax.local_devices()[0]
        if device.platform == "cpu":
            need *= jax.local_device_count()
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            where = f"this host's {have / 2**30:.1f} GiB of RAM"
        else:
            have = (device.memory_stats() or {}).get("bytes_limit", 0)
            where = f"a {device.device_kind}'s {have / 2**30:.1f} GiB"
        check(
            not have or need <= have,
            f"this experiment needs at least {need / 2**30:.1f} GiB (parameters, gradients, AdamW "
            f"state and logits: model.vocab_size={self.model.vocab_size}, "
            f"{flops.param_counts(self.model)['total'] / 1e9:.2f}B parameters), more than "
            f"{where}: shrink the model or batch, or shard it over more devices (mesh.fsdp).",
        )
