"""`python -m llm.sample`: a user's mistake is one line and exit status 2, before any model is
loaded."""

import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from data.hf_tokenizer import HFTokenizer
from llm import hf
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer

ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p=0"], "error: top_p must be in (0, 1]"),
        (["--max_new_tokens=-5"], "error: max_new_tokens must be >= 1, got -5"),
    ],
)
def test_mistakes_exit_2_with_one_line(tmp_path, flags, message):
    done = subprocess.run(
        [sys.executable, "-m", "llm.sample", f"--workdir={tmp_path / 'none'}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_hugging_face_model_samples_with_its_own_tokenizer(tmp_path, hf_tokenizer_dir):
    cfg = ModelConfig(
        vocab_size=512, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hf.save(model, str(tmp_path / "hf"), tokenizer=HFTokenizer(hf_tokenizer_dir))
    prompt = "The list type"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm.sample",
            f"--hf={tmp_path / 'hf'}",
            f"--prompt={prompt}",
            "--greedy",
            "--max_new_tokens=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(prompt)
