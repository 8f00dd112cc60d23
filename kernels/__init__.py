"""Accelerator kernels. Imports jax/numpy only."""

from kernels.attention import (
    BlockSizes,
    BlockSparseMask,
    CausalMask,
    Intersection,
    LocalGlobalMask,
    Mask,
    SlidingWindowMask,
    StridedMask,
    Union,
    UnsupportedError,
    attention,
)

__all__ = [
    "BlockSizes",
    "BlockSparseMask",
    "CausalMask",
    "Intersection",
    "LocalGlobalMask",
    "Mask",
    "SlidingWindowMask",
    "StridedMask",
    "Union",
    "UnsupportedError",
    "attention",
]
