"""Invariants of pack_documents."""

import sys

import numpy as np
import pytest

from data.packing import pack_documents

BOS, EOS = 1, 2


def _documents(seed: int, num: int, max_len: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, rng.integers(0, max_len)).tolist() for _ in range(num)]


def test_small_example():
    out = pack_documents([[5, 6, 7], [], [8, 9, 10, 11, 12]], 4, bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(out["inputs"], [[1, 5, 6, 7], [1, 1, 8, 9], [10, 11, 12, 0]])
    np.testing.assert_array_equal(out["targets"], [[5, 6, 7, 2], [2, 8, 9, 10], [11, 12, 2, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 0]])
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_invariants(seq_len):
    docs = _documents(0, 40, 150)
    out = pack_documents(docs, seq_len, bos_id=BOS, eos_id=EOS)
    assert {k: v.dtype for k, v in out.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "weights": np.float32,
    }
    assert all(v.shape == out["inputs"].shape and v.shape[1] == seq_len for v in out.values())
    real = out["weights"] > 0
    assert np.all(real == (out["segment_ids"] > 0))
    assert np.all(out["inputs"][~real] == 0) and np.all(out["targets"][~real] == 0)
    assert np.all(real[:-1]), "only the last row may be padded"
    # Read every segment back: a contiguous run of one segment id in one row.
    pieces = []
    for r in range(out["inputs"].shape[0]):
        seg = out["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "segments are contiguous"
            np.testing.assert_array_equal(out["positions"][r, idx], np.arange(len(idx)))
            inputs, targets = out["inputs"][r, idx], out["targets"][r, idx]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # next-token targets
            pieces.append((inputs, targets))
    # Gluing pieces back together gives each [bos] + doc + [eos], once, in order.
    stream_in = np.concatenate([p[0] for p in pieces])
    stream_tgt = np.concatenate([p[1] for p in pieces])
    expected = [np.array([BOS] + d + [EOS]) for d in docs]
    np.testing.assert_array_equal(stream_in, np.concatenate([e[:-1] for e in expected]))
    np.testing.assert_array_equal(stream_tgt, np.concatenate([e[1:] for e in expected]))
    # Every document token (and each eos) is a weighted target exactly once.
    assert out["weights"].sum() == sum(len(d) + 1 for d in docs)


def test_no_target_crosses_documents():
    docs = [[10] * 5, [20] * 5, [30] * 5]
    out = pack_documents(docs, 8, bos_id=BOS, eos_id=EOS)
    for inputs, targets, seg in zip(out["inputs"], out["targets"], out["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            values = set(inputs[seg == s]) | set(targets[seg == s])
            assert len(values - {BOS, EOS}) == 1, "one document per segment"


def test_large_input_runs_per_document_not_per_token():
    """~400k tokens in 400 documents pack in O(documents) lines of Python (numpy does the
    per-token work): a count of executed lines, which a loop over tokens would exceed, instead of
    a wall-clock limit that a loaded machine can miss."""
    docs = [
        np.arange(n, dtype=np.int32) % 4000 + 3
        for n in np.random.default_rng(1).integers(0, 2000, 400)
    ]
    limit, lines = 10 * len(docs), 0

    def count_lines(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        if lines > limit:  # stop a per-token loop early
            raise AssertionError(f"more than {limit} lines of Python for {len(docs)} documents")
        return count_lines

    sys.settrace(count_lines)
    try:
        out = pack_documents(docs, 1024, bos_id=BOS, eos_id=EOS)
    finally:
        sys.settrace(None)
    assert out["weights"].sum() == sum(len(d) + 1 for d in docs) > 100 * limit


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pack_documents([], 8, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError):
        pack_documents([[3]], 0, bos_id=BOS, eos_id=EOS)
