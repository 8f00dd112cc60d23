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
    """Parameter counts: total, embedding (input table), active (those a token uses: of an MoE
    layer the router, top_k routed and the shared experts) and matmul (the active ones multiplied
    per token). MFU and scaling fits use matmul."""
    d, dh, m = cfg.embed_dim, cfg.head_dim, cfg.moe
    attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.mlp_dim
    norms = 2 * d
    expert = 3 * d * m.expert_mlp_dim
    moe_layers = sum(m.is_moe_layer(i) for i in range(cfg.num_layers))
    shared_gate = d if m.shared_expert_gate else 0  # [D, 1]
    router_and_shared = d * m.num_experts + m.num_shared_experts * expert + shared_gate
    moe_mlp = router_and_shared + m.num_experts * expert
    moe_active = router_and_shared + m.top_k * expert
    dense_layers = cfg.num_layers - moe_layers
    embedding = cfg.vocab_size * d
    unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    total = (
        embedding
        + cfg.num_layers * (attn + norms)
        + dense_layers * mlp
        + moe_layers * moe_mlp
        + d
        + unembed
    )
    active = total - moe_layers * (moe_mlp - moe_active)
    # Norm scales are not matmuls; the output projection is, tied or not.
    matmul = (
        cfg.num_layers * attn + dense_layers * mlp + moe_layers * moe_active + d * cfg.vocab_size
    )
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "active": active,
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
