"""The text_corpus tfds builder on a temp directory and on the shipped corpus."""

import pathlib

import pytest
import tensorflow_datasets as tfds

from data import text_corpus


def _load(config, split, data_dir):
    ds = tfds.load(
        "text_corpus",
        split=split,
        data_dir=str(data_dir),
        builder_kwargs={"config": config} if config else None,
    )
    return {ex["path"].decode(): ex["text"].decode() for ex in tfds.as_numpy(ds)}


def test_temp_directory_splits(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {
        f"sub/doc{i}.txt" if i % 2 else f"doc{i}.txt": f"Document {i}: héllo\n" * (i + 1)
        for i in range(30)
    }
    for rel, text in texts.items():
        (corpus / rel).write_text(text, encoding="utf-8")
    (corpus / "notes.md").write_text("not matched by the pattern")
    config = text_corpus.config_for_directory(corpus)
    splits = {s: _load(config, s, tmp_path / "tfds") for s in ("train", "validation")}
    assert splits["train"] and splits["validation"]
    assert not splits["train"].keys() & splits["validation"].keys()
    assert {**splits["train"], **splits["validation"]} == texts
    # Deterministic: a second, independent build of the same files gives the same split.
    assert _load(config, "validation", tmp_path / "tfds2") == splits["validation"]


def test_configs_do_not_collide(tmp_path):
    a = text_corpus.config_for_directory(tmp_path / "a")
    b = text_corpus.config_for_directory(tmp_path / "b")
    assert a.name != b.name
    assert a.name == text_corpus.config_for_directory(tmp_path / "a").name


def test_split_files_nonempty():
    assert text_corpus.split_files(["a", "b"]) in (
        {"validation": ["a"], "train": ["b"]},
        {"validation": ["b"], "train": ["a"]},
    )
    splits = text_corpus.split_files([f"f{i}" for i in range(200)])
    assert len(splits["validation"]) == 10 and len(splits["train"]) == 190


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_missing_or_empty_corpus(tmp_path, make):
    config = text_corpus.config_for_directory(make(tmp_path))
    with pytest.raises(text_corpus.CorpusNotFoundError, match=str(make(tmp_path))):
        tfds.builder(
            "text_corpus", config=config, data_dir=str(tmp_path / "tfds")
        ).download_and_prepare()


def test_shipped_corpus_loads(shipped_tfds_dir):
    validation = _load(None, "validation", shipped_tfds_dir)
    assert len(validation) >= 5
    assert all(text.strip() for text in validation.values())
    builder = tfds.builder("text_corpus", data_dir=str(shipped_tfds_dir))
    files = list(pathlib.Path(text_corpus.SHIPPED_CORPUS).glob("**/*.txt"))
    assert builder.info.splits.total_num_examples == len(files)


def test_a_corpus_that_is_not_text_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("plain text\n" * 50)
    (corpus / "random.txt").write_bytes(bytes(range(128, 256)) * 40)  # not UTF-8
    config = text_corpus.config_for_directory(corpus)
    with pytest.raises(text_corpus.CorpusNotTextError, match=r"not UTF-8 text \(worst: .*random"):
        tfds.builder(
            "text_corpus", config=config, data_dir=str(tmp_path / "tfds")
        ).download_and_prepare()
