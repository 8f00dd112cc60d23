"""Shared fixtures for the data tests."""

import pytest
import tensorflow_datasets as tfds

from data import text_corpus  # noqa: F401  (registers the builder)


@pytest.fixture(scope="session")
def shipped_tfds_dir(tmp_path_factory):
    """A tfds data_dir with the shipped corpus prepared once per session."""
    data_dir = tmp_path_factory.mktemp("tfds_shipped")
    tfds.builder("text_corpus", data_dir=str(data_dir)).download_and_prepare()
    return data_dir
