"""A run's inputs with a Hugging Face tokenizer: `--config.data.tokenizer=DIR` trains on text
tokenized by it, and the run hands off (export) with that tokenizer."""

import numpy as np
import transformers

from data.hf_tokenizer import HFTokenizer
from llm import config as config_lib
from llm import export, train
from llm.training.metrics import read_metrics


def test_a_run_trains_and_exports_with_a_hugging_face_tokenizer(
    tmp_path, tiny_config, hf_tokenizer_dir
):
    config = config_lib.with_overrides(
        tiny_config,
        {
            "data.tokenizer": str(hf_tokenizer_dir),
            "model.vocab_size": 512,
            "steps": 2,
            "eval_every": 2,
            "optimizer.warmup_steps": 1,
            "checkpoint_every": 2,
        },
    )
    train.train_and_evaluate(config, str(tmp_path / "run"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert np.isfinite(losses).all() and abs(losses[0] - np.log(512)) < 1.0  # near uniform at 512
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The list type is a mutable sequence."
    assert theirs(text, add_special_tokens=False)["input_ids"] == HFTokenizer(
        hf_tokenizer_dir
    ).encode(text)
