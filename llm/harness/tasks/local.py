"""The shipped tasks' documents: JSONL files beside this module, read without the hub (the
`custom_dataset` of each task YAML here; `python -m llm.harness.build_tasks` writes them)."""

import json
import pathlib

import datasets

HERE = pathlib.Path(__file__).resolve().parent


def load_jsonl(file: str, **metadata) -> datasets.DatasetDict:
    """The "test" split: one document per line of HERE/file (metadata: lm-eval's, unused)."""
    del metadata
    lines = (HERE / file).read_text().splitlines()
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([json.loads(x) for x in lines])}
    )
