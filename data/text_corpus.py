"""TFDS builder `text_corpus`: one example per text file of a local directory.

Files are split into train/validation by a hash of their relative path, so the
split is deterministic and does not depend on file order or contents.

    import data.text_corpus  # registers the builder
    tfds.load("text_corpus", split="train", data_dir=...)  # the shipped pydoc corpus
    tfds.load("text_corpus", split="train", data_dir=...,
              builder_kwargs={"config": config_for_directory("/my/texts")})
"""

import dataclasses
import hashlib
import os
import pathlib
from typing import ClassVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow_datasets as tfds

SHIPPED_CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "pydoc"
VALIDATION_FRACTION = 0.05
MAX_UNDECODABLE = 0.01  # a corpus with more of its characters not UTF-8 is refused


class CorpusNotTextError(ValueError):
    """The corpus files are mostly not UTF-8 text (binary files, another encoding)."""


class CorpusNotFoundError(FileNotFoundError):
    """The corpus directory is missing or holds no matching text files."""


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """A directory of text files; `pattern` is a glob relative to it."""

    directory: str = str(SHIPPED_CORPUS)
    pattern: str = "**/*.txt"


def config_for_directory(
    directory: str | os.PathLike, pattern: str = "**/*.txt"
) -> TextCorpusConfig:
    """Config whose name is derived from the absolute path, so caches never collide."""
    path = str(pathlib.Path(directory).expanduser().resolve())
    digest = hashlib.sha256(f"{path}\0{pattern}".encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() else "_" for c in pathlib.Path(path).name)[:40]
    return TextCorpusConfig(
        name=f"{name}_{digest}",
        description=f"Text files {pattern} under {path}",
        directory=path,
        pattern=pattern,
    )


def list_files(directory: str | os.PathLike, pattern: str = "**/*.txt") -> list[pathlib.Path]:
    """Sorted matching files under `directory`; raises CorpusNotFoundError if none."""
    root = pathlib.Path(directory)
    files = sorted(p for p in root.glob(pattern) if p.is_file()) if root.is_dir() else []
    if not files:
        raise CorpusNotFoundError(
            f"No text files matching {pattern!r} in corpus directory {root} "
            f"({'missing' if not root.is_dir() else 'empty'}). Point the builder at a directory "
            "of text files with config_for_directory(path), or restore the shipped corpus with "
            "`git checkout -- data/corpus/pydoc`."
        )
    return files


def check_text(files: list[pathlib.Path]) -> None:
    """CorpusNotTextError if more than MAX_UNDECODABLE of the characters are not UTF-8."""
    bad = total = 0
    worst, worst_fraction = None, 0.0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        count = text.count("\ufffd")
        bad, total = bad + count, total + len(text)
        if text and count / len(text) > worst_fraction:
            worst, worst_fraction = path, count / len(text)
    if total and bad / total > MAX_UNDECODABLE:
        raise CorpusNotTextError(
            f"{bad / total:.1%} of the corpus's characters are not UTF-8 text (worst: {worst}, "
            f"{worst_fraction:.0%}): point data.text_dir at UTF-8 text files (binary files or "
            "another encoding would train on noise)."
        )


def split_files(relpaths: list[str]) -> dict[str, list[str]]:
    """The files with the lowest path hashes (5%, at least 1) are validation, the rest train."""
    if len(relpaths) < 2:
        raise CorpusNotFoundError(
            f"Need at least 2 text files for a train and a validation split, got {relpaths}."
        )
    ranked = sorted(relpaths, key=lambda p: (hashlib.sha256(p.encode()).hexdigest(), p))
    num_val = min(max(round(VALIDATION_FRACTION * len(ranked)), 1), len(ranked) - 1)
    return {"validation": sorted(ranked[:num_val]), "train": sorted(ranked[num_val:])}


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Plain text files of a local directory, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[TextCorpusConfig]] = [
        TextCorpusConfig(
            name="pydoc", description="Python 3.11 documentation sources (PSF license), shipped."
        )
    ]
    # No downloads, so no checksums file; this also skips tfds' code_path lookup, which
    # needs the optional `importlib_resources` package.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            homepage="https://docs.python.org/3.11/",
            license="PSF-2.0" if self.builder_config.name == "pydoc" else None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Local files only: nothing to download.
        root = pathlib.Path(self.builder_config.directory)
        files = list_files(root, self.builder_config.pattern)
        check_text(files)
        splits = split_files([p.relative_to(root).as_posix() for p in files])
        return {name: self._generate_examples(root, paths) for name, paths in splits.items()}

    def _generate_examples(self, root: pathlib.Path, relpaths: list[str]):
        for rel in relpaths:
            text = (root / rel).read_text(encoding="utf-8", errors="replace")
            yield rel, {"text": text, "path": rel}
