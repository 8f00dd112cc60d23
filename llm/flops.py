"""FLOP and parameter accounting, shared by MFU, benchmarks and scaling fits.

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6·N for the matmul
parameters N (forward 2·N, backward 4·N) plus 12·L·H·Dh·T for attention scores and values over a
context of T tokens (the full square, as PaLM counts it, also for causal models).
"""

from __future__ import annotations

import jax

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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (PaLM appendix B)."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
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
