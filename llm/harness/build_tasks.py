"""Writes the shipped lm-eval tasks' JSONL (llm/harness/tasks/) from the held-out (validation)
files of the shipped corpus, deterministically: the same files byte for byte on every run.

    python -m llm.harness.build_tasks                 # into llm/harness/tasks/
    python -m llm.harness.build_tasks --out=/tmp/tasks

cloze.jsonl: up to 3 sentences of prose, then the true next sentence among 4 (3 from other
held-out files, of similar length). perplexity.jsonl: passages of about PASSAGE_CHARS characters.
passkey_L.jsonl: L-token contexts (the shipped tokenizer, bos and 8 answer tokens included) of
held-out text with a 5-digit pass key at a depth from 0 to 1, then the question.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import sys

from absl import app, flags

from data import text_corpus
from data.tokenizer import Tokenizer
from llm.harness.config import TASKS_DIR

CLOZE_ITEMS = 400
PASSAGE_CHARS = 1500
PASSKEY_LENGTHS = (128, 256, 512, 1024)
PASSKEY_TRIALS = 20
ANSWER_ROOM = 8  # tokens generated after the prompt (max_gen_toks of the task YAML)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
INLINE_ROLE = re.compile(r":[\w:-]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :class:`X` -> X
LITERAL = re.compile(r"``([^`]*)``")  # ``x`` -> x
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def held_out_texts() -> dict[str, str]:
    """relative path -> text of the shipped corpus's validation files (data.text_corpus split)."""
    root = text_corpus.SHIPPED_CORPUS
    files = text_corpus.list_files(root)
    names = text_corpus.split_files([p.relative_to(root).as_posix() for p in files])["validation"]
    return {name: (root / name).read_text(encoding="utf-8") for name in names}


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text, each on one line: no directives, code, tables or titles."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(
            line.startswith((" ", "\t", "..", "=", "-", "*", "+", "|")) for line in lines
        ):
            continue
        if "::" in block:
            continue
        paragraph = " ".join(" ".join(line.split()) for line in lines)
        paragraph = INLINE_ROLE.sub(r"\1", LITERAL.sub(r"\1", paragraph))  # the text they show
        if "`" in paragraph:
            continue
        if len(paragraph) > 80:
            paragraphs.append(paragraph)
    return paragraphs


def cloze_items(texts: dict[str, str], rng: random.Random) -> list[dict]:
    """Multiple-choice items: context (up to 3 sentences), choices (4 sentences), label."""
    sentences = {}  # file -> paragraphs' sentences
    for name, text in texts.items():
        sentences[name] = [SENTENCE_END.split(p) for p in prose_paragraphs(text)]
    pool = sorted(
        (len(s), s, name)
        for name, paragraphs in sentences.items()
        for paragraph in paragraphs
        for s in paragraph
        if 30 <= len(s) <= 250
    )
    items = []
    for name, paragraphs in sentences.items():
        for paragraph in paragraphs:
            for i in range(1, len(paragraph)):
                true = paragraph[i]
                if not 30 <= len(true) <= 250:
                    continue
                near = sorted(pool, key=lambda e: (abs(e[0] - len(true)), e[1]))
                others = [s for _, s, other in near if other != name][:20]
                choices = [true, *rng.sample(others, 3)]
                rng.shuffle(choices)
                context = " ".join(paragraph[max(0, i - 3) : i])
                items.append({"context": context, "choices": choices, "label": choices.index(true)})
    rng.shuffle(items)
    return items[:CLOZE_ITEMS]


def passages(texts: dict[str, str]) -> list[dict]:
    """The held-out files cut at blank lines into passages of about PASSAGE_CHARS characters."""
    out = []
    for text in texts.values():
        current = ""
        for block in re.split(r"\n\s*\n", text):
            current = f"{current}\n\n{block}" if current else block
            if len(current) >= PASSAGE_CHARS:
                out.append({"text": current})
                current = ""
        if current.strip():
            out.append({"text": current})
    return out


def passkey_items(texts: dict[str, str], length: int, tokenizer: Tokenizer, rng: random.Random):
    """PASSKEY_TRIALS prompts of exactly length - ANSWER_ROOM tokens (bos included)."""
    filler = tokenizer.encode("\n\n".join(texts.values()))
    question = QUESTION
    items = []
    while len(items) < PASSKEY_TRIALS:
        key = str(rng.randrange(10_000, 100_000))
        depth = len(items) % 5 / 4  # 0, 0.25, ..., 1
        needle = NEEDLE.format(key=key)
        start = rng.randrange(0, len(filler) - length)
        room = length - ANSWER_ROOM - 1 - len(tokenizer.encode(needle + question))
        for _ in range(10):  # token counts of the joined text differ a little from the parts'
            cut = round(depth * room)
            prompt = (
                tokenizer.decode(filler[start : start + cut])
                + needle
                + tokenizer.decode(filler[start + cut : start + room])
                + question
            )
            size = 1 + len(tokenizer.encode(prompt))
            if size == length - ANSWER_ROOM:
                items.append({"prompt": prompt, "answer": key, "depth": depth, "tokens": size})
                break
            room += length - ANSWER_ROOM - size
    return items


def build(out: pathlib.Path) -> dict[str, int]:
    """Writes every task file into `out`; file name -> documents written."""
    texts = held_out_texts()
    tokenizer = Tokenizer()
    files = {
        "cloze.jsonl": cloze_items(texts, random.Random(0)),
        "perplexity.jsonl": passages(texts),
    }
    for length in PASSKEY_LENGTHS:
        files[f"passkey_{length}.jsonl"] = passkey_items(
            texts, length, tokenizer, random.Random(length)
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    out = pathlib.Path(flags.FLAGS.out)
    for name, count in build(out).items():
        print(f"{out / name}: {count} documents")
    sys.exit(0)


if __name__ == "__main__":
    flags.DEFINE_string("out", str(TASKS_DIR), "Directory to write the task JSONL files into.")
    app.run(main)
