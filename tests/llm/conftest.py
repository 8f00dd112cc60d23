"""Shared fixtures for the llm tests: a tiny real-text corpus and a tiny training config."""

import json
import pathlib
import shutil

import pytest

from data import text_corpus
from experiments import default
from llm import config as config_lib


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


CHAT_TEMPLATE = (  # a template of the usual shape: roles checked, the assistant's turn opened
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(hf_tokenizer_dir, tmp_path_factory) -> pathlib.Path:
    """hf_tokenizer_dir (tests/conftest.py) with CHAT_TEMPLATE in its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("chat_tokenizer")
    shutil.copytree(hf_tokenizer_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


TINY = {  # the tiny config's overrides of experiments/default.py
    "steps": 6,
    "batch_size": 8,  # one sequence per CPU device of the test mesh
    "seq_len": 32,
    "log_every": 1,
    "eval_every": 3,
    "eval_batches": 1,
    "checkpoint_every": 3,
    "sample_prompt": "",
    "optimizer.warmup_steps": 2,
    "model.num_layers": 2,
    "model.embed_dim": 64,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.mlp_dim": 128,
}


def _tiny_config(text_dir, data_dir):
    return config_lib.with_overrides(
        default.get_config(),
        {**TINY, "data.text_dir": str(text_dir), "data.data_dir": str(data_dir)},
    )


@pytest.fixture
def tiny_config(tiny_config_shared):
    """The default experiment shrunk to a 2-layer, 64-wide model on the tiny corpus (a copy each
    test may change)."""
    return tiny_config_shared.copy_and_resolve_references()


@pytest.fixture(scope="session")
def tiny_config_shared(text_dir, data_dir):
    """`tiny_config` for session- and module-scoped fixtures (do not modify it)."""
    return _tiny_config(text_dir, data_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config_shared) -> pathlib.Path:
    """A finished run of the tiny config (checkpoints at steps 3 and 6, evaluated at both), for
    the tests that only read a run: do not write to it."""
    from llm import train

    directory = tmp_path_factory.mktemp("tiny_run")
    train.train_and_evaluate(tiny_config_shared, str(directory))
    return directory


@pytest.fixture
def train_until_first_save(monkeypatch):
    """train_until_first_save(config, workdir): trains until the first checkpoint is complete,
    then dies there (as kill -9 would right after it), leaving the run to be resumed."""
    from llm import train
    from llm.training import checkpoint

    class Interrupted(Exception):
        pass

    save = checkpoint.save

    def save_then_die(manager, state, **kwargs):
        save(manager, state, **kwargs)
        manager.wait_until_finished()
        raise Interrupted

    def run(config, workdir: str) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, "save", save_then_die)
            with pytest.raises(Interrupted):
                train.train_and_evaluate(config, workdir)

    return run


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, hf_tokenizer_dir) -> pathlib.Path:
    """A small random Hugging Face Llama with hf_tokenizer_dir's tokenizer, saved by transformers
    (tests/llm/harness, tests/llm/test_serve.py)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # logits far from uniform, so the scores tell tokens apart
        model.lm_head.weight.mul_(20.0)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
