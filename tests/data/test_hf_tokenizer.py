"""data.hf_tokenizer: a Hugging Face tokenizer directory behind our tokenizer interface, equal to
transformers' AutoTokenizer; `load_tokenizer` picks the kind from the path."""

import json

import pytest
import transformers

from data import text_corpus
from data.hf_tokenizer import HFTokenizer, load_tokenizer
from data.tokenizer import SHIPPED_MODEL, Tokenizer, TokenizerLoadError, TokenizerNotFoundError

TEXTS = [
    "The list type is a mutable sequence.",
    "  def f(x):\n\treturn x ** 2  # two spaces, a tab\n",
    "Unicode: héllo wörld, 日本語, emoji 🐍.",
    "",
]


def test_encodes_as_transformers_does_and_round_trips(hf_tokenizer_dir):
    ours = HFTokenizer(hf_tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    corpus = text_corpus.list_files(text_corpus.SHIPPED_CORPUS, "**/*.rst.txt")[40].read_text()
    for text in [*TEXTS, corpus[:3000]]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert (ours.pad_id, ours.bos_id, ours.eos_id) == (
        theirs.pad_token_id,
        theirs.bos_token_id,
        theirs.eos_token_id,
    )
    assert ours.vocab_size == len(theirs) == 500


def test_without_bos_or_pad_documents_use_eos(hf_tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_tokenizer_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("bos_token"), config.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = HFTokenizer(tmp_path)
    assert tokenizer.bos_id == tokenizer.pad_id == tokenizer.eos_id
    config.pop("eos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerLoadError, match="names no eos_token"):
        HFTokenizer(tmp_path)


def test_bad_directories_are_one_line(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json not found"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="is not a valid tokenizer.json"):
        HFTokenizer(tmp_path)


def test_load_tokenizer_picks_the_kind(hf_tokenizer_dir):
    assert isinstance(load_tokenizer(""), Tokenizer)
    assert isinstance(load_tokenizer(str(SHIPPED_MODEL)), Tokenizer)
    assert isinstance(load_tokenizer(str(hf_tokenizer_dir)), HFTokenizer)
