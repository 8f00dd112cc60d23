"""`python -m llm.quantize`: a trained run's checkpoint quantized evaluates near the float eval
loss, samples (with an int8 KV cache too) and takes fewer bytes; bad input is one line."""

import jax
import jax.numpy as jnp
import pytest

from llm import evaluate, quantize
from llm.errors import ConfigError
from llm.model.decode import generate
from llm.model.moe import EXPERT_WEIGHTS
from llm.runs import load_run
from llm.training.metrics import last_per_step, read_metrics

# stated: relative change of the eval loss after PTQ (tiny run, 6 steps)
EVAL_TOLERANCE = {"int8": 0.005, "int4": 0.05}  # int8_w8a8: tests/llm/model/test_quant.py
# bytes saved per targeted float32 weight, less its scale's share: int8 3 (one scale per output
# channel), int4 3.5 (two a byte) less 4 / 32 (a float32 scale per group of 32)
SAVED = {"int8": (2.8, 3.0), "int4": (3.3, 3.5)}
STORED_DTYPE = {"int8": jnp.int8, "int4": jnp.uint8}


@pytest.mark.parametrize("mode", list(EVAL_TOLERANCE))
def test_quantized_run_evaluates_and_samples(tiny_run, tmp_path, mode):
    # the head too: the tiny model's (tied) embedding is most of its bytes, so the bytes saved on
    # disk are well above the checkpoint's compression and metadata noise
    extra = {"group_size": 32} if mode == "int4" else {}  # tiny: embed_dim 64
    targets = "attention,mlp,head"
    sizes = quantize.quantize_run(str(tiny_run), str(tmp_path / mode), mode, targets, **extra)
    assert sizes["step"] == 6
    float_model, _ = load_run(str(tiny_run))
    targeted = float_model.embed[...].size + sum(  # float32 weights of attention, MLP, the head
        getattr(part, name)[...].size
        for block in float_model.blocks
        for part, names in ((block.attn, ("wq", "wk", "wv", "wo")), (block.mlp, EXPERT_WEIGHTS))
        for name in names
    )
    saved = sizes["memory_before"] - sizes["memory_after"]
    low, high = SAVED[mode]
    assert low * targeted < saved < high * targeted
    assert sizes["disk_after"] < 0.5 * sizes["disk_before"]
    result = evaluate.evaluate(str(tmp_path / mode))
    logged = last_per_step(read_metrics(tiny_run))[6]["eval_loss"]
    assert result["eval_loss"] == pytest.approx(logged, rel=EVAL_TOLERANCE[mode])
    model, _ = load_run(str(tmp_path / mode))
    assert model.blocks[0].attn.wq[...].dtype == STORED_DTYPE[mode]
    prompt = jnp.array([[1, 5, 7]], jnp.int32)
    tokens = generate(
        model, prompt, max_new_tokens=4, rng=jax.random.key(0), greedy=True, kv_int8=True
    )
    assert tokens.shape == (1, 7)


def test_bad_quantize_inputs(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="group_size=48 does not divide"):
        quantize.quantize_run(str(tiny_run), str(tmp_path / "a"), "int4", group_size=48)
    with pytest.raises(ConfigError, match=r"names \['lm_head'\]"):
        quantize.quantize_run(str(tiny_run), str(tmp_path / "b"), "int8", targets="lm_head")
    with pytest.raises(ConfigError, match="--mode='int2' is not one of"):
        quantize.quantize_run(str(tiny_run), str(tmp_path / "c"), "int2")
    assert not (tmp_path / "a").exists()  # nothing written
