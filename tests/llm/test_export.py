"""llm.export (and llm.runs): a run's checkpoint at a chosen step becomes a Hugging Face directory
whose model and tokenizer transformers loads and runs exactly like ours."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from data.tokenizer import Tokenizer
from llm import export, runs, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_dir, data_dir):
    from experiments import default
    from llm import config as config_lib

    config = config_lib.with_overrides(
        default.get_config(),
        {
            "steps": 6, "batch_size": 8, "seq_len": 32, "log_every": 3, "eval_every": 0,
            "checkpoint_every": 3, "sample_prompt": "", "data.text_dir": str(text_dir),
            "data.data_dir": str(data_dir), "model.num_layers": 2, "model.embed_dim": 64,
            "model.num_heads": 4, "model.num_kv_heads": 2, "model.mlp_dim": 128,
        },
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, str(directory))
    return directory


def test_export_of_a_step_loads_in_transformers(run_dir, tmp_path):
    out = tmp_path / "hf"
    export.export(f"{run_dir}@3", str(out))
    ours, _ = runs.load_run(f"{run_dir}@3")
    latest, _ = runs.load_run(str(run_dir))
    tokenizer = Tokenizer()

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["The list type", "def f(x):\n    return x + 1  # é", "  two  spaces"]:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (1, 2)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = [tokenizer.bos_id] + tokenizer.encode("The list type is a mutable sequence.")
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits.numpy()
    mine = np.asarray(ours(jnp.array([tokens], jnp.int32)))
    np.testing.assert_allclose(theirs, mine, atol=1e-4, rtol=1e-4)
    other = np.asarray(latest(jnp.array([tokens], jnp.int32)))
    assert not np.allclose(other, mine, atol=1e-4)  # step 3, not the latest (6)


@pytest.mark.parametrize(
    "run, message",
    [("@9", "no checkpoint of step 9"), ("@x", "must be a checkpoint step number"), ("/none", "")],
)
def test_export_mistakes_are_one_line(run_module, run_dir, tmp_path, run, message):
    workdir = f"{run_dir}{run}" if run.startswith("@") else run
    result = run_module("llm.export", f"--workdir={workdir}", f"--out={tmp_path / 'o'}")
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
