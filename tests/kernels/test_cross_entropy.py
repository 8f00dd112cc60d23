"""kernels.cross_entropy: the chunked loss equals the materializing reference and optax (values
and gradients w.r.t. hidden and unembed), never holds the logits, and refuses bad arguments."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kernels.cross_entropy import api, reference

# (batch, seq, embed, vocab, seq_block, vocab_chunk): blocks and chunks that divide, ragged ones,
# and ones larger than the sequence and the vocabulary (one tile).
SHAPES = {
    "divisible": (2, 6, 16, 32, 3, 8),
    "ragged": (2, 7, 16, 37, 3, 8),
    "one_tile": (1, 5, 8, 11, 16, 64),
}
# dtype -> (rtol, atol) of values and gradients against the float32 reference.
TOLERANCES = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}


def _inputs(batch, seq, embed, vocab, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (batch, seq, embed), jnp.float32).astype(dtype)
    unembed = (0.5 * jax.random.normal(k[1], (embed, vocab), jnp.float32)).astype(dtype)
    targets = jax.random.randint(k[2], (batch, seq), 0, vocab)
    weights = (jax.random.uniform(k[3], (batch, seq)) > 0.3).astype(jnp.float32)  # masked targets
    return hidden, unembed, targets, weights


def _optax_loss(hidden, unembed, targets, weights, z_loss):
    """The same loss from optax's public cross-entropy (and jax.nn.logsumexp for the z-loss)."""
    logits = jnp.einsum("bld,dv->blv", hidden, unembed, preferred_element_type=jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
    z = z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)) * weights
    return jnp.sum(ce + z), jnp.sum(ce)


def _values_and_grads(loss_fn, hidden, unembed):
    """(loss_sum, ce_sum, d loss_sum / d hidden, d loss_sum / d unembed), in float32."""
    loss_sum, ce_sum = loss_fn(hidden, unembed)
    grads = jax.grad(lambda h, w: loss_fn(h, w)[0], argnums=(0, 1))(hidden, unembed)
    return [np.asarray(x, np.float32) for x in (loss_sum, ce_sum, *grads)]


def _assert_close(got, want, dtype):
    rtol, atol = TOLERANCES[dtype]
    for name, g, w in zip(("loss_sum", "ce_sum", "d_hidden", "d_unembed"), got, want):
        scale = max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["no_z", "z"])
def test_chunked_equals_reference_and_optax(shape, dtype, z_loss):
    batch, seq, embed, vocab, seq_block, vocab_chunk = SHAPES[shape]
    hidden, unembed, targets, weights = _inputs(batch, seq, embed, vocab, dtype)

    def chunked(h, w):
        return api.linear_cross_entropy(
            h, w, targets, weights, z_loss=z_loss, vocab_chunk=vocab_chunk, seq_block=seq_block
        )

    got = _values_and_grads(jax.jit(chunked), hidden, unembed)
    # The reference and optax in float32 on the same (rounded) inputs.
    h32, w32 = hidden.astype(jnp.float32), unembed.astype(jnp.float32)
    want = _values_and_grads(
        lambda h, w: reference.linear_cross_entropy(h, w, targets, weights, z_loss), h32, w32
    )
    _assert_close(got, want, dtype)
    public = _values_and_grads(lambda h, w: _optax_loss(h, w, targets, weights, z_loss), h32, w32)
    _assert_close(got, public, dtype)
    assert np.all(got[2][np.asarray(weights) == 0] == 0)  # masked tokens get no gradient


def test_xla_implementation_is_the_reference():
    hidden, unembed, targets, weights = _inputs(2, 5, 8, 13, jnp.float32)
    got = api.linear_cross_entropy(hidden, unembed, targets, weights, implementation="xla")
    want = reference.linear_cross_entropy(hidden, unembed, targets, weights, 0.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_reference_one_hot_target_equals_the_gather(z_loss):
    """reference.cross_entropy(one_hot=True) (a pipeline's last stage): values and gradients
    w.r.t. the logits equal the gather's and optax's."""
    hidden, unembed, targets, weights = _inputs(2, 7, 16, 37, jnp.float32)
    logits = jnp.einsum("bld,dv->blv", hidden, unembed)

    def loss(one_hot):
        return jax.value_and_grad(
            lambda x: reference.cross_entropy(x, targets, weights, z_loss, one_hot)[0]
        )(logits)

    (got, d_got), (want, d_want) = loss(True), loss(False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(d_got, d_want, rtol=1e-6, atol=1e-7)
    ce = reference.cross_entropy(logits, targets, weights, z_loss, one_hot=True)[1]
    np.testing.assert_allclose(ce, _optax_loss(hidden, unembed, targets, weights, 0.0)[1], 1e-5)


def test_tied_embedding_gradient_flows_through_the_transpose():
    """unembed = embed.T and hidden from embed rows, as a tied model has them."""
    _, _, targets, weights = _inputs(2, 7, 16, 37, jnp.float32)
    embed = jax.random.normal(jax.random.key(1), (37, 16))

    def loss(embed, fn):
        return fn(embed[targets] * 0.5, embed.T)[0]

    chunked = jax.grad(loss)(
        embed,
        lambda h, w: api.linear_cross_entropy(
            h, w, targets, weights, z_loss=1e-2, vocab_chunk=8, seq_block=3
        ),
    )
    want = jax.grad(loss)(
        embed, lambda h, w: reference.linear_cross_entropy(h, w, targets, weights, 1e-2)
    )
    np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-6)


def test_no_logits_in_forward_or_backward():
    """XLA's temporary memory of the gradient stays far below one [B, L, V] float32 array."""
    hidden, unembed, targets, weights = _inputs(2, 64, 16, 8192, jnp.float32)
    logits_bytes = 2 * 64 * 8192 * 4

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1)))
        return grad.lower(hidden, unembed).compile().memory_analysis().temp_size_in_bytes

    def chunked(h, w):
        return api.linear_cross_entropy(
            h, w, targets, weights, z_loss=1e-4, vocab_chunk=256, seq_block=16
        )

    plain = temp_bytes(lambda h, w: reference.linear_cross_entropy(h, w, targets, weights, 1e-4))
    assert plain >= logits_bytes  # the measure sees the reference's logits
    assert temp_bytes(chunked) < logits_bytes / 4


def test_a_block_larger_than_the_sequence_is_one_block_and_logged(caplog):
    hidden, unembed, targets, weights = _inputs(1, 5, 8, 11, jnp.float32)
    with caplog.at_level(logging.INFO, logger=api.__name__):
        api.linear_cross_entropy(hidden, unembed, targets, weights, seq_block=16, vocab_chunk=4)
    assert "seq_block=16 > sequence 5: one block" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden": jnp.zeros((2, 5))}, "hidden must be [batch, seq, embed]"),
        ({"unembed": jnp.zeros((9, 11))}, "hidden's embed (8) differs from unembed's (9)"),
        ({"unembed": jnp.zeros((8, 11), jnp.bfloat16)}, "must share a floating dtype"),
        ({"targets": jnp.zeros((1, 4), jnp.int32)}, "targets must be [batch, seq]"),
        ({"targets": jnp.zeros((1, 5))}, "targets must be integer token ids"),
        ({"weights": jnp.zeros((5,))}, "weights must be [batch, seq]"),
        ({"z_loss": -1.0}, "z_loss must be >= 0"),
        ({"vocab_chunk": 0}, "vocab_chunk must be a positive integer"),
        ({"seq_block": 2.5}, "seq_block must be a positive integer"),
        ({"implementation": "pallas"}, "implementation must be one of"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(change, message):
    hidden, unembed, targets, weights = _inputs(1, 5, 8, 11, jnp.float32)
    args = {"hidden": hidden, "unembed": unembed, "targets": targets, "weights": weights}
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        api.linear_cross_entropy(**args)
    assert "\n" not in str(e.value)
