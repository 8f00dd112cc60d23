"""`python -m llm.sample`: a user's mistake is one line and exit status 2, before any model is
loaded; a Hugging Face model samples with its own tokenizer, and --chat renders the prompt exactly
as transformers' apply_chat_template(..., add_generation_prompt=True) does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.hf_tokenizer import HFTokenizer
from llm import hf, sample
from llm.model.config import ModelConfig
from llm.model.decode import generate
from llm.model.transformer import Transformer


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p=0"], "error: top_p must be in (0, 1]"),
        (["--max_new_tokens=-5"], "error: max_new_tokens must be >= 1, got -5"),
        (["--system=Be brief."], "error: --system is a chat turn: pass --chat with it."),
    ],
)
def test_mistakes_exit_2_with_one_line(run_module, tmp_path, flags, message):
    done = run_module("llm.sample", f"--workdir={tmp_path / 'none'}", *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr


def tiny_model() -> Transformer:
    cfg = ModelConfig(
        vocab_size=512, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64
    )
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_a_hugging_face_model_samples_with_its_own_tokenizer(
    run_module, tmp_path, hf_tokenizer_dir
):
    hf.save(tiny_model(), str(tmp_path / "hf"), tokenizer=HFTokenizer(hf_tokenizer_dir))
    prompt = "The list type"
    flags = [f"--hf={tmp_path / 'hf'}", f"--prompt={prompt}", "--max_new_tokens=4"]
    done = run_module("llm.sample", *flags, "--greedy")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(prompt)

    chat = run_module("llm.sample", *flags, "--chat")  # its tokenizer has no chat template
    assert chat.returncode == 2 and "Traceback" not in chat.stderr, chat.stderr[-2000:]
    assert (
        chat.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --chat needs a chat template, and the tokenizer")
    )


def apply_chat_template(directory, messages: list, **kw) -> list[int]:
    import transformers

    auto = transformers.AutoTokenizer.from_pretrained(directory)
    return auto.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]


@pytest.mark.parametrize("system", ["", "Answer in Python terms."])
def test_chat_prompt_ids_equal_apply_chat_template(chat_tokenizer_dir, system):
    tokenizer, prompt = HFTokenizer(chat_tokenizer_dir), "What is the list type?"
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    expected = apply_chat_template(chat_tokenizer_dir, messages, add_generation_prompt=True)
    got = sample.prompt_ids(tokenizer, tokenizer.encode_prompt, prompt, chat=True, system=system)
    assert got == expected
    # the assistant's turn is opened: more than the messages alone
    assert len(got) > len(apply_chat_template(chat_tokenizer_dir, messages))
    raw = sample.prompt_ids(tokenizer, tokenizer.encode_prompt, prompt, chat=False)
    assert raw == tokenizer.encode_prompt(prompt)


def test_chat_without_a_template_is_refused(hf_tokenizer_dir):
    tokenizer = HFTokenizer(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="--chat needs a chat template"):
        sample.prompt_ids(tokenizer, tokenizer.encode_prompt, "hi", chat=True)


def test_chat_samples_the_reply_to_the_rendered_prompt(run_module, tmp_path, chat_tokenizer_dir):
    model, tokenizer = tiny_model(), HFTokenizer(chat_tokenizer_dir)
    hf.save(model, str(tmp_path / "hf"), tokenizer=tokenizer)
    prompt, system = "The list type", "Answer in Python terms."
    done = run_module(
        "llm.sample", f"--hf={tmp_path / 'hf'}", f"--prompt={prompt}", "--chat",
        f"--system={system}", "--greedy", "--max_new_tokens=6",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = apply_chat_template(chat_tokenizer_dir, messages, add_generation_prompt=True)
    tokens = generate(
        model, jnp.array([ids], jnp.int32), max_new_tokens=6, rng=jax.random.key(0), greedy=True,
        eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size,
    )  # fmt: skip
    new = np.asarray(tokens[0, len(ids) :]).tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert done.stdout == tokenizer.decode(new) + "\n"  # the reply alone, not the prompt
