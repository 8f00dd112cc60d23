"""FLOP and parameter accounting, shared by MFU, benchmarks and scaling fits.

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6·N for the matmul
parameters N (forward 2·N, backward 4·N) plus attention scores and values: 12·H·Dh per attended
(query, key) pair (q·k and p·v are 2·Dh each per head forward, backward twice forward).

Attention counts the pairs each layer's pattern really allows (llm.sparse), exactly: a causal
dense layer over T tokens attends T(T+1)/2 pairs, i.e. 12·H·Dh·(T+1)/2 per token, half of PaLM's
12·H·Dh·T (PaLM counts the full square even for causal models). Counting only allowed pairs, as
FlashAttention and MaxText do, keeps dense and sparse layers comparable: a sliding window of
W >= T costs exactly what dense does. Kernels also compute masked entries of partial blocks;
those are not useful FLOPs and are not counted.
"""

from __future__ import annotations

import jax

from llm import sparse
from llm.model import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, embedding (input table), and matmul (everything multiplied per token)."""
    d, dh = cfg.embed_dim, cfg.head_dim
    attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.mlp_dim
    norms = 2 * d
    per_layer = attn + mlp + norms
    embedding = cfg.vocab_size * d
    unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    total = embedding + cfg.num_layers * per_layer + d + unembed
    # Norm scales are not matmuls; the output projection is, tied or not.
    matmul = cfg.num_layers * (attn + mlp) + d * cfg.vocab_size
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "matmul": matmul,
    }


def attention_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """Per layer, forward + backward attention FLOPs of one sequence of seq_len tokens."""
    return tuple(
        12 * cfg.num_heads * cfg.head_dim * pairs for pairs in sparse.visible_pairs(cfg, seq_len)
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6·N plus each layer's attended pairs."""
    attention = sum(attention_flops_per_sequence(cfg, seq_len)) / seq_len
    return 6 * param_counts(cfg)["matmul"] + attention


def peak_flops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where unknown (CPUs: MFU is n/a)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None
