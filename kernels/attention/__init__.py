"""Attention: public API, mask descriptions, reference and kernel backends."""

from kernels.attention.api import IMPLEMENTATIONS, UnsupportedError, attention
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mask_info import MaskInfo, mask_info
from kernels.attention.masks import (
    BlockSparseMask,
    CausalMask,
    ChunkedMask,
    Intersection,
    LocalGlobalMask,
    Mask,
    SlidingWindowMask,
    StridedMask,
    Union,
)
from kernels.attention.reference import attention_reference, attention_reference_with_lse

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "BlockSparseMask",
    "CausalMask",
    "ChunkedMask",
    "Intersection",
    "LocalGlobalMask",
    "Mask",
    "MaskInfo",
    "SlidingWindowMask",
    "StridedMask",
    "Union",
    "UnsupportedError",
    "attention",
    "attention_reference",
    "attention_reference_with_lse",
    "default_block_sizes",
    "mask_info",
]
