"""Hand a training run off as a Hugging Face directory: the model, its tokenizer and generation
config, loadable by `transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`.

    python -m llm.export --workdir=/tmp/default --out=/tmp/default_hf
    python -m llm.export --workdir=/tmp/default@200 --out=/tmp/default_hf_200  # step 200
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from data.hf_tokenizer import load_tokenizer
from data.tokenizer import TokenizerLoadError, TokenizerNotFoundError
from llm import config as config_lib
from llm import hf
from llm.runs import load_run


def export(run: str, out: str) -> None:
    """Writes the model of `run` (DIR or DIR@STEP) and its tokenizer to the HF directory `out`."""
    model, config = load_run(run)
    tokenizer = load_tokenizer(config.data.tokenizer)
    hf.save(model, out, tokenizer=tokenizer)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir or not f.out:
        print("error: pass --workdir=DIR[@STEP] (a training run) and --out=DIR.", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        export(f.workdir, f.out)
    except (FileNotFoundError, ValueError, TokenizerNotFoundError, TokenizerLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {f.out}: config.json, model.safetensors, tokenizer, generation_config.json")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training run directory; DIR@STEP for a step.")
    flags.DEFINE_string("out", None, "The Hugging Face directory to write.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
