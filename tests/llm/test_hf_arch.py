"""llm.hf_arch against transformers: Llama 3 (every rope_scaling type), Qwen2/2.5, Qwen3, Mistral,
the Qwen MoE variants and Gemma 3 load with the same logits, save back to the same architecture, and
decode with the KV cache as transformers generates; gradients of the new parameters match."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llm import hf
from llm.model import decode
from llm.science import flops

VOCAB, LENGTH = 131, 48  # an odd vocabulary; 48 positions, beyond the original 32 below
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 96, "attn_implementation": "eager",
}  # fmt: skip
ROPE = {"rope_theta": 500.0, "original_max_position_embeddings": 32}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}

# name -> (config class, model class, config fields, our features expected after load)
CASES = {
    "llama3": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, **ROPE},
         "max_position_embeddings": 256, "tie_word_embeddings": False},
        {"rope_scaling.type": "llama3", "max_seq_len": 256},
    ),
    "linear": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
         "max_position_embeddings": 128, "tie_word_embeddings": True},
        {"rope_scaling.type": "linear", "rope_scaling.factor": 4.0},
    ),
    "dynamic": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0},
         "max_position_embeddings": 32, "tie_word_embeddings": False},
        {"rope_scaling.original_max_position": 32, "max_seq_len": 64},
    ),
    "yarn": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, **ROPE},
         "max_position_embeddings": 128, "tie_word_embeddings": False},
        {"rope_scaling.type": "yarn", "rope_scaling.beta_fast": 16.0},
    ),
    "qwen2": (
        transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        {"rope_theta": 500.0, "tie_word_embeddings": True},
        {"qkv_bias": True, "layer_patterns": ("dense", "dense")},
    ),
    "qwen2_sliding": (
        transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
         "tie_word_embeddings": False},
        {"layer_patterns": ("dense", "sliding"), "attention_window": 8},
    ),
    "qwen3": (
        transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
        {"head_dim": 24, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "yarn", "factor": 2.0, **ROPE}},
        {"qk_norm": True, "head_dim": 24, "qkv_bias": False},
    ),
    "mistral": (
        transformers.MistralConfig, transformers.MistralForCausalLM,
        {"sliding_window": 8, "head_dim": 8, "tie_word_embeddings": False},
        {"layer_patterns": ("sliding", "sliding"), "attention_window": 8, "head_dim": 8},
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
        {**MOE, "shared_expert_intermediate_size": 48, "norm_topk_prob": False, "qkv_bias": True},
        {"moe.norm_topk_prob": False, "qkv_bias": True},
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
        {**MOE, "mlp_only_layers": [0], "norm_topk_prob": False, "head_dim": 8},
        {"moe.norm_topk_prob": False, "moe.first_dense_layers": 1, "qk_norm": True},
    ),
    "gemma3": (
        transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
        {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 30.0,
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 500.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}},
        {"layer_patterns": ("sliding", "dense"), "rope_local_theta": 50.0, "post_norms": True,
         "embed_scale": True, "norm_plus_one": True, "mlp_activation": "gelu_tanh",
         "final_logit_softcap": 30.0, "query_pre_attn_scalar": 24, "tie_embeddings": True},
    ),
}  # fmt: skip


def hf_model(case: str):
    """A small random model of `case`; norm weights and biases too, so swaps would show."""
    config_class, model_class, fields, _ = CASES[case]
    torch.manual_seed(0)
    model = model_class(config_class(**SIZES, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_around_one = p.ndim == 1 and "bias" not in name
            p.copy_(torch.randn_like(p) * 0.2 + scale_around_one)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def attribute(cfg, dotted: str):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_load_and_save_match_transformers(tmp_path, tokens, case):
    reference = hf_model(case)
    reference.save_pretrained(tmp_path / "hf")
    model = hf.load(str(tmp_path / "hf"))
    for field, value in CASES[case][3].items():
        assert attribute(model.cfg, field) == value, field
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert flops.param_counts(model.cfg)["total"] == params  # biases and qk norms counted
    logits = np.asarray(model(tokens))
    np.testing.assert_allclose(logits, hf_logits(reference, tokens), atol=1e-4, rtol=0)

    hf.save(model, str(tmp_path / "ours"))  # back: the same architecture, the same logits
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    )
    assert again.config.model_type == reference.config.model_type
    np.testing.assert_allclose(hf_logits(again, tokens), logits, atol=1e-4, rtol=0)
    assert hf.load(str(tmp_path / "ours")).cfg == model.cfg  # the round trip keeps the config


@pytest.mark.parametrize("case", ["llama3", "dynamic", "yarn", "mistral", "gemma3"])
def test_kv_cache_decode_matches_transformers_generate(tmp_path, case):
    """Greedy decoding past the original context: the cached keys are rotated as transformers
    rotates them (for dynamic NTK, each step with the frequencies of its own length)."""
    reference = hf_model(case)
    reference.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path))
    prompt = np.random.default_rng(1).integers(0, VOCAB, (2, 24)).astype(np.int32)
    ours = decode.generate(model, prompt, max_new_tokens=24, rng=jax.random.key(0), greedy=True)
    with torch.no_grad():
        theirs = reference.generate(
            torch.from_numpy(prompt).long(), max_new_tokens=24, do_sample=False,
            min_new_tokens=24, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "gemma3"])
def test_bias_and_norm_gradients_match_transformers(tmp_path, tokens, case):
    reference = hf_model(case)
    reference.save_pretrained(tmp_path)
    model = hf.load(str(tmp_path))
    cotangent = np.random.default_rng(1).normal(size=(*tokens.shape, VOCAB)).astype(np.float32)
    reference(torch.from_numpy(tokens)).logits.backward(torch.from_numpy(cotangent))
    grads = nnx.jit(nnx.grad(lambda m: jax.numpy.sum(m(tokens) * cotangent)))(model)
    attn, theirs = grads.blocks[1].attn, reference.model.layers[1].self_attn
    pairs = [(attn.wq[...].reshape(64, -1), theirs.q_proj.weight.grad.T)]
    if case == "qwen2":
        pairs += [(attn.bq[...].reshape(-1), theirs.q_proj.bias.grad)]
        pairs += [(attn.bk[...].reshape(-1), theirs.k_proj.bias.grad)]
    else:
        pairs += [(attn.q_norm.scale[...], theirs.q_norm.weight.grad)]
        pairs += [(attn.k_norm.scale[...], theirs.k_norm.weight.grad)]
    if case == "gemma3":  # (1 + w) norms of both branches' outputs
        block, layer = grads.blocks[1], reference.model.layers[1]
        pairs += [(block.attn_post_norm.scale[...], layer.post_attention_layernorm.weight.grad)]
        pairs += [(block.mlp_post_norm.scale[...], layer.post_feedforward_layernorm.weight.grad)]
        pairs += [(block.mlp_norm.scale[...], layer.pre_feedforward_layernorm.weight.grad)]
    for ours, expected in pairs:  # float32 sums, gradients up to ~30: atol grows with the largest
        atol = max(1e-4, 1e-5 * float(np.abs(expected.numpy()).max()))
        np.testing.assert_allclose(ours, expected.numpy(), atol=atol, rtol=1e-4)
