"""Native sparse attention: efficient path vs dense-mask reference (values and gradients),
causality, packed documents, the pair count, and the layer inside a jitted gradient."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.attention.reference import attention_reference
from kernels.nsa_selected import selected_attention_pallas
from llm.model import nsa, patterns
from llm.model.attention import Attention
from llm.model.config import ModelConfig

B, L, H, K, DH = 2, 40, 4, 2, 8  # L = 5 blocks of 8: the last query block is partial for BLOCK=6
BLOCK = 8
CFG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=H, num_kv_heads=K)


def inputs(block=BLOCK):
    """Random q, k, v, gates and compression weights (not mean pooling, to test the mixing)."""
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, L, H, DH))
    k = jax.random.normal(ks[1], (B, L, K, DH))
    v = jax.random.normal(ks[2], (B, L, K, DH))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (B, L, H, 3)))
    w_ck = jax.random.normal(ks[4], (block, DH, DH)) / block
    w_cv = jax.random.normal(ks[5], (block, DH, DH)) / block
    return q, k, v, gates, w_ck, w_cv


def packed_segments():
    """Row 0: documents of 13, 20 and 7 tokens (boundaries inside blocks); row 1: one document."""
    row0 = np.repeat([1, 2, 3], [13, 20, L - 33])
    return jnp.asarray(np.stack([row0, np.ones(L, int)]), jnp.int32)


CASES = {
    "packed": {"num_selected": 2, "window": 5, "segments": True, "block": BLOCK},
    "partial_last_block": {"num_selected": 3, "window": 9, "segments": True, "block": 6},
    "own_block_only": {"num_selected": 0, "window": 1, "segments": False, "block": BLOCK},
}


@pytest.mark.parametrize("case", CASES)
def test_efficient_matches_dense_mask_reference_values_and_gradients(case):
    c = CASES[case]
    args = inputs(block=c["block"])
    seg = packed_segments() if c["segments"] else None
    kw = {"num_selected": c["num_selected"], "window": c["window"]}
    cot = jax.random.normal(jax.random.key(9), (B, L, H, DH))

    def value_and_grads(fn):  # one compile per implementation: output and input gradients
        out, vjp = jax.vjp(lambda *a: fn(*a, seg, **kw), *args)
        return out, vjp(cot)

    efficient = functools.partial(nsa.sparse_attention, implementation="xla")
    out, grads = jax.jit(value_and_grads, static_argnums=0)(efficient)
    ref, ref_grads = jax.jit(value_and_grads, static_argnums=0)(nsa.sparse_attention_reference)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "gates", "w_ck", "w_cv"), grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
        assert np.abs(a).max() > 0, name  # every input receives gradient


def test_selection_covering_every_past_block_is_dense_causal_attention():
    q, k, v, *_ = inputs()
    n = L // BLOCK
    importance = jax.random.uniform(jax.random.key(3), (B, K, L, n))
    seg = jnp.zeros((B, L), jnp.int32)
    visible = nsa.compressed_visibility(seg, BLOCK)
    ids, valid = nsa.select_blocks(importance, visible, num_selected=n, block=BLOCK)
    out = nsa.selected_attention(q, k, v, ids, valid, seg, BLOCK, scale=DH**-0.5)
    causal = np.tril(np.ones((L, L), bool))
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask=causal), atol=1e-5)


def test_selection_picks_the_most_important_past_blocks_and_the_own_block():
    n = L // BLOCK
    importance = jnp.broadcast_to(jnp.arange(n, 0, -1.0), (1, 1, L, n))  # block 0 most important
    visible = nsa.compressed_visibility(jnp.zeros((1, L), jnp.int32), BLOCK)
    ids, valid = nsa.select_blocks(importance, visible, num_selected=2, block=BLOCK)
    t = 4 * BLOCK + 1  # in block 4: candidates 0..3, picks 0 and 1, then its own block 4
    assert ids[0, 0, t].tolist() == [0, 1, 4] and valid[0, 0, t].all()
    t = BLOCK + 2  # in block 1: only block 0 is past
    assert ids[0, 0, t, [0, 2]].tolist() == [0, 1] and valid[0, 0, t].tolist() == [1, 0, 1]


@pytest.mark.parametrize("segments", [False, True])
def test_future_tokens_do_not_change_earlier_outputs(segments):
    q, k, v, gates, w_ck, w_cv = inputs()
    seg = packed_segments() if segments else None
    kw = {"num_selected": 2, "window": 5, "implementation": "xla"}
    base = nsa.sparse_attention(q, k, v, gates, w_ck, w_cv, seg, **kw)
    for t in (BLOCK + 3, 3 * BLOCK - 1):  # mid-block, and the last token of a block
        k2, v2 = (x.at[:, t].add(3.0) for x in (k, v))
        q2, g2 = q.at[:, t].add(3.0), gates.at[:, t].set(0.9)
        changed = nsa.sparse_attention(q2, k2, v2, g2, w_ck, w_cv, seg, **kw)
        np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-6)
        assert not np.allclose(changed[:, t], base[:, t], atol=1e-3)


def test_packed_document_ignores_the_documents_before_it():
    """Outputs of document 3 (row 0) do not depend on the tokens of documents 1 and 2."""
    q, k, v, gates, w_ck, w_cv = inputs()
    seg = packed_segments()
    kw = {"num_selected": 4, "window": L, "implementation": "xla"}
    base = nsa.sparse_attention(q, k, v, gates, w_ck, w_cv, seg, **kw)
    noise = jax.random.normal(jax.random.key(5), (B, 33, K, DH)) * 3
    k2, v2 = k.at[:, :33].add(noise), v.at[:, :33].add(noise)
    changed = nsa.sparse_attention(q, k2, v2, gates, w_ck, w_cv, seg, **kw)
    np.testing.assert_allclose(changed[0, 33:], base[0, 33:], atol=1e-6)
    assert not np.allclose(changed[0, 20:33], base[0, 20:33], atol=1e-3)


@pytest.mark.parametrize(
    "seq,block,num_selected,window", [(40, 8, 2, 5), (37, 6, 3, 50), (9, 16, 0, 1)]
)
def test_attention_pairs_match_the_reference_masks(seq, block, num_selected, window):
    """Brute force: the visible entries of the reference's three dense masks, for one head."""
    seg = jnp.zeros((1, seq), jnp.int32)
    importance = jax.random.uniform(jax.random.key(0), (1, 1, seq, -(-seq // block)))
    counted = sum(
        int(mask.sum())
        for mask in (
            nsa.reference_compressed_mask(seg, block),
            nsa.reference_selected_mask(importance, seg, num_selected, block),
            nsa.reference_window_mask(seg, window),
        )
    )
    assert nsa.nsa_attention_pairs(seq, block, num_selected, window) == counted


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block": 0}, "block=0"),
        ({"num_selected": -1}, "num_selected=-1"),
        ({"window": 2.5}, "window=2.5"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nsa.NativeSparseAttention(CFG, rngs=nnx.Rngs(0), **kwargs)


def test_layer_is_a_drop_in_for_attention_and_trains_under_jit():
    layer = nsa.NativeSparseAttention(CFG, block=4, num_selected=2, window=6, rngs=nnx.Rngs(0))
    dense_layer = Attention(CFG, None, rngs=nnx.Rngs(0))
    for name in ("wq", "wk", "wv", "wo"):  # same names, shapes and logical axes
        mine, theirs = getattr(layer, name), getattr(dense_layer, name)
        assert mine.shape == theirs.shape
        assert mine.get_metadata()["out_sharding"] == theirs.get_metadata()["out_sharding"]
    assert layer.gate.get_metadata()["out_sharding"] == ("embed", "heads", "nsa_branch")

    x = jax.random.normal(jax.random.key(1), (2, 24, CFG.embed_dim))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    segment_ids = jnp.asarray(np.repeat([[1, 2]], [10, 14], axis=1).repeat(2, 0), jnp.int32)

    @nnx.jit
    def loss_and_grad(layer, x):
        def loss(layer, x):
            out, cache = layer(x, positions, segment_ids, None)
            assert cache is None and out.shape == x.shape
            return jnp.mean(out**2)

        return nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)

    value, (grads, dx) = loss_and_grad(layer, x)
    assert np.isfinite(value) and np.abs(dx).max() > 0
    for name in ("wq", "wk", "wv", "wo", "gate", "compress_k", "compress_v"):
        assert np.abs(getattr(grads, name)[...]).max() > 0, name

    with pytest.raises(NotImplementedError, match="KV-cache"):
        layer(x, positions, None, {"k": x, "v": x, "index": 0})


def test_bfloat16_compute_is_close_to_float32():
    layer = nsa.NativeSparseAttention(CFG, block=4, num_selected=2, window=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, CFG.embed_dim))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    out32, _ = layer(x, positions, None, None)
    layer.cfg = dataclasses.replace(CFG, dtype="bfloat16")
    out16, _ = layer(x.astype(jnp.bfloat16), positions, None, None)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=2e-2 * np.abs(out32).max())


@pytest.mark.parametrize("segments", [False, True])
def test_pallas_selected_block_kernel_matches_the_dense_mask_reference(segments):
    """The forward kernel (interpret mode) on a selection with fewer candidates than slots early
    on, a partial last block (block 6 of 40 tokens) and, packed, blocks split by documents."""
    block, num_selected = 6, 2
    q, k, v, *_ = inputs()
    seg = packed_segments() if segments else jnp.zeros((B, L), jnp.int32)
    importance = jax.random.uniform(jax.random.key(3), (B, K, L, -(-L // block)))
    visible = nsa.compressed_visibility(seg, block)
    ids, valid = nsa.select_blocks(importance, visible, num_selected, block)
    out = selected_attention_pallas(
        q, k, v, ids, valid, seg, block=block, scale=DH**-0.5, interpret=True
    )
    mask = nsa.reference_selected_mask(importance, seg, num_selected, block)  # [B, K, L, L]
    ref, _ = nsa.dense_masked_attention(q, k, v, jnp.repeat(mask, H // K, axis=1), DH**-0.5)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_nsa_pattern_builds_the_layer_and_counts_its_parameters():
    """attention_pattern "sliding,nsa" puts NSA in odd layers; flops counts its parameters."""
    from llm.model.transformer import Transformer
    from llm.science import flops

    cfg = ModelConfig(
        vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        attention_pattern="sliding,nsa", attention_window=8, attention_nsa_block=4,
        attention_nsa_selected=2,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert type(model.blocks[0].attn).__name__ == "Attention"
    assert isinstance(model.blocks[1].attn, nsa.NativeSparseAttention)
    assert model.blocks[1].attn.block == 4 and model.blocks[1].attn.window == 8
    params = nnx.state(model, nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert flops.param_counts(cfg)["total"] == n
    pairs = sum(patterns.visible_pairs(cfg, 24))
    window_pairs = sum(min(8, t + 1) for t in range(24))
    assert pairs == window_pairs + nsa.nsa_attention_pairs(24, 4, 2, 8)
    logits = model(jnp.zeros((1, 24), jnp.int32))
    assert logits.shape == (1, 24, 64) and bool(jnp.all(jnp.isfinite(logits)))
