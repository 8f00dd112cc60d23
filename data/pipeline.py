"""Input pipeline: a tfds split, tokenized and packed once into memory, batched by step.

    ds = load_dataset(name="text_corpus", split="train", seq_len=256,
                      tokenizer=Tokenizer(), data_dir=default_data_dir(), seed=0)
    batch = ds.batch(step, batch_size=32)  # a pure function of (seed, step)

Any tfds dataset with a text feature works the same way (e.g. name="lm1b", or
name="c4/en" with max_documents); `text_key` names the feature.
"""

import dataclasses
import hashlib
import logging
import os
import pathlib
import tempfile
import time
import zipfile
from typing import Any

import numpy as np

import data.text_corpus  # noqa: F401  (registers `text_corpus`; quiets TF logs before import)
from data.packing import PACKED_KEYS, pack_documents
from data.tokenizer import Tokenizer

import tensorflow_datasets as tfds  # isort: skip  (after data.text_corpus)

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot serve the request (too few rows, a missing text feature, ...)."""


def default_data_dir() -> str:
    """$LLM_LAB_DATA_DIR if set, else ~/.cache/llm-lab/tfds."""
    return os.path.expanduser(os.environ.get("LLM_LAB_DATA_DIR", "~/.cache/llm-lab/tfds"))


@dataclasses.dataclass(frozen=True)
class PackedDataset:
    """All packed rows of one split, in memory; a batch is a pure function of (seed, step).

    Rows are visited epoch by epoch, epoch e in the order of a permutation drawn from
    np.random.default_rng([seed, e]); a batch may straddle two epochs.
    """

    arrays: dict[str, np.ndarray]  # PACKED_KEYS (or data.sft's keys) -> [num_rows, seq_len]
    seed: int

    @property
    def num_rows(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def seq_len(self) -> int:
        return next(iter(self.arrays.values())).shape[1]

    def batch(
        self, step: int, batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`.

        Returns each key -> [batch_size // process_count, seq_len]; process p gets rows
        [p * B / P, (p + 1) * B / P) of the global batch.
        """
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by process_count {process_count}."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
        if batch_size > self.num_rows:
            raise DataError(
                f"The split has {self.num_rows} packed rows of length {self.seq_len}, fewer than "
                f"one batch of {batch_size}: use a smaller batch_size or seq_len, or more data."
            )
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}.")
        local = batch_size // process_count
        index = step * batch_size + process_index * local + np.arange(local)  # [local] global
        epochs, offsets = np.divmod(index, self.num_rows)
        rows = np.empty(local, dtype=np.int64)
        for epoch in np.unique(epochs):  # one or two epochs
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
            rows[epochs == epoch] = order[offsets[epochs == epoch]]
        return {key: array[rows] for key, array in self.arrays.items()}


def _pack_split(
    builder: tfds.core.DatasetBuilder,
    split: str,
    text_key: str,
    tokenizer: Tokenizer,
    seq_len: int,
    max_documents: int | None,
) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split, shuffle_files=False).map(lambda ex: ex[text_key])
    if max_documents is not None:
        ds = ds.take(max_documents)
    texts = [text.decode("utf-8") for text in tfds.as_numpy(ds)]
    loaded = time.perf_counter()
    arrays = pack_documents(
        tokenizer.encode_batch(texts),
        seq_len,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    _log.info(
        "%s %s: %d documents, %d tokens, %d rows; load %.1f s, tokenize+pack %.1f s",
        builder.info.full_name,
        split,
        len(texts),
        int(arrays["weights"].sum()),
        len(arrays["inputs"]),
        loaded - start,
        time.perf_counter() - loaded,
    )
    return arrays


def _save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.savez(f, **arrays)
    umask = os.umask(0)  # a cache others may share: the umask's permissions, not 0600
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)
    os.replace(f.name, path)


def load_dataset(
    *,
    name: str,
    split: str,
    seq_len: int,
    tokenizer: Tokenizer,
    data_dir: str,
    seed: int,
    text_key: str = "text",
    max_documents: int | None = None,
    builder_kwargs: dict[str, Any] | None = None,
) -> PackedDataset:
    """Loads tfds `name` (prepared under data_dir), tokenized and packed; cached as .npz.

    builder_kwargs go to tfds.builder, e.g. {"config": config_for_directory(path)} to read
    another directory with the text_corpus builder.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"no tfds dataset named {name!r}: use 'text_corpus' (the shipped corpus, or any "
            "directory of text files) or a tfds catalog name such as 'lm1b'."
        ) from e
    if text_key not in builder.info.features:
        raise DataError(
            f"{builder.info.full_name} has no feature {text_key!r}; pass text_key="
            f"one of {list(builder.info.features)}."
        )
    key = "|".join(
        map(
            str,
            (
                builder.info.full_name,
                split,
                text_key,
                tokenizer.fingerprint,
                seq_len,
                max_documents,
            ),
        )
    )
    stem = "".join(c if c.isalnum() else "_" for c in f"{builder.info.full_name}_{split}")
    cache = (
        pathlib.Path(data_dir)
        / "packed"
        / (f"{stem}_L{seq_len}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    )
    arrays = None
    if cache.exists():
        try:
            with np.load(cache) as npz:
                arrays = {k: npz[k] for k in PACKED_KEYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a cut-short cache
            _log.warning("packed cache %s is unreadable (%s); packing again.", cache, e)
    if arrays is None:
        arrays = _pack_split(builder, split, text_key, tokenizer, seq_len, max_documents)
        _save_atomic(cache, arrays)
    return PackedDataset(arrays, seed)
