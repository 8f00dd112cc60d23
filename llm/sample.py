"""A command that continues a prompt with the model of a training run.

    python -m llm.sample --workdir=/tmp/default --prompt="The list type"
    python -m llm.sample --workdir=/tmp/default@200 --prompt="The list type"  # step 200
    python -m llm.sample --hf=/path/to/hf_model --prompt="The list type"  # with its tokenizer
    python -m llm.sample --workdir=/tmp/default --kv_cache=int8  # int8 keys and values
    python -m llm.sample --hf=/path/to/instruct_model --chat --prompt="What is a list?"

--chat renders --prompt as a user message (after --system's, if given) with the tokenizer's chat
template (an HF tokenizer_config.json's "chat_template", data.sft), the assistant's turn opened,
encoded as transformers' apply_chat_template(..., add_generation_prompt=True) does; it prints
only the reply.

Decoding itself is llm.model.decode.generate.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import jinja2
import numpy as np
from absl import app, flags, logging

from data.sft import chat_encoder
from llm import config as config_lib
from llm.model.decode import check_sampling, generate
from llm.runs import load_model

FLAGS = flags.FLAGS


def prompt_ids(tokenizer, encode, prompt: str, chat: bool, system: str = "") -> list[int]:
    """The ids to continue: `encode(prompt)` (the model's own prompt convention), or with `chat`
    the chat template's rendering of [system, user: prompt] with the assistant's turn opened.
    ValueError if `chat` and the tokenizer has no chat template."""
    if not chat:
        return encode(prompt)
    render = chat_encoder(tokenizer)
    if render is None:
        raise ValueError(
            f"--chat needs a chat template, and the tokenizer {tokenizer.path} has none (an HF "
            'tokenizer directory whose tokenizer_config.json has "chat_template"): drop --chat '
            "to continue the raw prompt."
        )
    system_turn = [{"role": "system", "content": system}] if system else []
    return render([*system_turn, {"role": "user", "content": prompt}])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.hf):
        print(
            "error: pass --workdir=DIR[@STEP] (a `python -m llm.train` run) or --hf=DIR (a "
            "Hugging Face model directory with its tokenizer), not both.",
            file=sys.stderr,
        )
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        check_sampling(
            FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.greedy
        )
        if FLAGS.system and not FLAGS.chat:
            raise ValueError("--system is a chat turn: pass --chat with it.")
        model, tokenizer, encode = load_model(FLAGS.workdir, FLAGS.hf)
        prompt = prompt_ids(tokenizer, encode, FLAGS.prompt, FLAGS.chat, FLAGS.system)
        tokens = generate(
            model,
            jnp.array([prompt], jnp.int32),
            max_new_tokens=FLAGS.max_new_tokens,
            rng=jax.random.key(FLAGS.seed),
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            greedy=FLAGS.greedy,
            eos_id=tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size,
            kv_int8=FLAGS.kv_cache == "int8",
        )
    except (FileNotFoundError, ValueError, jinja2.TemplateError) as e:  # user errors: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    new = np.asarray(tokens[0, len(prompt) :]).tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(("" if FLAGS.chat else FLAGS.prompt) + tokenizer.decode(new))


if __name__ == "__main__":
    flags.DEFINE_string(
        "workdir", None, "Training run directory (config.json, checkpoints/); DIR@STEP for a step."
    )
    flags.DEFINE_string("hf", None, "A Hugging Face model directory (llm.hf.load + its tokenizer).")
    flags.DEFINE_string(
        "prompt",
        "",
        "Text to continue (--workdir: after a bos token; --hf: with its tokenizer's special "
        "tokens); with --chat, the user's message.",
    )
    flags.DEFINE_bool(
        "chat",
        False,
        "Send --prompt as a user message through the tokenizer's chat template (tokenizer_config."
        "json's chat_template), the assistant's turn opened; prints only the reply.",
    )
    flags.DEFINE_string("system", "", "With --chat: a system message before the user's.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature (> 0).")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus: smallest set with this much mass; 1 = all.")
    flags.DEFINE_bool("greedy", False, "Take the most likely token (ignores the above).")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
    flags.DEFINE_enum(
        "kv_cache",
        "float",
        ["float", "int8"],
        "KV cache: the compute dtype, or int8 (per token and head).",
    )
    app.run(main, flags_parser=config_lib.parse_flags)
