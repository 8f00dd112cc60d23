"""Shared correctness tests for every `kernels.attention` implementation.

A backend's test module subclasses `AttentionTestBase` (the name does not
start with "Test", so pytest collects it only through subclasses):

    class TestPallasGpu(AttentionTestBase):
      IMPLEMENTATION = "pallas_gpu"
      BLOCK_SIZES = BlockSizes.uniform(32, 32)   # optional

Each test runs over `CPU_SPECS`; override `skip_reason(spec)` to skip
(with a stated reason) specs a backend legitimately does not support.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.reference import attention_reference
from kernels.attention.specs import CPU_SPECS, AttentionSpec

# (atol, rtol) against the float32 reference on the same inputs.
OUT_TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}
GRAD_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 5e-2)}


class AttentionTestBase:
    """Values and gradients of `kernels.attention` vs the dense-mask reference."""

    IMPLEMENTATION: str
    BLOCK_SIZES: BlockSizes | None = None

    def skip_reason(self, spec: AttentionSpec) -> str | None:
        del spec
        return None

    def _attention(self, spec: AttentionSpec, q, k, v, segment_ids):
        return kernels.attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            implementation=self.IMPLEMENTATION,
            block_sizes=self.BLOCK_SIZES,
            **spec.kwargs(),
        )

    def _reference(self, spec: AttentionSpec, q, k, v, segment_ids):
        return attention_reference(q, k, v, mask=spec.dense_mask(), segment_ids=segment_ids)

    @pytest.mark.parametrize("spec", CPU_SPECS, ids=lambda s: s.name)
    def test_values_and_grads(self, spec: AttentionSpec):
        """Also: rows that see no key give zeros and zero dq; all gradients finite."""
        if (reason := self.skip_reason(spec)) is not None:
            pytest.skip(reason)
        q, k, v, segment_ids = spec.inputs()
        cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

        def value_and_grads(fn):
            def loss(q, k, v):
                out = fn(spec, q, k, v, segment_ids)
                return jnp.sum(out.astype(jnp.float32) * cotangent), out

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

        (_, out), grads = value_and_grads(self._attention)
        (_, ref_out), ref_grads = value_and_grads(self._reference)

        assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
        atol, rtol = OUT_TOL[spec.dtype]
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(ref_out, np.float32),
            atol=atol,
            rtol=rtol,
            err_msg="out",
        )
        atol, rtol = GRAD_TOL[spec.dtype]
        for name, g, ref_g in zip("qkv", grads, ref_grads):
            assert g.dtype == ref_g.dtype, name
            assert np.isfinite(np.asarray(g, np.float32)).all(), f"d{name} not finite"
            np.testing.assert_allclose(
                np.asarray(g, np.float32),
                np.asarray(ref_g, np.float32),
                atol=atol,
                rtol=rtol,
                err_msg=f"d{name}",
            )

        visible = np.ones((spec.batch, spec.q_seq, spec.kv_seq), bool)
        if (dense := spec.dense_mask()) is not None:
            visible &= dense[None]
        if segment_ids is not None:
            ids = np.asarray(segment_ids)
            visible &= ids[:, :, None] == ids[:, None, :]
        empty = ~visible.any(axis=-1)  # [batch, q_seq]
        np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0], np.float32)[empty], 0.0)
