"""Our lm-eval backend on a small random Hugging Face Llama (tests/llm/conftest.py, loaded
by llm.hf) scores the shipped tasks as lm-eval's own `hf` backend (torch) does, per document
within 1e-4: multiple-choice log-likelihoods (long ones truncated from the left) and rolling
perplexity over several windows."""

import pytest

from llm.evaluate import harness_model
from llm.harness import run

MAX_LENGTH = 128  # the perplexity passages span several windows


def _results(lm, tasks, limit):
    return run.evaluate(lm, tasks, limit=limit, bootstrap_iters=0, log_samples=True)


def test_scores_equal_lm_evals_hf_backend(llama_dir):
    from lm_eval.models.huggingface import HFLM

    tasks = ["llm_lab_cloze", "llm_lab_perplexity"]
    ours = _results(harness_model(hf_dir=str(llama_dir), max_length=MAX_LENGTH), tasks, 6)
    theirs = _results(
        HFLM(pretrained=str(llama_dir), batch_size=8, max_length=MAX_LENGTH, device="cpu"),
        tasks,
        6,
    )
    for task in tasks:
        ours_docs, their_docs = ours["samples"][task], theirs["samples"][task]
        assert len(ours_docs) == len(their_docs) > 0
        for a, b in zip(ours_docs, their_docs, strict=True):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            got = [r[0][0] if isinstance(r[0], (tuple, list)) else r[0] for r in a["resps"]]
            want = [r[0][0] if isinstance(r[0], (tuple, list)) else r[0] for r in b["resps"]]
            # A rolling total sums ~500 tokens of ~-20 in float32 on the torch side: rounding
            # of ~1e-4 there, so relative 1e-6 (a per-token agreement far inside 1e-4).
            tolerance = {"abs": 1e-4} if task == "llm_lab_cloze" else {"rel": 1e-6}
            assert got == pytest.approx(want, **tolerance), task
    cloze = ours["results"]["llm_lab_cloze"]
    assert cloze["acc,none"] == theirs["results"]["llm_lab_cloze"]["acc,none"]
    perplexity = ours["results"]["llm_lab_perplexity"]["word_perplexity,none"]
    want = theirs["results"]["llm_lab_perplexity"]["word_perplexity,none"]
    assert perplexity == pytest.approx(want, rel=1e-4)
