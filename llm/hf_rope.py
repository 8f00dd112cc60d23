"""RoPE in a Hugging Face config.json <-> our rope_theta, RopeScaling and rope_local_theta.

transformers >= 5 writes `rope_parameters` (Gemma 3: one per layer type, "full_attention" and
"sliding_attention"); before, `rope_theta`, `rope_scaling` and Gemma's `rope_local_base_freq`.
Dynamic NTK's original length is max_position_embeddings; the others name it
original_max_position_embeddings. YaRN's mscale/mscale_all_dim become an explicit
attention_factor.
"""

from __future__ import annotations

import math

from llm.errors import ConfigError, check
from llm.model.config import ModelConfig, RopeScaling


def _one_rope(hf: dict, rope: dict, theta: float) -> tuple[float, RopeScaling, int | None]:
    """rope_theta, our RopeScaling and, for dynamic NTK, the max_seq_len to allow, from the RoPE
    parameters `rope` of a config.json (`theta` where they lack rope_theta)."""
    theta = float(rope.get("rope_theta") or theta)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind == "default":
        return theta, RopeScaling(), None
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError(
            f"rope_scaling type {kind!r} (config.json rope_parameters.rope_type) is not "
            "implemented: llm.model.layers supports default, linear, dynamic, yarn and llama3."
        )
    fields = {"type": kind, "factor": rope.get("factor")}
    if kind == "dynamic":  # transformers scales beyond max_position_embeddings
        fields["original_max_position"] = max_pos
    else:
        fields["original_max_position"] = rope.get("original_max_position_embeddings", max_pos)
    if kind == "llama3":
        fields |= {k: rope[k] for k in ("low_freq_factor", "high_freq_factor") if k in rope}
    if kind == "yarn":
        if fields["factor"] is None:
            fields["factor"] = max_pos / fields["original_max_position"]
        fields |= {k: rope[k] for k in ("beta_fast", "beta_slow") if rope.get(k)}
        fields["truncate"] = rope.get("truncate", True)
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        factor = rope.get("attention_factor")
        if factor is None and mscale and mscale_all:  # DeepSeek's ratio of two mscales

            def get_mscale(m: float) -> float:
                return 0.1 * m * math.log(fields["factor"]) + 1.0 if fields["factor"] > 1 else 1.0

            factor = get_mscale(mscale) / get_mscale(mscale_all)
        fields["attention_factor"] = factor
    if fields["factor"] is None:
        raise ConfigError(f"config.json rope_parameters of type {kind!r} lacks its 'factor'.")
    scaling = RopeScaling(**fields)
    return theta, scaling, int(max_pos * scaling.factor) if kind == "dynamic" else None


def rope_from_hf(hf: dict, kind: str) -> tuple[float, RopeScaling, int | None, float | None]:
    """_rope_from_hf's values and Gemma 3's local RoPE base (transformers >= 5: rope_parameters,
    for Gemma nested by layer type; before: rope_theta, rope_scaling, rope_local_base_freq)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or 10_000.0
    if kind != "gemma3_text":
        return *_one_rope(hf, rope, theta), None
    if "full_attention" not in rope:  # a config.json of transformers < 5
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        rope = {"full_attention": rope, "sliding_attention": local}
    local = rope.get("sliding_attention") or {}
    check(
        (local.get("rope_type") or local.get("type") or "default") == "default",
        f"config.json rope_parameters.sliding_attention {local}: local layers with scaled RoPE "
        "are not implemented.",
    )
    theta, scaling, dynamic_len = _one_rope(hf, rope.get("full_attention") or {}, theta)
    return theta, scaling, dynamic_len, float(local.get("rope_theta") or 10_000.0)


def rope_to_hf(cfg: ModelConfig) -> dict:
    """The rope_parameters of `cfg` (its global layers', for Gemma 3)."""
    s, theta = cfg.rope_scaling, cfg.rope_theta
    if s.type == "none":
        return {"rope_type": "default", "rope_theta": theta}
    rope = {"rope_type": s.type, "rope_theta": theta, "factor": s.factor}
    if s.type != "dynamic":  # dynamic's original length is max_position_embeddings
        rope["original_max_position_embeddings"] = s.original_max_position
    if s.type == "llama3":
        rope |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    if s.type == "yarn":
        rope |= {"beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
        if s.attention_factor is not None:
            rope["attention_factor"] = float(s.attention_factor)
    return rope
