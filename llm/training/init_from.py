"""`config.init_from`: a new run starts from another model's weights, with a fresh optimizer.

    --config.init_from=workdir:/tmp/pretrained        # a run's latest checkpoint
    --config.init_from=workdir:/tmp/pretrained@200    # its step 200
    --config.init_from=hf:/path/to/hf_model           # a Hugging Face directory (llm.hf.load)

Only a fresh start reads the source: a resume of the new run restores the new run's own
checkpoint. The source's model must have this config's shapes (a difference is named).
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from llm import hf
from llm.errors import ConfigError, check
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.training import checkpoint

KINDS = ("workdir", "hf")


def parse(spec: str, field: str = "init_from") -> tuple[str, str, int | None]:
    """ "workdir:DIR[@STEP]" | "hf:DIR" -> (kind, directory, step); ConfigError naming
    config.`field` if malformed."""
    kind, colon, location = spec.partition(":")
    check(
        bool(colon) and kind in KINDS and bool(location),
        f"config.{field}={spec!r} must be workdir:DIR, workdir:DIR@STEP or hf:DIR.",
    )
    try:
        directory, step = checkpoint.split_step(location) if kind == "workdir" else (location, None)
    except ValueError as e:
        raise ConfigError(f"config.{field}: {e}") from None
    return kind, directory, step


def check_source(spec: str, field: str = "init_from") -> None:
    """ConfigError (before anything is compiled) if the source does not exist."""
    kind, directory, _ = parse(spec, field)
    needed = pathlib.Path(directory) / ("checkpoints" if kind == "workdir" else "config.json")
    check(
        needed.exists(),
        f"config.{field}={spec!r}: {needed} not found; point it at a training run's workdir "
        "(workdir:DIR) or a Hugging Face model directory (hf:DIR).",
    )


def load_params(spec: str, abstract_params: nnx.State, field: str = "init_from") -> nnx.State:
    """The source's model state, placed as `abstract_params`' shardings say."""
    kind, directory, step = parse(spec, field)
    if kind == "workdir":
        return checkpoint.restore_params(directory, abstract_params, step)
    try:
        with jax.set_mesh(None):  # llm.hf builds its model unsharded, on the host
            source = nnx.state(hf.load(directory, dtype=_dtype(abstract_params)))
    except (OSError, ValueError) as e:  # a directory llm.hf cannot read
        raise ConfigError(f"config.{field}={spec!r}: {e}") from None
    saved, expected = checkpoint.leaves(source), checkpoint.leaves(abstract_params)
    differences = checkpoint.state_differences(saved, expected)
    check(
        not differences,
        f"config.{field}={spec!r} has another model than this config "
        f"({len(differences)} arrays differ: {'; '.join(differences[:4])}): set config.model "
        "to the source's sizes.",
    )
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    return jax.device_put(source, shardings)


def load_model(
    spec: str, cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: partitioning.AxisRules
) -> nnx.State | None:
    """The source's weights as the state of a plain model of `cfg` (no LoRA adapters), placed on
    `mesh` by `rules`; None without a source ("")."""
    if not spec:
        return None
    abstract = jax.eval_shape(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    return load_params(spec, partitioning.with_shardings(abstract, shardings))


def _dtype(abstract_params: nnx.State) -> str:
    return str(jax.tree.leaves(abstract_params)[0].dtype)
