"""The shipped post-training data, made from the shipped corpus (real text, an artificial task):

    python -m data.post_training_set --out=data/post_training

For each section of the Python docs (an RST heading) whose first paragraph is plain prose:
    sft_{split}.jsonl         {"prompt": heading, "response": the section's first paragraph}
    preference_{split}.jsonl  {"prompt": heading, "chosen": that paragraph, "rejected": ...}
where rejected is the true paragraph with its sentences shuffled when it has two or more (the
same tokens in another order), else the first paragraph of another section of the same split.
Paragraphs of 80-320 characters are kept, so a pair fits seq_len=128. The splits are the corpus's
(data.text_corpus.split_files: a document's sections are all train or all validation). The output
is a pure function of the corpus and `seed`.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

UNDERLINE = re.compile(r"^([=\-~^*\"#+`'])\1{2,}\s*$")
ROLE = re.compile(r":[\w:.-]+:`(?:([^`<]*?)\s*<[^`>]*>|([^`]*))`")  # :role:`text <target>`
LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_+")  # `text <url>`_, `text`_
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
MIN_CHARS, MAX_CHARS = 80, 320  # first paragraphs kept
MAX_PER_SPLIT = {"train": 400, "validation": 120}  # sections kept, in corpus order after a shuffle


def plain(text: str) -> str:
    """RST markup reduced to its text: roles to their titles, ``code`` to code, **x** to x."""
    text = LINK.sub(r"\1", text)
    text = ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").strip("~!"), text)
    text = text.replace("``", "").replace("**", "")
    return " ".join(text.split())


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, first paragraph) of each RST section of `text` whose first block of text after
    the heading is a prose paragraph (not a directive, list, table, code or quote)."""
    lines = text.split("\n")
    out = []
    for i in range(1, len(lines) - 1):
        title, rule = lines[i].strip(), lines[i + 1]
        if not title or not UNDERLINE.match(rule) or len(rule.strip()) < len(title):
            continue
        if lines[i].startswith((" ", "..")) or UNDERLINE.match(lines[i]):
            continue
        paragraph, j = [], i + 2
        while j < len(lines) and not lines[j].strip():
            j += 1
        while j < len(lines) and lines[j].strip() and not lines[j].startswith(" "):
            paragraph.append(lines[j])
            j += 1
        body = "\n".join(paragraph)
        if not paragraph or UNDERLINE.match(paragraph[-1]) or body.startswith(("..", "*", "-")):
            continue
        if "::" in body or "|" in body or "**Source code:**" in body:
            continue
        heading, first = plain(title), plain(body)
        if heading and MIN_CHARS <= len(first) <= MAX_CHARS:
            out.append((heading, first))
    return out


def _shuffled_sentences(paragraph: str, rng: np.random.Generator) -> str | None:
    sentences = SENTENCE_END.split(paragraph)
    if len(sentences) < 2:
        return None
    for _ in range(10):
        order = rng.permutation(len(sentences))
        if list(order) != sorted(order):
            return " ".join(sentences[k] for k in order)
    return None


def build(corpus: pathlib.Path, seed: int = 0) -> dict[str, list[dict]]:
    """file name -> records of the four files."""
    from data.text_corpus import list_files, split_files  # imports tensorflow_datasets

    files = {p.relative_to(corpus).as_posix(): p for p in list_files(corpus, "**/*.rst.txt")}
    out = {}
    for split, names in split_files(sorted(files)).items():
        rng = np.random.default_rng([seed, split == "validation"])
        pairs = [s for name in names for s in sections(files[name].read_text(encoding="utf-8"))]
        keep = sorted(rng.permutation(len(pairs))[: MAX_PER_SPLIT[split]])
        pairs = [pairs[k] for k in keep]
        sft, preference = [], []
        for k, (heading, paragraph) in enumerate(pairs):
            sft.append({"prompt": heading, "response": paragraph})
            rejected = _shuffled_sentences(paragraph, rng)
            while rejected is None or rejected == paragraph:
                rejected = pairs[int(rng.integers(len(pairs)))][1]
            preference.append({"prompt": heading, "chosen": paragraph, "rejected": rejected})
        out[f"sft_{split}.jsonl"], out[f"preference_{split}.jsonl"] = sft, preference
    return out


def write(records: dict[str, list[dict]], out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / name).write_text(text, encoding="utf-8")


def main() -> None:
    """Command line entry point; flags are defined here so importing this module adds none."""
    from absl import app, flags

    from data.text_corpus import SHIPPED_CORPUS

    flags.DEFINE_string("out", "data/post_training", "Output directory.")
    flags.DEFINE_string("corpus_dir", str(SHIPPED_CORPUS), "Directory of .rst.txt files.")
    flags.DEFINE_integer("seed", 0, "Which sections are kept and how rejected ones are drawn.")

    def run(argv: list[str]) -> None:
        del argv
        f = flags.FLAGS
        records = build(pathlib.Path(f.corpus_dir), f.seed)
        write(records, pathlib.Path(f.out))
        print(", ".join(f"{name}: {len(rows)}" for name, rows in records.items()))

    app.run(run)


if __name__ == "__main__":
    main()
