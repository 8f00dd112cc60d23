"""config.post_training: what a run trains on besides pretraining text, and how.

    format=pretrain     the tfds text of config.data (packed documents, every token a target)
    format=sft          JSONL prompt/response or chat records (data.sft): loss on responses only
    format=preference   JSONL prompt/chosen/rejected records: DPO, IPO or SimPO (llm.training.dpo)
                        against the frozen init_from checkpoint

Records longer than seq_len are truncated or dropped (`overlong`); the counts are printed.
"""

from __future__ import annotations

import dataclasses

from absl import logging

from data import sft
from data.hf_tokenizer import load_tokenizer
from llm.errors import check
from llm.training.dpo import LOSSES
from llm.training.inputs import DataConfig, check_vocab


@dataclasses.dataclass(frozen=True)
class PostTrainingConfig:
    """config.post_training."""

    format: str = "pretrain"  # pretrain | sft | preference
    train_file: str = ""  # sft, preference: the JSONL file trained on
    eval_file: str = ""  # sft, preference: the JSONL file evaluated on
    overlong: str = "truncate"  # truncate | drop: a record longer than seq_len
    loss: str = "dpo"  # preference: dpo | ipo | simpo
    beta: float = 0.1  # preference: the inverse temperature of the rewards
    simpo_gamma: float = 0.5  # simpo: the target reward margin

    def __post_init__(self):
        check(
            self.format in sft.FORMATS,
            f"config.post_training.format must be one of {sft.FORMATS}, got {self.format!r}.",
        )
        check(
            self.overlong in sft.OVERLONG,
            f"config.post_training.overlong must be one of {sft.OVERLONG}, got {self.overlong!r}.",
        )
        check(
            self.loss in LOSSES,
            f"config.post_training.loss must be one of {LOSSES}, got {self.loss!r}.",
        )
        check(self.beta > 0, f"config.post_training.beta must be > 0, got {self.beta!r}.")
        check(
            self.simpo_gamma >= 0,
            f"config.post_training.simpo_gamma must be >= 0, got {self.simpo_gamma!r}.",
        )
        if self.format != "pretrain":
            for field in ("train_file", "eval_file"):
                check(
                    bool(getattr(self, field)),
                    f"config.post_training.format={self.format} reads JSONL files: set "
                    f"--config.post_training.{field}=FILE (e.g. data/post_training/"
                    f"{self.format}_{'train' if field == 'train_file' else 'validation'}.jsonl).",
                )

    def check_run(self, init_from: str, log_activation_rms: bool) -> None:
        """The rules that span the experiment."""
        if self.format != "preference":
            return
        check(
            bool(init_from),
            "config.post_training.format=preference needs a reference model, the run's starting "
            "point: set --config.init_from=workdir:DIR (a pretrained run) or hf:DIR.",
        )
        check(
            not log_activation_rms,
            "config.debug.log_activation_rms measures pretraining batches, not preference pairs: "
            "set it to False with post_training.format=preference.",
        )


def load_data(
    cfg: PostTrainingConfig,
    data: DataConfig,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    seed: int,
):
    """Tokenizer and the train and eval rows of cfg's JSONL files; what was truncated or
    dropped is printed."""
    from data import pipeline  # imports tensorflow_datasets: only when reading data

    tokenizer = load_tokenizer(data.tokenizer)
    check_vocab(vocab_size, tokenizer.vocab_size)
    splits = []
    for path in (cfg.train_file, cfg.eval_file):
        arrays, counts = sft.load(path, cfg.format, tokenizer, seq_len, cfg.overlong)
        line = (
            f"{path}: {counts.records} {cfg.format} records, {counts.truncated} truncated and "
            f"{counts.dropped} dropped as longer than seq_len={seq_len} (overlong={cfg.overlong})"
        )
        print(line, flush=True)
        if counts.truncated or counts.dropped:
            logging.warning(line)
        dataset = pipeline.PackedDataset(arrays, seed)
        dataset.batch(0, batch_size)  # too little data is a DataError now, not mid-training
        splits.append(dataset)
    return tokenizer, *splits
