"""The compiled SGD row update of the Partial FC optimizer on CPU.

Owns building, caching and calling ``rows.c`` (beside this file): SGD with momentum on a
shard's rows, fused gather + update + scatter, in fp32 or bf16 storage with stochastic
rounding. On CPU the torch path moves each sampled row through an index twice (gather into a
chunk buffer, scatter back) and runs several elementwise passes; this kernel reads and writes
each row once, which puts the sparse step within about 1.5x of streaming the same bytes
contiguously (``benchmarks/partial_fc.py --ratios-only``, docs/bench_partial_fc.md).

The C source uses no Python or torch headers: one call of the C compiler (``$CC``, else
``cc``; well under a second) builds a shared library into a per-user cache (``$DIST_TRAIN_CACHE``,
else ``$XDG_CACHE_HOME/dist_train``, else ``~/.cache/dist_train``), named by the hash of the
source, the flags and the compiler, written to a temporary name and renamed (concurrent ranks
never see a partial file and need no lock); it is loaded with :mod:`ctypes`, which releases
the GIL during the call, so a step with several intra-op threads splits its rows over a thread
pool. Where no compiler is found or the build fails, :func:`sgd_step` returns ``False`` (with
one warning per process) and the optimizer takes its torch path; ``DIST_TRAIN_NATIVE=0``
turns the kernel off. Does not own the update rule's definition
(:func:`dist_train.optim.update_rows`, which the kernel matches bit for bit in fp32), nor when
the optimizer uses it (:mod:`dist_train.partial_fc.optimizer`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rows.c")
CFLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
"""No ``-march=native`` (the cache may sit on a home directory shared by unlike nodes; the
source picks its vector width at load time); no contraction into FMA beyond the ``fmaf`` calls
that mirror where torch's kernels fuse, so both paths round alike."""
KINDS = {torch.float32: 0, torch.bfloat16: 1}
"""Storage dtypes the kernel takes (the ``KIND_*`` of ``rows.c``)."""
MIN_ROWS_PER_THREAD = 1024

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None


def cache_dir() -> Path:
    """Where the built library is kept."""
    if os.environ.get("DIST_TRAIN_CACHE"):
        return Path(os.environ["DIST_TRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dist_train"


def _build(compiler: str) -> Path:
    """The library's path, compiled first if this source/compiler/flags have no build yet."""
    ident = SOURCE.read_bytes() + repr((CFLAGS, compiler, platform.machine())).encode()
    out = cache_dir() / f"pfc_rows-{hashlib.sha256(ident).hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {first}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when unavailable (see module doc)."""
    global _lib, _failed
    if os.environ.get("DIST_TRAIN_NATIVE", "1") == "0":
        return None
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        compiler = shutil.which(os.environ.get("CC", "cc"))
        try:
            if compiler is None:
                raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
            lib = ctypes.CDLL(str(_build(compiler)))
            i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
            args = [ctypes.c_int, ptr, ctypes.c_int, ptr, ptr]
            tail = [i64, f32, f32, f32, ctypes.c_int, ctypes.c_int, ptr]
            lib.sgd_rows.argtypes = args + [i64, i64, ptr] + tail
            lib.sgd_dense.argtypes = args + [i64, ptr, i64, i64] + tail
            lib.sgd_rows.restype = lib.sgd_dense.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _failed = str(e)
            warnings.warn(
                f"Partial FC: the compiled optimizer step is unavailable ({_failed}); using "
                "the torch path (slower on CPU)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _lib


def supports(weight: torch.Tensor, momentum: torch.Tensor | None, grad: torch.Tensor) -> bool:
    """Whether :func:`sgd_step` takes these tensors (before building anything)."""
    return (
        weight.device.type == "cpu"
        and momentum is not None
        and weight.dtype in KINDS
        and momentum.dtype in KINDS
        and grad.dtype == torch.float32
        and weight.is_contiguous()
        and momentum.is_contiguous()
        and momentum.shape == weight.shape
        and grad.dim() == 2
        and grad.shape[1] == weight.shape[1]
    )


def _split(n: int) -> list[tuple[int, int]]:
    """[a, b) parts of n rows, one per intra-op thread with at least MIN_ROWS_PER_THREAD each."""
    parts = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run(calls: list) -> None:
    global _pool
    if len(calls) == 1:
        rc = [calls[0]()]
    else:
        if _pool is None or _pool._max_workers < len(calls):  # noqa: SLF001
            _pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="pfc_rows")
        rc = list(_pool.map(lambda f: f(), calls))
    if any(rc):  # -1: a storage kind rows.c lacks (supports() rules it out), -2: no memory
        raise RuntimeError(f"Partial FC: the compiled SGD step failed (codes {rc})")


def sgd_step(
    weight: torch.Tensor,
    momentum: torch.Tensor | None,
    index: torch.Tensor | None,
    grad: torch.Tensor,
    group: dict,
    stochastic: bool,
    dense: bool = False,
) -> bool:
    """One SGD-with-momentum step on rows of ``weight`` [C_local, D] and ``momentum`` (same
    shape), in place; False (nothing done) when the kernel is unavailable or does not take
    these tensors (:func:`supports`).

    Args:
        index: [K] int64, unique, the rows that ``grad`` [K, D] fp32 belongs to (sorted when
            ``dense``); None: rows 0..K-1.
        group: ``lr``, ``momentum`` (> 0), ``weight_decay``, ``nesterov``.
        stochastic: stochastic rounding into bf16 storage (else round to nearest even).
        dense: update every row of the shard (rows outside ``index`` with a zero gradient).
    """
    if not supports(weight, momentum, grad) or group["momentum"] <= 0:
        return False
    if dense and index is None:
        return False
    lib = library()
    if lib is None:
        return False
    grad = grad.contiguous()
    idx = None if index is None else index.to(torch.int64).contiguous()
    # The hash key of the stochastic rounding: drawn from torch's generator, so a seeded run
    # repeats exactly; the kernel reads it from the tensor (no Python int, no host read).
    seed = (
        torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        if stochastic
        else torch.zeros(1, dtype=torch.int64)
    )
    common = (
        ctypes.c_float(group["lr"]),
        ctypes.c_float(group["momentum"]),
        ctypes.c_float(group["weight_decay"]),
        int(bool(group["nesterov"])),
        int(stochastic),
        seed.data_ptr(),
    )
    head = (KINDS[weight.dtype], weight.data_ptr(), KINDS[momentum.dtype], momentum.data_ptr())
    d = weight.shape[1]
    if dense:
        n = idx.numel()
        calls = [
            (
                lambda a=a, b=b: lib.sgd_dense(
                    *head, idx.data_ptr(), n, grad.data_ptr(), a, b, d, *common
                )
            )
            for a, b in _split(weight.shape[0])
        ]
    else:
        if grad.shape[0] == 0:
            return True
        ip = None if idx is None else idx.data_ptr()
        calls = [
            (lambda a=a, b=b: lib.sgd_rows(*head, ip, a, b, grad.data_ptr(), d, *common))
            for a, b in _split(grad.shape[0])
        ]
    _run(calls)
    return True
