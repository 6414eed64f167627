"""Storage precision of class-sharded rows (Partial FC shard, its optimizer rows, centres).

Owns the dtypes a shard and its optimizer state may be stored in (:data:`WEIGHT_DTYPES`,
:func:`as_dtype`), the dtype their maths use (:func:`master_dtype`), which optimizer state may
be fp16 (:func:`check_state_dtype`), and the unbiased rounding of fp32 results into half
storage (:func:`stochastic_round_bf16`, :func:`stochastic_round_fp16`, :func:`store_rounded`).
Does not own the maths or the optimizer that use them.

Why half storage is safe where it is allowed:

- bf16 has fp32's exponent range: weights, SGD momentum and Adam's moments all fit; only the
  8-bit mantissa is short, and stochastic rounding keeps every update's expected value.
- fp16 has 11 bits of mantissa but a range of 6·10⁻⁸ … 65504. Weights: the cosine normalises
  each row, so only the ratio of a row's elements matters; rows start at N(0, 0.01²) and
  weight decay shrinks them slowly, far from both ends. SGD momentum is bounded by
  ``max|g| / (1 − μ)``; the optimizer checks that bound at every step (one host read) and
  raises rather than train on with an inf. Adam's second moment ``v ≈ g²`` is refused in fp16:
  a sampled negative row's gradient is ~10⁻⁴ per element at initialisation (measured: median
  2·10⁻⁴ at s = 64, N = 256) and smaller later, so ``g²`` (≤ 4·10⁻⁸) falls below fp16's
  smallest subnormal (6·10⁻⁸) and ``m / √v`` would divide by a rounded-away zero.
"""

from __future__ import annotations

import torch

WEIGHT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Storage dtypes of a shard or its optimizer rows, by config name (float64 for tests)."""

FP16_PIECE = 1 << 20
"""Values :func:`stochastic_round_fp16` rounds at once (its temporaries are ~4 MB each)."""
FP16_MAX = float(torch.finfo(torch.float16).max)
"""Largest finite fp16 value (65504): the bound fp16 momentum is checked against."""


def as_dtype(dtype: torch.dtype | str, key: str = "weight_dtype") -> torch.dtype:
    """The storage dtype named by ``dtype`` (a name of :data:`WEIGHT_DTYPES` or a dtype).

    Raises:
        ValueError: naming ``key``, for anything else.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in WEIGHT_DTYPES.values():
            raise ValueError(f"{key} must be one of {list(WEIGHT_DTYPES)}, got {dtype}")
        return dtype
    try:
        return WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"{key} must be one of {list(WEIGHT_DTYPES)}, got {dtype!r}") from None


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the maths: fp32, or fp64 for fp64 storage."""
    return torch.promote_types(dtype, torch.float32)


def check_state_dtype(state_dtype: torch.dtype, optimizer: str, key: str = "state_dtype") -> None:
    """Raises ``ValueError`` (naming ``key``) for optimizer state that fp16 cannot hold.

    fp16 is allowed for SGD momentum only (its range is checked every step); Adam/AdamW's
    second moment underflows fp16 (see the module docstring): use bfloat16.
    """
    if state_dtype == torch.float16 and optimizer in ("adam", "adamw"):
        raise ValueError(
            f"{key}=float16 is refused for {optimizer}: its second moment (g² ≈ 1e-8 … 1e-12) "
            "underflows fp16; use bfloat16"
        )


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 rounding up or down with probability given by the distance (unbiased).

    Small optimizer updates (lr·g far below bf16's 8-bit mantissa) would otherwise round to
    nothing every step; stochastic rounding keeps their expected value.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    # Adding to the integer view rounds the magnitude; masking drops the 16 bits bf16 lacks,
    # so the final cast is exact. In place in the noise: one temporary besides the result.
    return noise.add_(bits).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def stochastic_round_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → fp16 rounding to one of the two neighbouring fp16 values, unbiased.

    The nearest fp16 value ``r`` and its neighbour on the other side of ``x`` are chosen with
    probabilities that make the expectation ``x`` exactly (subnormals included, so values far
    below fp16's normal range keep their expected value too). Values beyond ±65504 become ±inf.
    """
    flat = x.float().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float16, device=x.device)
    inf = torch.tensor(float("inf"), dtype=torch.float16, device=x.device)
    # Pieces of 2^20 values bound the half-dozen temporaries to a few MB each.
    for a in range(0, flat.numel(), FP16_PIECE):
        v = flat[a : a + FP16_PIECE]
        r = v.to(torch.float16)
        err = v - r.float()
        other = torch.nextafter(r, torch.where(err >= 0, inf, -inf))
        # |err| ≤ half the gap, so p ∈ [0, 0.5]; an inf gap (r = ±65504 or inf) gives p = 0
        # or NaN (never taken): overflow stays the nearest value.
        p = err.abs_().div_(other.float().sub_(r.float()).abs_())
        torch.where(torch.rand_like(v) < p, other, r, out=out[a : a + FP16_PIECE])
    return out.view(x.shape)


def store_rounded(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = True) -> torch.Tensor:
    """``x`` (maths dtype) as ``dtype`` storage: stochastic rounding into bf16/fp16, else a cast."""
    if stochastic and dtype == torch.bfloat16 and x.dtype == torch.float32:
        return stochastic_round_bf16(x)
    if stochastic and dtype == torch.float16 and x.dtype == torch.float32:
        return stochastic_round_fp16(x)
    return x.to(dtype)
