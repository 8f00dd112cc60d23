"""PackedDataset batching and load_dataset caching."""

import os

import numpy as np
import pytest

from data.packing import PACKED_KEYS
from data.pipeline import PackedDataset, default_data_dir, load_dataset
from data.text_corpus import config_for_directory
from data.tokenizer import Tokenizer

NUM_ROWS, SEQ_LEN = 10, 4


def _dataset(seed: int = 0) -> PackedDataset:
    # Row r holds the value r everywhere, so a batch's rows are readable from inputs[:, 0].
    rows = np.repeat(np.arange(NUM_ROWS, dtype=np.int32)[:, None], SEQ_LEN, axis=1)
    arrays = {k: rows.astype(np.float32 if k == "weights" else np.int32) for k in PACKED_KEYS}
    return PackedDataset(arrays, seed)


def _rows(ds, step, batch_size, **kw):
    return ds.batch(step, batch_size, **kw)["inputs"][:, 0].tolist()


def test_batch_shapes_and_determinism():
    ds = _dataset()
    batch = ds.batch(3, 4)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, SEQ_LEN), np.float32 if k == "weights" else np.int32) for k in PACKED_KEYS
    }
    assert _rows(ds, 3, 4) == _rows(_dataset(), 3, 4)
    assert _rows(ds, 3, 4) != _rows(ds, 4, 4)
    assert _rows(ds, 3, 4) != _rows(_dataset(seed=1), 3, 4)


def test_each_row_once_per_epoch_across_boundaries():
    ds, batch_size = _dataset(), 4  # 10 rows: batches straddle epochs
    stream = [row for step in range(10) for row in _rows(ds, step, batch_size)]  # 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * NUM_ROWS : (epoch + 1) * NUM_ROWS]) == list(range(NUM_ROWS))
    assert stream[:NUM_ROWS] != stream[NUM_ROWS : 2 * NUM_ROWS], "epochs are reshuffled"


def test_process_slices_partition_the_global_batch():
    ds = _dataset()
    for step in range(5):
        full = _rows(ds, step, 8)
        parts = [_rows(ds, step, 8, process_index=p, process_count=4) for p in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert [row for part in parts for row in part] == full


def test_batch_errors():
    ds = _dataset()
    with pytest.raises(ValueError, match="not divisible"):
        ds.batch(0, 6, process_count=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ds.batch(0, NUM_ROWS + 1)


def test_default_data_dir(monkeypatch):
    monkeypatch.delenv("LLM_LAB_DATA_DIR", raising=False)
    assert default_data_dir() == os.path.expanduser("~/.cache/llm-lab/tfds")
    monkeypatch.setenv("LLM_LAB_DATA_DIR", "/some/dir")
    assert default_data_dir() == "/some/dir"


def test_load_shipped_and_cache(shipped_tfds_dir, monkeypatch):
    tokenizer = Tokenizer()
    kwargs = {
        "name": "text_corpus",
        "split": "validation",
        "seq_len": 128,
        "tokenizer": tokenizer,
        "data_dir": str(shipped_tfds_dir),
        "seed": 0,
        "max_documents": 3,
    }
    ds = load_dataset(**kwargs)
    assert ds.seq_len == 128 and ds.num_rows > 8
    batch = ds.batch(0, 8)
    np.testing.assert_array_equal(
        batch["inputs"][:, 1:],
        np.where(
            batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1],
            batch["targets"][:, :-1],
            batch["inputs"][:, 1:],
        ),
    )
    assert "``" in tokenizer.decode(ds.arrays["inputs"].ravel()[:5000].tolist())
    assert len(list((shipped_tfds_dir / "packed").glob("*.npz"))) == 1
    monkeypatch.setattr("data.pipeline._pack_split", None)  # a second load must hit the cache
    cached = load_dataset(**kwargs)
    for key in PACKED_KEYS:
        np.testing.assert_array_equal(cached.arrays[key], ds.arrays[key])


def test_load_other_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"file number {i} " * 50)
    ds = load_dataset(
        name="text_corpus",
        split="train",
        seq_len=16,
        tokenizer=Tokenizer(),
        data_dir=str(tmp_path / "tfds"),
        seed=0,
        builder_kwargs={"config": config_for_directory(corpus)},
    )
    assert ds.num_rows > 4 and ds.batch(0, 4)["weights"].sum() == 64


def test_unknown_text_key(shipped_tfds_dir):
    with pytest.raises(ValueError, match="no feature 'body'"):
        load_dataset(
            name="text_corpus",
            split="validation",
            seq_len=16,
            tokenizer=Tokenizer(),
            data_dir=str(shipped_tfds_dir),
            seed=0,
            text_key="body",
        )
