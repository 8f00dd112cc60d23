"""Shared fixtures for the llm tests: a tiny real-text corpus and a tiny training config."""

import pathlib

import pytest

from data import text_corpus
from experiments import default


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> pathlib.Path:
    """Twenty excerpts of the shipped corpus, 6 KB each: real text, quick to tokenize."""
    directory = tmp_path_factory.mktemp("tiny_corpus")
    for path in text_corpus.list_files(text_corpus.SHIPPED_CORPUS, "**/*.rst.txt")[:20]:
        (directory / f"{path.stem}.txt").write_text(path.read_text()[:6000])
    return directory


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture
def tiny_config(text_dir, data_dir):
    """The default experiment shrunk to a 2-layer, 64-wide model on the tiny corpus."""
    config = default.get_config()
    config.unlock()
    config.steps = 6
    config.batch_size = 8  # one sequence per CPU device of the test mesh
    config.seq_len = 32
    config.log_every = 1
    config.eval_every = 3
    config.eval_batches = 1
    config.checkpoint_every = 3
    config.sample_prompt = ""
    config.optimizer.warmup_steps = 2
    config.data.text_dir = str(text_dir)
    config.data.data_dir = str(data_dir)
    config.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
    config.lock()
    return config
