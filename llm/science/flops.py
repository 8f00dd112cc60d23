"""FLOP and parameter accounting, shared by MFU, benchmarks and scaling fits.

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6·N for the matmul
parameters N (forward 2·N, backward 4·N) plus attention scores and values: 12·H·Dh per attended
(query, key) pair (q·k and p·v are 2·Dh each per head forward, backward twice forward).

Attention counts the pairs each layer's pattern really allows (llm.model.patterns), exactly: a causal
dense layer over T tokens attends T(T+1)/2 pairs, i.e. 12·H·Dh·(T+1)/2 per token, half of PaLM's
12·H·Dh·T (PaLM counts the full square even for causal models). Counting only allowed pairs, as
FlashAttention and MaxText do, keeps dense and sparse layers comparable: a sliding window of
W >= T costs exactly what dense does. Kernels also compute masked entries of partial blocks;
those are not useful FLOPs and are not counted.
"""

from __future__ import annotations

import jax

from llm.model import patterns
from llm.model.config import ModelConfig

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
    # Norm scales (pre, post, q/k) and qkv biases are parameters but not matmuls.
    norms = (2 + 2 * cfg.post_norms) * d + cfg.qk_norm * 2 * dh
    norms += cfg.qkv_bias * dh * (cfg.num_heads + 2 * cfg.num_kv_heads)
    expert = 3 * d * m.expert_mlp_dim
    moe_layers = sum(m.is_moe_layer(i) for i in range(cfg.num_layers))
    shared_gate = d if m.shared_expert_gate else 0  # [D, 1]
    router_and_shared = d * m.num_experts + m.num_shared_experts * expert + shared_gate
    moe_mlp = router_and_shared + m.num_experts * expert
    moe_active = router_and_shared + m.top_k * expert
    dense_layers = cfg.num_layers - moe_layers
    # A learned-sparse ("nsa") layer adds its gates [D, H, 3] and the K/V compressions
    # [block, Dh, Dh]; per token a compression costs as much as a [Dh, Dh] matmul per kv head.
    nsa_layers = cfg.layer_patterns.count("nsa")
    gates = d * cfg.num_heads * 3
    nsa_params = gates + 2 * cfg.attention_nsa_block * dh * dh
    nsa_matmul = gates + 2 * cfg.num_kv_heads * dh * dh
    embedding = cfg.vocab_size * d
    unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    total = (
        embedding
        + cfg.num_layers * (attn + norms)
        + nsa_layers * nsa_params
        + dense_layers * mlp
        + moe_layers * moe_mlp
        + d
        + unembed
    )
    active = total - moe_layers * (moe_mlp - moe_active)
    # Norm scales are not matmuls; the output projection is, tied or not.
    matmul = (
        cfg.num_layers * attn
        + nsa_layers * nsa_matmul
        + dense_layers * mlp
        + moe_layers * moe_active
        + d * cfg.vocab_size
    )
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "active": active,
        "matmul": matmul,
    }


def attention_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """Per layer, forward + backward attention FLOPs of one sequence of seq_len tokens."""
    return tuple(
        12 * cfg.num_heads * cfg.head_dim * pairs for pairs in patterns.visible_pairs(cfg, seq_len)
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6·N plus each layer's attended pairs."""
    attention = sum(attention_flops_per_sequence(cfg, seq_len)) / seq_len
    return 6 * param_counts(cfg)["matmul"] + attention


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward-only FLOPs per token (a frozen teacher's, in distillation): 2·N plus 4·H·Dh per
    attended pair, a third of `train_flops_per_token`."""
    return train_flops_per_token(cfg, seq_len) / 3


def steps_for_budget(cfg: ModelConfig, budget: float, batch_size: int, seq_len: int) -> int:
    """The whole training steps of batch_size x seq_len tokens that `budget` FLOPs buy."""
    return int(budget / (train_flops_per_token(cfg, seq_len) * batch_size * seq_len))


def peak_flops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where unknown (CPUs: MFU is n/a)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None
