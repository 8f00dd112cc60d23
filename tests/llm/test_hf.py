"""llm.hf against transformers' LlamaForCausalLM: same logits both ways, clear errors."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from llm import hf
from llm.model import ModelConfig, Transformer

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
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for i, (key, x) in enumerate(flat.items()):
        flat[key] = (key[-1] == "scale") + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
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
    "change",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
        {"attention_bias": True},
        {"hidden_act": "gelu"},
        {"model_type": "mistral"},
    ],
)
def test_unsupported_config(tmp_path, change):
    hf.save(our_model(tie=True, scan=False), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"Unsupported Hugging Face config.*{next(iter(change))}"):
        hf.load(str(tmp_path))
