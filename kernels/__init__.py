"""Attention kernels: pure functions, no Flax.

Public surface: `attention` (the one entry point), `MaskSpec` (the static
mask pattern) and `BlockSizes` (static tile sizes).
"""

from kernels.flash_attention.vjp import BlockSizes
from kernels.masks import MaskSpec
from kernels.ops import attention

__all__ = ["attention", "MaskSpec", "BlockSizes"]
