"""llm.lora against PEFT on a tiny transformers Llama: our adapters saved in PEFT's format load with
`PeftModel.from_pretrained` and give our logits; PEFT's adapters load into ours and give its
logits; the merged model llm.hf.save writes gives them too."""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from llm import hf
from llm import lora as lora_io
from llm.errors import ConfigError
from llm.model import lora
from llm.model.lora import LoRAConfig

VOCAB = 96
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small random Llama in a Hugging Face directory."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


def hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@nnx.jit
def our_logits(model, tokens):
    return model(tokens)


def test_our_adapters_load_into_peft_and_merge(tmp_path, base_dir, tokens):
    model = hf.load(str(base_dir))
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    lora.attach(model, cfg, seed=0)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, lora.Adapter):  # trained-looking adapters: B != 0
            module.b[...] = 0.05 * jax.random.normal(jax.random.key(module.index), module.b.shape)
    ours = np.asarray(our_logits(model, tokens))
    lora_io.save_peft(model, cfg, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model, tokens), ours, atol=2e-5)
    assert np.abs(torch_logits(hf_base(base_dir), tokens) - ours).max() > 1e-2  # adapters show

    hf.save(model, str(tmp_path / "merged"))  # merges the adapters into the weights
    np.testing.assert_allclose(torch_logits(hf_base(tmp_path / "merged"), tokens), ours, atol=2e-5)


def test_peft_adapters_load_into_ours(tmp_path, base_dir, tokens):
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=list(TARGETS[:5]), init_lora_weights=False
    )  # init_lora_weights=False: B random, so the adapters change the logits
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf_base(base_dir), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = torch_logits(peft_model, tokens)

    model = hf.load(str(base_dir))
    loaded = lora_io.load_peft(model, tmp_path / "adapter")
    assert loaded == LoRAConfig(rank=4, alpha=16.0, targets=("gate", "k", "o", "q", "v"))
    assert lora.adapter(model.blocks[0].mlp, "w_up") is None
    np.testing.assert_allclose(np.asarray(our_logits(model, tokens)), expected, atol=2e-5)


def test_what_peft_cannot_hold_is_refused(tmp_path, base_dir):
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], '
        '"use_dora": true}'
    )
    with pytest.raises(ConfigError, match="only plain LoRA adapters"):
        lora_io.load_peft(hf.load(str(base_dir)), tmp_path)
