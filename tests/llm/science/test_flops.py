"""llm.science.flops: parameter and FLOP counts against hand counts, per attention pattern."""

import dataclasses

import pytest

from llm.model.config import ModelConfig
from llm.science import flops

CFG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64
)


def test_flops_match_hand_count():
    cfg = ModelConfig(
        vocab_size=10, num_layers=1, embed_dim=8, num_heads=2, num_kv_heads=1, mlp_dim=16
    )
    # head_dim 4: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; SwiGLU 3 x 8x16 = 384; 2 norms of 8.
    assert flops.param_counts(cfg) == {
        "total": 80 + 192 + 384 + 16 + 8,  # tied embedding + layer + final norm
        "embedding": 80,
        "non_embedding": 192 + 384 + 16 + 8,
        "active": 80 + 192 + 384 + 16 + 8,  # a dense model uses every parameter per token
        "matmul": 192 + 384 + 80,  # the tied output projection is a matmul
    }
    # 6 N_matmul + 12 L H Dh (attended pairs / T): causal T = 5 attends 5·6/2 = 15 pairs.
    assert flops.train_flops_per_token(cfg, 5) == 6 * 656 + 12 * 1 * 2 * 4 * 15 / 5


def test_train_flops_count_each_layers_pairs():
    cfg = dataclasses.replace(
        CFG, num_layers=4, attention_pattern="sliding*3,dense", attention_window=5
    )
    seq = 20
    sliding = sum(min(5, t + 1) for t in range(seq))  # keys within the window, causal
    pairs = 3 * sliding + seq * (seq + 1) // 2
    per_pair = 12 * cfg.num_heads * cfg.head_dim
    expected = 6 * flops.param_counts(cfg)["matmul"] + per_pair * pairs / seq
    assert flops.train_flops_per_token(cfg, seq) == pytest.approx(expected, rel=1e-12)
    # A window covering the sequence costs exactly what dense does.
    wide = dataclasses.replace(CFG, attention_pattern="sliding", attention_window=seq)
    assert flops.train_flops_per_token(wide, seq) == flops.train_flops_per_token(CFG, seq)
