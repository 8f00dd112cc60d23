"""Post-training data: JSONL records -> token ids with a loss mask -> rows for the trainer.

Records, one JSON object a line:
    SFT:        {"prompt": "...", "response": "..."}  or  {"messages": [{"role", "content"}, ...]}
    preference: {"prompt": "...", "chosen": "...", "rejected": "..."}

Rendering: a tokenizer with a `chat_template` (an HF tokenizer_config.json) renders the messages
with it through jinja2, as transformers' `apply_chat_template` does; {"prompt", "response"} is
then the chat [user: prompt, assistant: response]. Without one, the PLAIN template is used:
    prompt/response:  prompt + "\\n\\n" + response
    messages:         "<role>:\\n" + content + "\\n\\n" per message
Every example is `[bos] + rendered + [eos]`; only the response (the assistant turns) and the final
eos are targets with weight 1, the rest weight 0. An example longer than seq_len + 1 tokens is
`truncate`d (the prompt loses its beginning, the response keeps at least half the row) or
`drop`ped; both are counted.

SFT examples are packed whole into rows (one never straddles two rows; each is its own segment);
a preference pair is one row per side (keys "chosen_*", "rejected_*").
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data.packing import PACKED_KEYS

FORMATS = ("pretrain", "sft", "preference")
OVERLONG = ("truncate", "drop")
FIELDS = {"sft": ("prompt", "response"), "preference": ("prompt", "chosen", "rejected")}
PREFERENCE_SIDES = ("chosen", "rejected")


class RecordError(ValueError):
    """A JSONL record that cannot be used; the message starts with file:line."""


def read_jsonl(path: str | os.PathLike, fmt: str) -> list[dict[str, Any]]:
    """The records of `path` for format "sft" or "preference"; RecordError names file:line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file (a JSONL file of {fmt} records).")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: malformed JSON ({e.msg}, column {e.colno}).") from None
            records.append(_checked(record, fmt, where))
    if not records:
        raise RecordError(f"{path}: no records.")
    return records


def _checked(record: Any, fmt: str, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record is a JSON object, got {type(record).__name__}.")
    if fmt == "sft" and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f'{where}: "messages" must be a non-empty list.')
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
                raise RecordError(f'{where}: each message needs a "role" and a "content".')
        if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
            raise RecordError(f"{where}: no non-empty assistant message to train on.")
        return record
    for field in FIELDS[fmt]:
        if not isinstance(record.get(field), str):
            expected = " or messages" if fmt == "sft" else ""
            raise RecordError(f'{where}: missing string field "{field}"{expected}.')
        if field != "prompt" and not record[field].strip():
            raise RecordError(f'{where}: empty "{field}".')
    return record


@dataclasses.dataclass(frozen=True)
class Template:
    """Renders records as text segments, each (text, is_target)."""

    chat_template: str | None = None  # jinja2 source; None = PLAIN
    special: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ... for the template

    def segments(self, record: dict[str, Any], response_key: str = "response") -> list:
        messages = record.get("messages") or [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record[response_key]},
        ]
        if self.chat_template is None:
            if "messages" not in record:
                return [(record["prompt"] + "\n\n", False), (record[response_key], True)]
            out = []
            for m in messages:
                out += [
                    (f"{m['role']}:\n", False),
                    (f"{m['content']}\n\n", m["role"] == "assistant"),
                ]
            return out
        out, done = [], ""
        for i, m in enumerate(messages):  # the text each assistant turn adds is its target
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise RecordError("the chat template does not render turns as prefixes.")
            out += [(before[len(done) :], False), (through[len(before) :], True)]
            done = through
        return out

    def generation_prompt(self, messages: list) -> str:
        """The chat template's text of `messages` followed by the assistant's turn opening (a
        chat_template is needed); jinja2's TemplateError for messages the template refuses."""
        return self._render(messages, add_generation_prompt=True)

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        return _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **dict(self.special)
        )


def _compiled(source: str):
    """The template in a sandbox, as transformers compiles chat templates."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def template_for(tokenizer) -> Template:
    """The tokenizer's chat template (HF tokenizer_config.json), else PLAIN."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):  # None, or a dict of named templates: PLAIN
        return Template()
    config = getattr(tokenizer, "config", {})
    special = []
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        special.append((name, token or ""))
    return Template(source, tuple(special))


def chat_encoder(tokenizer) -> Callable[[list], list[int]] | None:
    """messages -> ids of the tokenizer's chat template rendered with the assistant's turn opened,
    encoded as transformers' apply_chat_template does (no special tokens added); None when the
    tokenizer has no chat template. The template's refusals are jinja2.TemplateError."""
    template = template_for(tokenizer)
    if template.chat_template is None:
        return None
    return lambda messages: tokenizer.encode(template.generation_prompt(messages))


def tokenize(segments: list, tokenizer) -> tuple[list[int], list[float]]:
    """`[bos] + segments + [eos]` as ids, and per id its weight as a target (0 prompt, 1 response
    and eos); a template that renders bos itself keeps one."""
    ids, mask = [], []
    for text, is_target in segments:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [float(is_target)] * len(piece)
    if not ids or ids[0] != tokenizer.bos_id:
        ids, mask = [tokenizer.bos_id] + ids, [0.0] + mask
    return ids + [tokenizer.eos_id], mask + [1.0]


def fit(ids: list[int], mask: list[float], seq_len: int, overlong: str):
    """(ids, mask) of at most seq_len + 1 tokens (seq_len pairs), or None to drop."""
    if len(ids) <= seq_len + 1:
        return ids, mask
    if overlong == "drop":
        return None
    first = mask.index(1.0)  # the response's start
    keep_response = min(len(ids) - first, max(seq_len + 1 - first, (seq_len + 1) // 2))
    keep_prompt = seq_len + 1 - keep_response  # the prompt's end, after bos
    ids = ids[:1] + ids[first - keep_prompt + 1 : first] + ids[first : first + keep_response]
    mask = mask[:1] + mask[first - keep_prompt + 1 : first] + mask[first : first + keep_response]
    return ids, mask


@dataclasses.dataclass
class Counts:
    """What happened to the records of one file."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0


def _example(record, key, template, tokenizer, seq_len, overlong, counts):
    ids, mask = tokenize(template.segments(record, key), tokenizer)
    fitted = fit(ids, mask, seq_len, overlong)
    if fitted is None:
        counts.dropped += 1
    elif len(fitted[0]) < len(ids):
        counts.truncated += 1
    return fitted


def _row_arrays(examples: Sequence[tuple[list, list]], seq_len: int, pad_id: int, rows: list):
    """PACKED_KEYS -> [len(rows), seq_len]; rows[r] lists the examples of row r, in order."""
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in PACKED_KEYS}
    out["weights"] = np.zeros((len(rows), seq_len), np.float32)
    out["inputs"][:] = out["targets"][:] = pad_id
    for r, members in enumerate(rows):
        at = 0
        for segment, e in enumerate(members, 1):
            ids, mask = examples[e]
            n = len(ids) - 1
            out["inputs"][r, at : at + n] = ids[:-1]
            out["targets"][r, at : at + n] = ids[1:]
            out["weights"][r, at : at + n] = mask[1:]
            out["segment_ids"][r, at : at + n] = segment
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
    return out


def pack_sft(records, tokenizer, seq_len: int, overlong: str) -> tuple[dict, Counts]:
    """SFT records -> rows packed in order, an example whole in one row (a new row when it does
    not fit), its prompt weighted 0."""
    template, counts = template_for(tokenizer), Counts(records=len(records))
    examples = [
        _example(r, "response", template, tokenizer, seq_len, overlong, counts) for r in records
    ]
    examples = [e for e in examples if e is not None]
    rows, room = [], 0
    for i, (ids, _) in enumerate(examples):
        if len(ids) - 1 > room:
            rows.append([])
            room = seq_len
        rows[-1].append(i)
        room -= len(ids) - 1
    return _row_arrays(examples, seq_len, tokenizer.pad_id, rows), counts


def pack_preference(records, tokenizer, seq_len: int, overlong: str) -> tuple[dict, Counts]:
    """Preference records -> one row per pair: "chosen_<key>" and "rejected_<key>" for each of
    PACKED_KEYS; a pair either of whose sides is dropped is dropped."""
    template, counts = template_for(tokenizer), Counts(records=len(records))
    sides: dict[str, list] = {side: [] for side in PREFERENCE_SIDES}
    for record in records:
        side_counts = Counts()
        pair = [
            _example(record, side, template, tokenizer, seq_len, overlong, side_counts)
            for side in PREFERENCE_SIDES
        ]
        if None in pair:
            counts.dropped += 1
            continue
        counts.truncated += bool(side_counts.truncated)
        for side, example in zip(PREFERENCE_SIDES, pair):
            sides[side].append(example)
    out = {}
    for side, examples in sides.items():
        arrays = _row_arrays(
            examples, seq_len, tokenizer.pad_id, [[i] for i in range(len(examples))]
        )
        out.update({f"{side}_{k}": v for k, v in arrays.items()})
    return out, counts


def load(path, fmt: str, tokenizer, seq_len: int, overlong: str) -> tuple[dict, Counts]:
    """The rows of a JSONL file of format "sft" or "preference", and what was truncated or
    dropped; a file from which nothing remains is a RecordError."""
    pack = pack_sft if fmt == "sft" else pack_preference
    arrays, counts = pack(read_jsonl(path, fmt), tokenizer, seq_len, overlong)
    if counts.dropped == counts.records:
        raise RecordError(
            f"{path}: all {counts.records} records are longer than seq_len={seq_len} and were "
            "dropped: raise seq_len or set overlong=truncate."
        )
    return arrays, counts
