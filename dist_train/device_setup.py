"""The device a run trains on and the backend settings it trains with.

Owns: what "GPUs were requested" means and the fast failure when torch cannot give them
(:func:`gpu_request`, :func:`resolve_device_type`), the process-wide backend flags a run sets
at start (TF32 for fp32 matmuls and convolutions, ``cudnn.benchmark``; :func:`backend_flags`
decides, :func:`apply_backend_flags` sets) and the line describing the device, backend, GPU and
NCCL version that the trainer logs at start (:func:`describe_device`). Does not own the process
group (:mod:`dist_train.distributed` calls :func:`resolve_device_type` before creating it) nor
precision choices inside the step (autocast dtype: :mod:`dist_train.precision`).

GPUs count as *requested* when ``device: cuda`` is configured, or, with ``device: auto``,
when the launcher gave this process GPUs: ``CUDA_VISIBLE_DEVICES`` names devices (set and not
empty, ``-1`` or ``NoDevFiles``), or Slurm allocated them (``SLURM_JOB_GPUS``,
``SLURM_STEP_GPUS``, or ``SLURM_GPUS_ON_NODE`` above 0). Requested GPUs that torch cannot see
(a CPU build of torch, a driver mismatch) stop the run before the process group is created,
instead of training on CPU silently. ``device: cpu`` trains on CPU whatever is visible.

TF32 (``tf32: true``, the default) lets fp32 matmuls and convolutions on CUDA round their inputs
to TF32 (10-bit mantissa) and accumulate in fp32; on tensor-core GPUs that is what makes the
classifier's cosine GEMMs (``[B_global, D] x [D, C_sampled]``) fast. It changes only matmuls
and convolutions: the margin, the softmax and the cross-entropy are elementwise fp32 and stay
fp32 bit for bit. ``tf32: false`` keeps strict IEEE fp32 everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from core.errors import ConfigError
from dist_train.config import DEVICE_CHOICES

GPU_ALLOCATION_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPUS_ON_NODE",
)
"""Launcher variables that, set to a non-empty device list, say this process was given GPUs."""

_NO_DEVICES = ("", "-1", "NoDevFiles", "none")


class DeviceUnavailableError(ConfigError):
    """GPUs were requested but torch has no CUDA device; the message names what asked."""


def gpu_request(device: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Why GPUs count as requested, or None when they are not.

    Args:
        device: the config's ``device`` (``"auto"``, ``"cuda"`` or ``"cpu"``).
        environ: the process environment (default ``os.environ``).

    Returns:
        A phrase naming the config key or the launcher variable, e.g.
        ``"CUDA_VISIBLE_DEVICES=0,1"``; None for ``device: cpu`` or no GPU allocation.
    """
    env = os.environ if environ is None else environ
    if device == "cuda":
        return "device: cuda in the config"
    if device == "cpu":
        return None
    for name in GPU_ALLOCATION_VARS:
        value = env.get(name, "").strip()
        if value in _NO_DEVICES:
            continue
        if name == "SLURM_GPUS_ON_NODE" and not (value.isdigit() and int(value) > 0):
            continue
        return f"{name}={value}"
    return None


def resolve_device_type(
    device: str, cuda_available: bool, environ: Mapping[str, str] | None = None
) -> str:
    """``"cuda"`` or ``"cpu"`` for this process; raises when requested GPUs are missing.

    Args:
        device: the config's ``device``.
        cuda_available: ``torch.cuda.is_available()`` (a parameter so tests can decide).
        environ: the process environment (default ``os.environ``).

    Raises:
        ConfigError: ``device`` is not one of :data:`DEVICE_CHOICES`.
        DeviceUnavailableError: GPUs were requested (see the module doc) and there is no CUDA.
    """
    if device not in DEVICE_CHOICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    reason = gpu_request(device, environ)
    if reason is not None:
        raise DeviceUnavailableError(
            f"GPUs were requested ({reason}) but torch {torch.__version__} sees no CUDA device "
            "(a CPU build of torch, or no usable driver); install a CUDA build of torch, or "
            "set device=cpu to train on CPU"
        )
    return "cpu"


def backend_flags(device_type: str, *, tf32: bool, deterministic: bool) -> dict[str, object]:
    """The process-wide backend settings for a run on ``device_type`` (none on CPU).

    Keys: ``matmul_fp32_precision`` and ``conv_fp32_precision`` (``"tf32"`` or ``"ieee"``),
    ``cudnn_benchmark`` (autotuned convolution algorithms; off when ``deterministic``, whose
    algorithm choice must not depend on timing) and ``cudnn_deterministic``.
    """
    if device_type != "cuda":
        return {}
    precision = "tf32" if tf32 else "ieee"
    return {
        "matmul_fp32_precision": precision,
        "conv_fp32_precision": precision,
        "cudnn_benchmark": not deterministic,
        "cudnn_deterministic": deterministic,
    }


def apply_backend_flags(flags: Mapping[str, object]) -> None:
    """Sets what :func:`backend_flags` decided (process-wide).

    Uses the ``fp32_precision`` interface where torch has it (mixing it with the older
    ``allow_tf32`` flags is an error in those releases), else ``allow_tf32``.
    """
    if "matmul_fp32_precision" in flags:
        precision = str(flags["matmul_fp32_precision"])
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = precision
        else:  # torch releases before the fp32_precision interface
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if "conv_fp32_precision" in flags:
        precision = str(flags["conv_fp32_precision"])
        if hasattr(torch.backends.cudnn, "conv") and hasattr(
            torch.backends.cudnn.conv, "fp32_precision"
        ):
            torch.backends.cudnn.conv.fp32_precision = precision
        else:
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if "cudnn_benchmark" in flags:
        torch.backends.cudnn.benchmark = bool(flags["cudnn_benchmark"])
    if "cudnn_deterministic" in flags:
        torch.backends.cudnn.deterministic = bool(flags["cudnn_deterministic"])


def describe_device(device: torch.device, world_size: int = 1) -> str:
    """One line: device, process-group backend, GPU name and memory, CUDA and NCCL versions."""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    parts = [f"device {device}", f"backend {backend}", f"world size {world_size}"]
    parts.append(f"torch {torch.__version__}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(
            f"GPU {props.name} ({props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor})"
        )
        parts.append(f"CUDA {torch.version.cuda}")
        nccl = nccl_version()
        if nccl:
            parts.append(f"NCCL {nccl}")
    else:
        parts.append("CUDA " + ("available but not used" if torch.cuda.is_available() else "none"))
    return ", ".join(parts)


def nccl_version() -> str:
    """The NCCL version torch was built with (``"2.21.5"``), or ``""`` without NCCL."""
    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return ""
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
