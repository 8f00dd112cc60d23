"""One experiment, typed: what `llm.config.resolve` makes of a config file and its overrides.

Each part is built (and so checked) by the module that owns it: the model (llm.model.config),
the optimizer, the guard, checkpoints, data, the mesh. The fields below are config's top-level
ones; `Experiment` checks them and the rules that span parts.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax

from llm.errors import check, check_positive, is_int
from llm.model import patterns
from llm.model.config import ModelConfig
from llm.parallel import context, partitioning
from llm.parallel.partitioning import MeshConfig
from llm.training import inputs
from llm.training.checkpoint import CheckpointConfig
from llm.training.guard import GuardConfig
from llm.training.inputs import DataConfig
from llm.training.optimizer import OptimizerConfig

TRACKERS = ("", "wandb")  # config.tracker: where metrics go besides metrics.jsonl and TensorBoard


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    guard: GuardConfig
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
    profile_start: int = -1  # config.profile.start_step: first step traced; -1 = none
    profile_steps: int = 3  # config.profile.steps
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
        self.optimizer.check_schedule(self.steps)
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

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def load_data(self):
        """The tokenizer and the packed train and eval splits of this experiment."""
        return inputs.load_data(
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
        processes = jax.process_count()
        check(
            self.batch_size % processes == 0,
            f"config.batch_size={self.batch_size} does not split over {processes} processes: "
            f"use a multiple of {processes}.",
        )
