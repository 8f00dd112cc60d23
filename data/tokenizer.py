"""SentencePiece tokenizer: a thin wrapper, and the command that trains the shipped model.

Special ids: pad=0, bos=1, eos=2, unk=3. Byte fallback is on, so any UTF-8 text encodes
without unk, and normalization is off, so decode(encode(text)) == text.

Train (about a minute on 2 cores):
    python -m data.tokenizer --vocab_size=4096 --output=data/tokenizer/pydoc_4k
"""

import hashlib
import os
import pathlib
import time

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SHIPPED_MODEL = pathlib.Path(__file__).resolve().parent / "tokenizer" / "pydoc_4k.model"
REBUILD_HINT = "python -m data.tokenizer --vocab_size=4096 --output=data/tokenizer/pydoc_4k"


class TokenizerNotFoundError(FileNotFoundError):
    """The tokenizer model file does not exist."""


class TokenizerLoadError(ValueError):
    """The tokenizer model file exists but is not a valid SentencePiece model."""


class Tokenizer:
    """SentencePiece model with fixed special ids (pad=0, bos=1, eos=2)."""

    def __init__(self, path: str | os.PathLike = SHIPPED_MODEL):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise TokenizerNotFoundError(
                f"Tokenizer model {self.path} not found. Rebuild it with: {REBUILD_HINT}"
            )
        proto = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise TokenizerLoadError(
                f"Tokenizer model {self.path} is corrupt ({err}). Rebuild it with: {REBUILD_HINT}"
            ) from err
        if self._sp.pad_id() != PAD_ID:
            raise TokenizerLoadError(
                f"Tokenizer model {self.path} has pad_id={self._sp.pad_id()}, need {PAD_ID}. "
                f"Rebuild it with: {REBUILD_HINT}"
            )
        self.fingerprint = hashlib.sha256(proto).hexdigest()  # Keys caches of tokenized data.

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def piece(self, token_id: int) -> str:
        """The text piece of a token id ("<s>" for bos)."""
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts using all cores."""
        return self._sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _paragraphs(directory: pathlib.Path, pattern: str, max_bytes: int):
    """Blank-line separated paragraphs (newlines kept) of the corpus, as training sentences."""
    from data.text_corpus import list_files  # Imports tensorflow_datasets: only for training.

    for path in list_files(directory, pattern):
        for paragraph in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if paragraph.strip() and len(paragraph.encode()) <= max_bytes:
                yield paragraph + "\n"


def train(
    directory: str | os.PathLike,
    output_prefix: str,
    vocab_size: int,
    pattern: str = "**/*.txt",
    model_type: str = "bpe",
) -> pathlib.Path:
    """Trains a model on the text files under `directory`; writes `{output_prefix}.model`."""
    max_bytes = 8192
    pathlib.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(pathlib.Path(directory), pattern, max_bytes),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        max_sentence_length=max_bytes + 1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    pathlib.Path(output_prefix + ".vocab").unlink(missing_ok=True)  # Only the .model is used.
    return pathlib.Path(output_prefix + ".model")


def main() -> None:
    """Command line entry point; flags are defined here so importing this module adds none."""
    from absl import app, flags

    from data.text_corpus import SHIPPED_CORPUS

    flags.DEFINE_integer("vocab_size", 4096, "Number of pieces, including special ids.")
    flags.DEFINE_string("output", "data/tokenizer/pydoc_4k", "Output prefix; writes .model.")
    flags.DEFINE_string("corpus_dir", str(SHIPPED_CORPUS), "Directory of text files.")
    flags.DEFINE_string("pattern", "**/*.txt", "Glob of the files to read, relative to it.")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm.")

    def run(argv: list[str]) -> None:
        del argv
        f = flags.FLAGS
        start = time.perf_counter()
        path = train(f.corpus_dir, f.output, f.vocab_size, f.pattern, f.model_type)
        print(
            f"Wrote {path} (vocab {Tokenizer(path).vocab_size}) "
            f"in {time.perf_counter() - start:.1f} s"
        )

    app.run(run)


if __name__ == "__main__":
    main()
