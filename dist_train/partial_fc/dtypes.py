"""Storage precision of the Partial FC shard.

Owns the weight dtypes a shard may be stored in, the dtype its maths and optimizer state use
(:func:`master_dtype`), and the unbiased rounding of fp32 updates into bf16 storage
(:func:`stochastic_round_bf16`). Does not own the maths or the optimizer that use them.
"""

from __future__ import annotations

import torch

WEIGHT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Storage dtypes of the shard, by config name (float64 for tests)."""


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The storage dtype named by ``dtype`` (a name of :data:`WEIGHT_DTYPES` or a dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in WEIGHT_DTYPES.values():
            raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {dtype}")
        return dtype
    try:
        return WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {dtype!r}"
        ) from None


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the maths and of the optimizer state: fp32, or fp64 for fp64 weights."""
    return torch.promote_types(dtype, torch.float32)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 rounding up or down with probability given by the distance (unbiased).

    Small optimizer updates (lr·g far below bf16's 8-bit mantissa) would otherwise round to
    nothing every step; stochastic rounding keeps their expected value.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    # Adding to the integer view rounds the magnitude; masking drops the 16 bits bf16 lacks,
    # so the final cast is exact.
    return torch.bitwise_and(bits + noise, -65536).view(torch.float32).to(torch.bfloat16)
