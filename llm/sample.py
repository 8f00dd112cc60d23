"""A command that continues a prompt with the model of a training run.

    python -m llm.sample --workdir=/tmp/default --prompt="The list type"
    python -m llm.sample --workdir=/tmp/default@200 --prompt="The list type"  # step 200
    python -m llm.sample --hf=/path/to/hf_model --prompt="The list type"  # with its tokenizer
    python -m llm.sample --workdir=/tmp/default --kv_cache=int8  # int8 keys and values

Decoding itself is llm.model.decode.generate.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from data.hf_tokenizer import HFTokenizer, load_tokenizer
from llm import config as config_lib
from llm import hf
from llm.model.decode import check_sampling, generate
from llm.runs import load_run

FLAGS = flags.FLAGS


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
        if FLAGS.hf:  # the released model's own tokenizer and prompt convention
            model, tokenizer = hf.load(FLAGS.hf), HFTokenizer(FLAGS.hf)
            prompt = tokenizer.encode_prompt(FLAGS.prompt)
        else:  # as the run trained: bos, then the text
            model, config = load_run(FLAGS.workdir)
            tokenizer = load_tokenizer(config.data.tokenizer)
            prompt = [tokenizer.bos_id] + tokenizer.encode(FLAGS.prompt)
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
    except (FileNotFoundError, ValueError) as e:  # user errors: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    new = np.asarray(tokens[0, len(prompt) :]).tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(FLAGS.prompt + tokenizer.decode(new))


if __name__ == "__main__":
    flags.DEFINE_string(
        "workdir", None, "Training run directory (config.json, checkpoints/); DIR@STEP for a step."
    )
    flags.DEFINE_string("hf", None, "A Hugging Face model directory (llm.hf.load + its tokenizer).")
    flags.DEFINE_string(
        "prompt",
        "",
        "Text to continue (--workdir: after a bos token; --hf: with its tokenizer's special tokens).",
    )
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
