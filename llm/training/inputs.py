"""What a run reads: the tokenizer and the packed train and eval splits (data.pipeline)."""

from __future__ import annotations

import dataclasses

from data.hf_tokenizer import load_tokenizer
from llm.errors import check


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """config.data."""

    dataset: str = "text_corpus"  # any tfds name with a text feature, e.g. "lm1b", "c4/en"
    text_key: str = "text"
    text_dir: str = ""  # a local directory of .txt files to read instead (text_corpus builder)
    data_dir: str = ""  # "" = data.pipeline.default_data_dir()
    tokenizer: str = ""  # "" = the shipped sentencepiece model
    train_split: str = "train"
    eval_split: str = "validation"


def check_vocab(vocab_size: int, tokenizer_vocab_size: int) -> None:
    """The model's vocabulary holds the tokenizer's."""
    check(
        vocab_size >= tokenizer_vocab_size,
        f"config.model.vocab_size={vocab_size} is smaller than the tokenizer's "
        f"vocabulary ({tokenizer_vocab_size}): set --config.model.vocab_size={tokenizer_vocab_size} "
        "or larger (a larger, padded vocabulary is fine).",
    )


def load_data(data: DataConfig, *, vocab_size: int, seq_len: int, batch_size: int, seed: int):
    """Tokenizer and the packed train and eval splits; too little data is a DataError now."""
    # Imported here: data.pipeline imports tensorflow_datasets, which only reading data needs
    # (llm.accelerator_report builds experiments where it is not installed).
    from data import pipeline, text_corpus

    tokenizer = load_tokenizer(data.tokenizer)
    check_vocab(vocab_size, tokenizer.vocab_size)
    builder_kwargs = None
    if data.text_dir:
        builder_kwargs = {"config": text_corpus.config_for_directory(data.text_dir)}
    kwargs = {
        "name": data.dataset,
        "builder_kwargs": builder_kwargs,
        "seq_len": seq_len,
        "tokenizer": tokenizer,
        "data_dir": data.data_dir or pipeline.default_data_dir(),
        "seed": seed,
        "text_key": data.text_key,
    }
    train = pipeline.load_dataset(split=data.train_split, **kwargs)
    evaluation = pipeline.load_dataset(split=data.eval_split, **kwargs)
    for dataset in (train, evaluation):  # too little data is a DataError now, not mid-training
        dataset.batch(0, batch_size)
    return tokenizer, train, evaluation
