"""Packs tokenized documents into fixed-length rows for next-token prediction.

Each document becomes `[bos] + ids + [eos]` and contributes the pairs
(inputs, targets) = (doc[:-1], doc[1:]). The pairs of all documents form one stream,
in order, cut into rows of `seq_len`: rows are filled greedily, a document that does not
fit continues at the start of the next row, and only the last row is padded.
"""

from collections.abc import Sequence

import numpy as np

PACKED_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def pack_documents(
    documents: Sequence[Sequence[int]], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Returns int32 inputs, targets, segment_ids, positions and float32 weights, [rows, seq_len].

    segment_ids number the document pieces of a row 1, 2, ... (0 = padding); positions
    count from 0 within each piece; weights are 1 for real targets, 0 for padding.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not documents:
        raise ValueError("No documents to pack.")
    lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)  # pairs per document
    tokens = np.concatenate(
        [np.asarray(d, dtype=np.int32) for d in documents] + [np.zeros(0, np.int32)]
    )  # [sum(len(d))]
    total = int(lengths.sum())
    num_rows = -(-total // seq_len)
    starts = np.cumsum(lengths) - lengths  # stream index of each document's first pair

    is_first = np.zeros(total, dtype=bool)
    is_first[starts] = True
    is_last = np.roll(is_first, -1)  # the pair before the next document's first; last pair too
    inputs = np.full(total, bos_id, dtype=np.int32)  # [total]
    inputs[~is_first] = tokens
    targets = np.full(total, eos_id, dtype=np.int32)  # [total]
    targets[~is_last] = tokens

    # A segment starts at each document start and at each row start.
    index = np.arange(total)
    seg_start = is_first | (index % seq_len == 0)
    start_index = np.maximum.accumulate(np.where(seg_start, index, 0))
    positions = index - start_index
    seg_count = np.cumsum(seg_start)
    row_first = seg_count[(index // seq_len) * seq_len]  # count at the row's first pair
    segment_ids = seg_count - row_first + 1

    def rows(values: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full(num_rows * seq_len, fill, dtype=dtype)
        out[:total] = values
        return out.reshape(num_rows, seq_len)

    return {
        "inputs": rows(inputs, pad_id, np.int32),
        "targets": rows(targets, pad_id, np.int32),
        "segment_ids": rows(segment_ids, 0, np.int32),
        "positions": rows(positions, 0, np.int32),
        "weights": rows(np.ones(total), 0.0, np.float32),
    }
