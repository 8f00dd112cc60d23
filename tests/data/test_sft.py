"""data.sft: records -> ids with a loss mask (plain template, and an HF chat template rendered
like transformers), whole examples packed, overlong records truncated or dropped, bad records
named by file:line."""

import json
import shutil

import pytest

from data import sft
from data.hf_tokenizer import HFTokenizer
from data.packing import PACKED_KEYS
from data.tokenizer import Tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _targets(ids, mask):
    """The ids that are targets with weight 1 (an id's mask entry weighs it as a target)."""
    return [i for i, m in zip(ids, mask) if m]


def test_only_the_response_and_eos_are_targets(tokenizer):
    record = {"prompt": "The list type", "response": "Lists are mutable sequences."}
    ids, mask = sft.tokenize(sft.template_for(tokenizer).segments(record), tokenizer)
    prompt = tokenizer.encode("The list type\n\n")
    assert ids == [tokenizer.bos_id, *prompt, *tokenizer.encode(record["response"]), 2]
    assert mask == [0.0] * (1 + len(prompt)) + [1.0] * (len(ids) - 1 - len(prompt))
    assert tokenizer.decode(_targets(ids, mask)[:-1]) == record["response"]


def test_a_chat_template_renders_as_transformers_does(hf_tokenizer_dir, tmp_path):
    import transformers

    directory = tmp_path / "chat"
    shutil.copytree(hf_tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHAT_TEMPLATE})
    )
    ours = HFTokenizer(directory)
    segments = sft.template_for(ours).segments(CHAT)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert "".join(text for text, _ in segments) == theirs.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    assert [text for text, target in segments if target] == [
        "A mutable sequence.</s>",  # trim_blocks: no newline after a block tag
        "An immutable one.</s>",
    ]
    ids, mask = sft.tokenize(segments, ours)
    assert ids[0] == ours.bos_id and ids[1] != ours.bos_id  # the template's bos, once
    assert ours.decode(_targets(ids, mask)) == "A mutable sequence.</s>An immutable one.</s></s>"


def test_plain_chat_messages_train_on_assistant_turns(tokenizer):
    segments = sft.template_for(tokenizer).segments(CHAT)
    assert [text for text, target in segments if target] == [
        "A mutable sequence.\n\n",
        "An immutable one.\n\n",
    ]


def test_examples_are_packed_whole_with_their_masks(tokenizer):
    records = [{"prompt": f"Heading {i}", "response": " ".join(["12345"] * i)} for i in range(1, 7)]
    arrays, counts = sft.pack_sft(records, tokenizer, seq_len=32, overlong="drop")
    examples = [sft.tokenize(sft.template_for(tokenizer).segments(r), tokenizer) for r in records]
    kept = [e for e in examples if len(e[0]) <= 33]
    assert counts.dropped == len(examples) - len(kept) > 0
    found = []
    for row in range(len(arrays["inputs"])):
        for segment in range(1, arrays["segment_ids"][row].max() + 1):
            at = arrays["segment_ids"][row] == segment
            assert list(arrays["positions"][row][at]) == list(range(at.sum()))
            ids = [*arrays["inputs"][row][at], arrays["targets"][row][at][-1]]
            found.append((ids, [0.0, *arrays["weights"][row][at]]))
    assert found == [(ids, mask) for ids, mask in kept]  # in order, whole, mask intact
    assert arrays["weights"][arrays["segment_ids"] == 0].sum() == 0  # padding


def test_overlong_records_are_truncated_keeping_the_response_or_dropped(tokenizer):
    record = {"prompt": "long prompt " * 40, "response": "The answer is short."}
    ids, mask = sft.tokenize(sft.template_for(tokenizer).segments(record), tokenizer)
    fitted_ids, fitted_mask = sft.fit(ids, mask, seq_len=24, overlong="truncate")
    assert len(fitted_ids) == 25 and fitted_ids[0] == tokenizer.bos_id
    assert _targets(fitted_ids, fitted_mask) == _targets(ids, mask)  # the whole response
    assert fitted_ids[-len(_targets(ids, mask)) - 1 :] == ids[-len(_targets(ids, mask)) - 1 :]
    assert sft.fit(ids, mask, seq_len=24, overlong="drop") is None
    half = sft.fit(ids, mask, seq_len=8, overlong="truncate")  # the response keeps half the row
    assert (
        half[1] == [0.0] * 5 + [1.0] * 4
        and half[0][5:] == ids[len(ids) - len(_targets(ids, mask)) :][:4]
    )
    arrays, counts = sft.pack_preference(
        [{"prompt": record["prompt"], "chosen": "Yes.", "rejected": "No."}] * 3,
        tokenizer,
        seq_len=16,
        overlong="truncate",
    )
    assert (counts.records, counts.truncated, counts.dropped) == (3, 3, 0)
    assert sorted(arrays) == sorted(f"{s}_{k}" for s in sft.PREFERENCE_SIDES for k in PACKED_KEYS)


@pytest.mark.parametrize(
    "fmt, line, message",
    [
        ("sft", '{"prompt": "a"}', 'missing string field "response" or messages'),
        ("sft", '{"prompt": "a", "response": "  "}', 'empty "response"'),
        ("sft", '{"prompt": "a", "response": "b"', "malformed JSON"),
        ("sft", '{"messages": [{"role": "user", "content": "a"}]}', "no non-empty assistant"),
        ("preference", '{"prompt": "a", "chosen": "b"}', 'missing string field "rejected"'),
        ("preference", '{"prompt": "a", "chosen": "", "rejected": "c"}', 'empty "chosen"'),
        ("preference", "[1, 2]", "a record is a JSON object"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, fmt, line, message):
    good = {
        "sft": '{"prompt": "a", "response": "b"}',
        "preference": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
    }[fmt]
    path = _write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(sft.RecordError, match=rf"^{path}:3: .*{message}"):
        sft.read_jsonl(path, fmt)


def test_a_file_of_only_overlong_records_is_an_error(tmp_path, tokenizer):
    path = _write(tmp_path / "long.jsonl", [json.dumps({"prompt": "x " * 50, "response": "y"})])
    with pytest.raises(sft.RecordError, match="all 1 records are longer than seq_len=8"):
        sft.load(path, "sft", tokenizer, seq_len=8, overlong="drop")
    arrays, counts = sft.load(path, "sft", tokenizer, seq_len=8, overlong="truncate")
    assert counts.truncated == 1 and arrays["weights"].sum() == 2  # "y" and eos
