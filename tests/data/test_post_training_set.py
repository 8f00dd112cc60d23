"""data.post_training_set: the committed post-training sets are what the command makes from the
shipped corpus, and each preference pair differs."""

import pathlib

from data import post_training_set, sft, text_corpus

SHIPPED = pathlib.Path(post_training_set.__file__).parent / "post_training"


def test_the_SHIPPED_sets_are_what_the_command_makes():
    built = post_training_set.build(text_corpus.SHIPPED_CORPUS)
    assert sorted(built) == sorted(p.name for p in SHIPPED.glob("*.jsonl"))
    for name, records in built.items():
        assert sft.read_jsonl(SHIPPED / name, name.split("_")[0]) == records
    for pair in built["preference_train.jsonl"]:
        assert pair["chosen"] != pair["rejected"]
    assert all(records for records in built.values())


def test_rst_markup_is_reduced_to_text():
    text = "See :func:`len <builtins.len>`, ``x + 1``, :mod:`abc` and `Cython <https://c.org>`_."
    assert post_training_set.plain(text) == "See len, x + 1, abc and Cython."
