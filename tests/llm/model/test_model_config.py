"""llm.model.config: the fields marked as fixing parameter shapes are exactly those that change
the parameters (names, shapes or dtypes) of the model built from them, so a checkpoint's shape
check derives from the dataclass and cannot miss a field."""

import dataclasses

import jax
import pytest
from flax import nnx

from llm.model.config import (
    ModelConfig,
    MoEConfig,
    RopeScaling,
    shape_differences,
    shape_fields,
)
from llm.model.quant import QuantConfig
from llm.model.transformer import Transformer

BASE = ModelConfig(  # mup_base_width: unused under sp, needed by the variant parametrization="mup"
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
    mup_base_width=32,
)  # fmt: skip
MOE = MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16, num_shared_experts=1)
# A valid other value of each field (MoE fields on a model with BASE's sizes and MOE's experts).
VARIANTS = {
    "vocab_size": 128, "num_layers": 4, "embed_dim": 64, "num_heads": 8, "num_kv_heads": 4,
    "head_dim": 16, "mlp_dim": 96, "max_seq_len": 4096, "rope_theta": 500.0, "norm_eps": 1e-5,
    "tie_embeddings": False, "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True,
    "remat": "full", "attention_impl": "xla", "attention_pattern": "sliding",
    "attention_window": 8, "attention_global": 4, "attention_stride": 4, "attention_chunk": 8,
    "attention_nsa_block": 8, "attention_nsa_selected": 2, "context_parallel": "all_gather",
    "rope_scaling": RopeScaling("yarn", 4.0, 512), "qkv_bias": True, "qk_norm": True,
    "rope_local_theta": 50.0, "embed_scale": True, "norm_plus_one": True, "post_norms": True,
    "mlp_activation": "gelu_tanh", "query_pre_attn_scalar": 24.0, "final_logit_softcap": 30.0,
    "parametrization": "mup", "mup_base_width": 16, "mup_base_head_dim": 4, "mup_readout": "zero",
    "quant": QuantConfig(mode="int8"),  # QAT: same parameters (PTQ's come from llm.quantize)
}  # fmt: skip
MOE_VARIANTS = {
    "num_experts": 8, "top_k": 1, "expert_mlp_dim": 32, "every": 2, "first_dense_layers": 1,
    "router": "sigmoid_topk", "dispatch": "capacity", "capacity_factor": 2.0,
    "aux_loss_weight": 0.1, "z_loss_weight": 0.1, "bias_update_rate": 0.01,
    "num_shared_experts": 2, "shared_expert_gate": True, "norm_topk_prob": False,
}  # fmt: skip


def parameters(cfg: ModelConfig) -> dict:
    """Path -> (shape, dtype) of every variable of the model `cfg` builds (abstractly)."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): (x.shape, x.dtype) for path, x in leaves}


def test_every_field_has_a_variant():
    init_fields = {f.name for f in dataclasses.fields(ModelConfig) if f.init} - {"moe"}
    assert set(VARIANTS) == init_fields
    assert set(MOE_VARIANTS) == {f.name for f in dataclasses.fields(MoEConfig)}


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_model_shape_fields_are_those_that_change_parameters(field):
    other = dataclasses.replace(BASE, **{field: VARIANTS[field]})
    changes = parameters(other) != parameters(BASE)
    assert changes == (field in shape_fields(ModelConfig)), field


@pytest.mark.parametrize("field", sorted(MOE_VARIANTS))
def test_moe_shape_fields_are_those_that_change_parameters(field):
    base = dataclasses.replace(BASE, moe=MOE)
    other = dataclasses.replace(base, moe=dataclasses.replace(MOE, **{field: MOE_VARIANTS[field]}))
    changes = parameters(other) != parameters(base)
    assert changes == (field in shape_fields(MoEConfig)), field


def test_shape_differences_name_fields_and_default_missing_ones():
    saved = {"num_layers": 2, "embed_dim": 32, "moe": {"num_experts": 4}}
    current = {"num_layers": 2, "embed_dim": 64, "moe": {"num_experts": 4, "every": 1}}
    assert shape_differences(saved, current) == [("embed_dim", 32, 64)]  # every=1: the default
    dense = {"num_layers": 2, "embed_dim": 32}  # saved before MoE existed
    assert shape_differences(dense, {**dense, "moe": {"num_experts": 0}}) == []
