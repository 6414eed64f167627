"""Mixed precision shared by training and evaluation.

Owns the one map from the config's ``amp`` names to autocast dtypes and the autocast context
built from it. It does not own loss scaling (the trainer's ``GradScaler``) nor the fp32 rule of
the classifier (:mod:`dist_train.partial_fc` computes cosines and the softmax in fp32).
"""

from __future__ import annotations

import contextlib

import torch

from dist_train.config import AMP_MODES

AMP_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(AMP_MODES, (None, torch.bfloat16, torch.float16), strict=True)
)


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` name (``None`` for full precision)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to the dtype of ``amp`` on ``device``'s type; a no-op for ``"none"``."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
