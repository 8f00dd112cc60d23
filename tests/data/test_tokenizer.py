"""The shipped SentencePiece tokenizer and its error messages."""

import pytest

from data.tokenizer import REBUILD_HINT, Tokenizer, TokenizerLoadError, TokenizerNotFoundError


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_shipped_model(tokenizer):
    assert tokenizer.vocab_size == 4096
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, trailing\ttabs\t\n\nand blank lines\n",
        ".. function:: open(file, mode='r')\n\n   >>> print(1 + 2)\n   3\n",
        "Unicode: héllo wörld, ñ, 日本語, emoji 🐍, math ∑ x² ≤ ∞",
        "",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_no_unknown_ids(tokenizer):
    assert 3 not in tokenizer.encode("rare characters: \u2603 \U0001f600 \u0f12")


def test_missing_model(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="missing.model") as err:
        Tokenizer(tmp_path / "missing.model")
    assert REBUILD_HINT in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_corrupt_model(tmp_path):
    path = tmp_path / "corrupt.model"
    path.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerLoadError, match="corrupt.model") as err:
        Tokenizer(path)
    assert REBUILD_HINT in str(err.value)
    assert isinstance(err.value, ValueError)
