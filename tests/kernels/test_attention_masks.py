"""Mask descriptions: dense ground truth, kernel predicates and MaskInfo."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import masks as m
from kernels.attention.mask_info import EMPTY, FULL, PARTIAL, mask_info


def _brute(q_seq, kv_seq, fn):
    """Hand-built mask: fn(absolute q position, k position) -> bool, per element."""
    off = kv_seq - q_seq
    return np.array([[fn(i + off, j) for j in range(kv_seq)] for i in range(q_seq)], bool)


LAYOUT = ((True, False, True), (False, False, False), (False, True, True))
CASES = [
    (m.CausalMask(), lambda p, k: k <= p),
    (m.SlidingWindowMask(3), lambda p, k: p - 3 < k <= p),
    (m.SlidingWindowMask(2, 1), lambda p, k: p - 2 < k <= p + 1),
    (m.LocalGlobalMask(2, 2), lambda p, k: abs(p - k) < 2 or k < 2 or p < 2),
    (m.StridedMask(3), lambda p, k: (p - k) % 3 == 0),
    (m.StridedMask(2, block=3), lambda p, k: (p // 3 - k // 3) % 2 == 0),
    (m.BlockSparseMask(LAYOUT, 4, 4), lambda p, k: LAYOUT[p // 4][k // 4]),
    (m.ChunkedMask(5), lambda p, k: p // 5 == k // 5),
    (m.ChunkedMask(4) & m.CausalMask(), lambda p, k: k <= p and p // 4 == k // 4),
    (m.CausalMask() | m.StridedMask(4), lambda p, k: k <= p or (p - k) % 4 == 0),
    (
        m.LocalGlobalMask(3, 1) & m.CausalMask(),
        lambda p, k: k <= p and (abs(p - k) < 3 or k < 1 or p < 1),
    ),
    (
        m.BlockSparseMask(LAYOUT, 4, 4) & m.CausalMask(),
        lambda p, k: LAYOUT[p // 4][k // 4] and k <= p,
    ),
]
SHAPES = [(12, 12), (5, 12), (1, 12), (9, 10)]


def _case_id(value) -> str:
    """A test id that is the same in every process (pytest-xdist): a mask's repr, a function's
    name (a lambda's repr holds its address)."""
    return value.__name__ if callable(value) and not hasattr(value, "dense") else repr(value)[:60]


@pytest.mark.parametrize("mask,fn", CASES, ids=_case_id)
@pytest.mark.parametrize("q_seq,kv_seq", SHAPES)
def test_dense_matches_hand_built(mask, fn, q_seq, kv_seq):
    np.testing.assert_array_equal(mask.dense(q_seq, kv_seq), _brute(q_seq, kv_seq, fn))


def test_decode_alignment_last_query_sees_last_key():
    dense = m.CausalMask().dense(3, 8)
    np.testing.assert_array_equal(dense.sum(axis=1), [6, 7, 8])
    dense = m.SlidingWindowMask(4).dense(1, 8)
    np.testing.assert_array_equal(dense[0], [0, 0, 0, 0, 1, 1, 1, 1])
    assert not m.CausalMask().dense(6, 4)[:2].any()  # q_seq > kv_seq: first rows see nothing.


@pytest.mark.parametrize("mask,fn", [c for c in CASES if not c[0].has_block_sparse], ids=_case_id)
@pytest.mark.parametrize("q_seq,kv_seq", SHAPES)
def test_predicate_on_jnp_grid_equals_dense(mask, fn, q_seq, kv_seq):
    del fn
    q_pos = jnp.arange(q_seq, dtype=jnp.int32)[:, None] + (kv_seq - q_seq)
    k_pos = jnp.arange(kv_seq, dtype=jnp.int32)[None, :]
    got = np.broadcast_to(np.asarray(mask.predicate(q_pos, k_pos)), (q_seq, kv_seq))
    np.testing.assert_array_equal(got, mask.dense(q_seq, kv_seq))


def test_block_sparse_predicate_exact_in_visited_aligned_blocks():
    mask = m.BlockSparseMask(LAYOUT, 4, 4) & m.CausalMask()
    dense = mask.dense(12, 12)
    info = mask_info(mask, 12, 12, 2, 2)
    q_pos, k_pos = m.positions(12, 12)
    pred = np.asarray(mask.predicate(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    for i, j in zip(*np.nonzero(info.block_kind != EMPTY)):
        sl = np.s_[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        np.testing.assert_array_equal(pred[sl], dense[sl])


def test_kernel_block_error():
    sparse = m.BlockSparseMask(LAYOUT, 4, 4)
    assert sparse.kernel_block_error(2, 4) is None
    assert "multiples" in sparse.kernel_block_error(8, 4)
    assert "union" in (sparse | m.CausalMask()).kernel_block_error(2, 2)
    assert (sparse | sparse).kernel_block_error(2, 2) is None
    with pytest.raises(ValueError, match="mask"):
        mask_info(sparse, 12, 12, 8, 8)


MASKS_FOR_INFO = [None] + [c[0] for c in CASES]


@pytest.mark.parametrize("mask", MASKS_FOR_INFO, ids=_case_id)
@pytest.mark.parametrize(
    "q_seq,kv_seq,bq,bk",
    [(12, 12, 4, 4), (12, 12, 2, 4), (5, 12, 2, 4), (9, 10, 4, 3), (12, 12, 4, 2)],
)
def test_mask_info_agrees_with_dense(mask, q_seq, kv_seq, bq, bk):
    if mask is not None and mask.kernel_block_error(bq, bk):  # misaligned: refused, not skipped
        with pytest.raises(ValueError):
            mask_info(mask, q_seq, kv_seq, bq, bk)
        return
    dense = np.ones((q_seq, kv_seq), bool) if mask is None else mask.dense(q_seq, kv_seq)
    info = mask_info(mask, q_seq, kv_seq, bq, bk)
    nq, nk = -(-q_seq // bq), -(-kv_seq // bk)
    assert info.block_kind.shape == (nq, nk) and info.q_offset == kv_seq - q_seq
    for i, j in itertools.product(range(nq), range(nk)):
        block = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        inside = (i + 1) * bq <= q_seq and (j + 1) * bk <= kv_seq
        want = EMPTY if not block.any() else FULL if block.all() and inside else PARTIAL
        assert info.block_kind[i, j] == want, (i, j)
    for kinds, idx, vkinds, count in (
        (info.block_kind, info.kv_block_indices, info.kv_block_kinds, info.num_kv_visits),
        (info.block_kind.T, info.q_block_indices, info.q_block_kinds, info.num_q_visits),
    ):
        for r, row in enumerate(kinds):
            cols = np.flatnonzero(row != EMPTY)
            assert count[r] == len(cols)
            np.testing.assert_array_equal(idx[r, : len(cols)], cols)
            np.testing.assert_array_equal(vkinds[r, : len(cols)], row[cols])
            assert (vkinds[r, len(cols) :] == EMPTY).all()
            assert (idx[r, len(cols) :] == (cols[-1] if len(cols) else 0)).all()


def test_mask_info_is_cached():
    assert mask_info(m.CausalMask(), 64, 64, 16, 16) is mask_info(m.CausalMask(), 64, 64, 16, 16)


def test_masks_hashable_and_combinators_flatten():
    a, b, c = m.CausalMask(), m.SlidingWindowMask(4), m.StridedMask(2)
    assert hash(a | b) == hash(m.CausalMask() | m.SlidingWindowMask(4))
    assert ((a | b) | c).masks == (a, b, c)
    assert ((a & b) & c).masks == (a, b, c)
    assert m.BlockSparseMask.from_array(np.array(LAYOUT), 4, 4) == m.BlockSparseMask(LAYOUT, 4, 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: m.SlidingWindowMask(0),
        lambda: m.SlidingWindowMask(2, -1),
        lambda: m.StridedMask(0),
        lambda: m.ChunkedMask(0),
        lambda: m.LocalGlobalMask(0, 1),
        lambda: m.BlockSparseMask(((True,),), 0, 4),
        lambda: m.CausalMask() | "causal",
    ],
)
def test_bad_mask_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_block_sparse_layout_must_fit_lengths():
    with pytest.raises(ValueError, match="layout"):
        m.BlockSparseMask(LAYOUT, 4, 4).dense(12, 16)
    with pytest.raises(ValueError, match="q_seq"):
        m.BlockSparseMask(LAYOUT, 4, 4).dense(16, 12)
