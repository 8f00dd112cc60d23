"""The Transformer: causality, packed-sequence isolation, scan/remat equivalence, axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.model.config import ModelConfig
from llm.model.transformer import Transformer

CFG = ModelConfig(
    vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64
)


def random_tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_future_tokens_do_not_change_earlier_logits():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = random_tokens((2, 16))
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % CFG.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_packed_document_is_isolated_from_the_one_before():
    """Logits of document B do not depend on the document packed before it."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    doc_b = random_tokens((1, 7), seed=1)
    outputs = []
    for seed, len_a in ((2, 9), (3, 5)):
        doc_a = random_tokens((1, len_a), seed=seed)
        tokens = jnp.concatenate([doc_a, doc_b], axis=1)
        segment_ids = jnp.array([[1] * len_a + [2] * 7], jnp.int32)
        positions = jnp.array([list(range(len_a)) + list(range(7))], jnp.int32)
        outputs.append(model(tokens, positions, segment_ids)[:, len_a:])
    alone = model(doc_b)
    np.testing.assert_allclose(outputs[0], alone, atol=1e-5)
    np.testing.assert_allclose(outputs[1], alone, atol=1e-5)


def stacked_copy(loop_model: Transformer, cfg: ModelConfig) -> Transformer:
    """A scan_layers model holding the same weights as `loop_model`."""
    scan_model = Transformer(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(loop_model)
    blocks = [state["blocks"][i] for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    nnx.update(scan_model, {"embed": state["embed"], "final_norm": state["final_norm"]})
    nnx.update(scan_model.blocks, stacked)
    return scan_model


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_match_the_plain_loop(remat):
    import dataclasses

    loop = Transformer(CFG, rngs=nnx.Rngs(0))
    scan = stacked_copy(loop, dataclasses.replace(CFG, scan_layers=True, remat=remat))
    tokens = random_tokens((2, 12))

    def loss(model):
        return jnp.mean(model(tokens) ** 2)

    np.testing.assert_allclose(loop(tokens), scan(tokens), atol=1e-5)
    grad_loop = nnx.grad(loss)(loop)
    grad_scan = nnx.grad(loss)(scan)
    np.testing.assert_allclose(
        grad_loop.blocks[1].mlp.w_down[...], grad_scan.blocks.mlp.w_down[...][1], atol=1e-6
    )
    np.testing.assert_allclose(grad_loop.embed[...], grad_scan.embed[...], atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_names_each_of_its_axes(scan_layers):
    import dataclasses

    model = Transformer(
        dataclasses.replace(CFG, scan_layers=scan_layers, tie_embeddings=False), rngs=nnx.Rngs(0)
    )
    known = {"batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers"}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            names = variable.get_metadata()["out_sharding"]
            assert len(names) == variable[...].ndim, path
            assert set(names) <= known, path


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    import dataclasses

    model = Transformer(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits = model(random_tokens((1, 8)))
    assert model.embed[...].dtype == jnp.float32
    assert logits.dtype == jnp.float32
    reference = Transformer(CFG, rngs=nnx.Rngs(0))(random_tokens((1, 8)))
    np.testing.assert_allclose(logits, reference, atol=0.05)
