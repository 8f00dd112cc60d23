"""Test setup: eight CPU devices, set before jax is imported anywhere."""

import os
import pathlib
import subprocess
import sys

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One compilation cache on disk for the test run's processes (the workers, and the commands and
# notebooks tests start), so a computation many tests build alike (the tiny model's train step,
# ...) compiles once: the same executable, loaded instead of compiled again. Only what took a
# second or more to compile is kept (jax's default), so entries stay few: with a size cap jax
# locks the cache (filelock), so processes never read each other's half-written files, and
# scans all of it on every write. Kept between runs (gitignored).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))


@pytest.fixture(scope="session")
def run_module():
    """`run_module("llm.sample", "--flag=...")` runs `python -m llm.sample --flag=...` from the
    repository root (or `cwd`) and returns the finished process, output captured as text; a
    non-zero exit status is the test's to check."""

    def run(module: str, *args: str, cwd=ROOT, env=None, timeout: int = 300):
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """A byte-level BPE (500 tokens, bos/eos/pad) trained with `tokenizers` on the shipped corpus
    and saved by transformers' `save_pretrained`: an HF tokenizer directory made here, no hub."""
    import tokenizers
    import transformers

    from data import text_corpus

    files = text_corpus.list_files(text_corpus.SHIPPED_CORPUS, "**/*.rst.txt")[:30]
    texts = [path.read_text()[:20000] for path in files]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    fast.save_pretrained(directory)
    return directory
