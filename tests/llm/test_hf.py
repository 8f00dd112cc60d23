"""llm.hf against transformers' Llama, Mixtral, Qwen2-MoE: same logits both ways; bad input is one
ConfigError naming the file or field (the other architectures: test_hf_arch.py)."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from experiments import default
from llm import hf
from llm.errors import ConfigError
from llm.model.config import ModelConfig, MoEConfig
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.science import flops

VOCAB, LENGTH = 128, 16


def hf_model(tie: bool) -> transformers.LlamaForCausalLM:
    """A small random Llama; norm weights too, so swapped norms would show."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, rope_theta=500.0,
        tie_word_embeddings=tie, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


@functools.cache
def our_model(tie: bool, scan: bool) -> Transformer:
    """A small random model of ours (shared: the tests only read it)."""
    cfg = ModelConfig(
        vocab_size=VOCAB, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
        rope_theta=500.0, tie_embeddings=tie, scan_layers=scan,
    )  # fmt: skip
    return randomized(Transformer(cfg, rngs=nnx.Rngs(0)), scale=0.1)


def randomized(model: Transformer, scale: float) -> Transformer:
    """Every parameter N(0, scale^2), norm scales around 1, so swapped tensors would show."""
    state = nnx.state(model, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for i, (key, x) in enumerate(flat.items()):
        flat[key] = (key[-1] == "scale") + scale * jax.random.normal(jax.random.key(i), x.shape)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_load_matches_transformers(tmp_path, tokens, tie, scan):
    reference = hf_model(tie)
    reference.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path), scan_layers=scan)
    assert model.cfg.tie_embeddings == tie and model.cfg.rope_theta == 500.0
    np.testing.assert_allclose(model(tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)


def test_load_sharded(tmp_path, tokens):
    reference = hf_model(tie=False)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = hf.load(str(tmp_path))
    np.testing.assert_allclose(model(tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)


def test_load_places_each_tensor_on_the_mesh(tmp_path, tokens):
    """A sharded checkpoint read into a data x fsdp x tensor mesh: each array arrives in the
    sharding the rules table gives it, in bfloat16 when asked, with the same logits."""
    reference = hf_model(tie=False)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2})
    rules = default.get_config().axis_rules
    model = hf.load(str(tmp_path), dtype="bfloat16", mesh=mesh, rules=rules)
    expected = partitioning.state_shardings(nnx.state(model), mesh, rules)
    for array, sharding in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(expected), strict=True
    ):
        assert array.sharding == sharding and array.dtype == jax.numpy.bfloat16
    assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    batch = np.tile(tokens, (2, 1))  # 4 rows: one per data x fsdp shard
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        logits = np.asarray(model(batch), np.float32)
    np.testing.assert_allclose(logits, hf_logits(reference, batch), atol=0.15, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_save_loads_in_transformers(tmp_path, tokens, tie, scan):
    model = our_model(tie, scan)
    hf.save(model, str(tmp_path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert reference.config.tie_word_embeddings == tie
    np.testing.assert_allclose(hf_logits(reference, tokens), model(tokens), atol=1e-4, rtol=0)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path / "nowhere"))


def test_missing_weights_file(tmp_path):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load(str(tmp_path))


def test_missing_tensor(tmp_path):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling type"),
        ({"rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2.0}},
         "rope_scaling type 'su'"),  # a config.json of transformers < 5
        ({"attention_bias": True}, "Unsupported Hugging Face config.*attention_bias"),
        ({"hidden_act": "gelu"}, "Unsupported Hugging Face config.*hidden_act"),
        ({"model_type": "gemma3"}, "Unsupported Hugging Face config.*model_type"),
        ({"num_attention_heads": None}, "lacks the field 'num_attention_heads'"),
        ({"layer_types": ["chunked_attention"] * 2, "model_type": "qwen2",
          "use_sliding_window": True, "sliding_window": 4}, "layer_types.*chunked_attention"),
    ],
)  # fmt: skip
def test_unsupported_config(tmp_path, change, field):
    """One ConfigError naming config.json and the field, before any weights are read."""
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text()) | change
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config.json.*{field}") as error:
        hf.load(str(tmp_path))
    assert "\n" not in str(error.value)


def test_bad_json_and_dtype(tmp_path):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    with pytest.raises(ConfigError, match="dtype='int8' is not one of"):
        hf.load(str(tmp_path), dtype="int8")
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_names_the_file(tmp_path, damage):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a tensor file")
    with pytest.raises(ConfigError, match="model.safetensors"):
        hf.load(str(tmp_path))


def test_missing_shard(tmp_path):
    hf_model(tie=False).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = max(tmp_path.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in .*index.json"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "extra",
    [
        {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
        {"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)},
    ],
)
def test_unused_tensors_are_refused(tmp_path, extra):
    """Weights the config does not describe (biases of a Llama, a third layer of a 2-layer model)."""
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors") | extra
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=f"would not use.*{next(iter(extra))}"):
        hf.load(str(tmp_path))


def test_wrong_shape_names_tensor_and_file(tmp_path):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    match = r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape"
    with pytest.raises(ConfigError, match=match):
        hf.load(str(tmp_path))


# Mixtral and Qwen2-MoE: hidden 32, 2 layers, 4 experts, top-2 (Qwen2-MoE: 2 shared experts'
# width and, in the saved model, a dense first layer).
MOE_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts_per_tok": 2, "tie_word_embeddings": False,
    "attn_implementation": "eager",
}  # fmt: skip


def hf_moe_model(kind: str):
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=48, num_local_experts=4, rope_theta=500.0, **MOE_SIZES
        )
        model_class = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
            num_experts=4, norm_topk_prob=True, qkv_bias=False, **MOE_SIZES,
        )  # fmt: skip
        model_class = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_load_matches_transformers(tmp_path, tokens, kind):
    reference = hf_moe_model(kind)
    reference.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path))
    m = model.cfg.moe
    assert (m.num_experts, m.top_k, m.num_shared_experts) == (4, 2, 2 if kind == "qwen2_moe" else 0)
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert flops.param_counts(model.cfg)["total"] == params  # the shared gate [D, 1] counted
    np.testing.assert_allclose(model(tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="scan_layers=True is not supported with MoE"):
        hf.load(str(tmp_path), scan_layers=True)


def test_qwen2_moe_gradients_match_transformers(tmp_path, tokens):
    """The shared expert gate and the router learn as in transformers."""
    reference = hf_moe_model("qwen2_moe")
    reference.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path))
    cotangent = np.random.default_rng(1).normal(size=(*tokens.shape, VOCAB)).astype(np.float32)
    reference(torch.from_numpy(tokens)).logits.backward(torch.from_numpy(cotangent))
    grads = nnx.jit(nnx.grad(lambda m: jax.numpy.sum(m(tokens) * cotangent)))(model)
    layer, mlp = reference.model.layers[1].mlp, grads.blocks[1].mlp
    for ours, theirs in [
        (mlp.shared_gate[...], layer.shared_expert_gate.weight.grad.T),
        (mlp.router[...], layer.gate.weight.grad.T),
        (mlp.w_down[...][3], layer.experts.down_proj.grad[3].T),
    ]:
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)


def our_moe_model(kind: str) -> Transformer:
    """A small random MoE model of ours: Mixtral-like, or Qwen2-MoE-like with a dense layer 0."""
    qwen = kind == "qwen2_moe"
    moe = MoEConfig(
        num_experts=4, top_k=2, expert_mlp_dim=24, first_dense_layers=int(qwen),
        num_shared_experts=2 * qwen, shared_expert_gate=qwen,
    )  # fmt: skip
    cfg = ModelConfig(
        vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
        rope_theta=500.0, tie_embeddings=qwen, moe=moe,
    )  # fmt: skip
    return randomized(Transformer(cfg, rngs=nnx.Rngs(0)), scale=0.2)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_save_loads_in_transformers(tmp_path, tokens, kind):
    model = our_moe_model(kind)
    hf.save(model, str(tmp_path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert reference.config.model_type == kind
    np.testing.assert_allclose(hf_logits(reference, tokens), model(tokens), atol=1e-4, rtol=0)
    assert hf.load(str(tmp_path)).cfg.moe == model.cfg.moe  # the round trip keeps the layout


def test_unsupported_qwen2_moe_config(tmp_path):
    hf.save(our_moe_model("qwen2_moe"), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["shared_expert_intermediate_size"] = 30
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size=30"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "moe_fields, message",
    [
        ({"router": "sigmoid_topk"}, "Mixtral.*router='sigmoid_topk'"),
        ({"first_dense_layers": 1}, "Mixtral.*dense layers"),
        ({"num_shared_experts": 1}, "Qwen2Moe.*shared_expert_gate=False"),
    ],
)
def test_unsaveable_moe_model(tmp_path, moe_fields, message):
    moe = MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=8, **moe_fields)
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, moe=moe)
    with pytest.raises(ValueError, match=f"Cannot save as {message}"):
        hf.save(Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path))


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("sliding,dense", "LlamaForCausalLM: mixed dense/sliding layers"),
        ("local_global", "attention_pattern='local_global'"),
    ],
)
def test_hf_export_refuses_patterns_hf_lacks(tmp_path, pattern, message):
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        attention_pattern=pattern,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        hf.save(Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
