"""Memory model of one rank's Partial FC classifier.

Owns :func:`estimate_memory_bytes`, the bytes a rank holds for its shard, its optimizer rows
and one step's transient buffers, for every storage dtype of the rows (``weight_dtype``) and
of their optimizer state (``state_dtype``) and for K sub-centres per class;
``docs/partial_fc.md`` checks it against measured peaks (``benchmarks/partial_fc.py``,
``benchmarks/partial_fc_capacity.py``). Does not measure anything itself.
"""

from __future__ import annotations

import torch

from dist_train.partial_fc.dtypes import as_dtype, master_dtype
from dist_train.partial_fc.optimizer import step_chunk_rows


def state_bytes_per_row(
    embedding_size: int, state_dtype: torch.dtype, optimizer: str = "sgd", momentum: float = 0.9
) -> int:
    """Bytes of one row's optimizer state: SGD momentum ``D``, Adam/AdamW ``2·D`` values
    (+ a 4-byte step count), in ``state_dtype``; 0 for SGD without momentum."""
    if optimizer == "sgd":
        return embedding_size * state_dtype.itemsize if momentum > 0 else 0
    return 2 * embedding_size * state_dtype.itemsize + 4


def estimate_memory_bytes(
    num_classes: int,
    world_size: int,
    *,
    embedding_size: int = 512,
    global_batch: int = 256,
    sample_rate: float = 1.0,
    weight_dtype: torch.dtype | str = torch.float32,
    state_dtype: torch.dtype | str | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    sub_centers: int = 1,
    fused: bool = True,
    device: str = "cpu",
) -> dict[str, int]:
    """Memory model of one rank's classifier (see docs/partial_fc.md), in bytes.

    Persistent, per class: K rows of ``D`` values in ``weight_dtype`` and their optimizer
    state (:func:`state_bytes_per_row`, in ``state_dtype``; default fp32, as
    :class:`~dist_train.partial_fc.PartialFC`). There is no fp32 master copy: bf16 rows with
    bf16 momentum are ``D·4`` bytes per class.

    Transient, per sampled class (S of them, K rows each), in the maths dtype (fp32). With
    ``fused`` and K = 1 (the blockwise kernel
    :class:`~dist_train.partial_fc.kernels.CosineCrossEntropy`, which every registered margin
    head but ``softmax`` takes): the row's gradient and one ``[S, N]`` buffer (logits →
    exponentials → gradient); the rows are read from the shard a block at a time, so no copy.
    Otherwise: each row's copy (not made at rate 1 when the storage is the maths dtype,
    where the shard is used in place) and its gradient, the ``[N, S·K]`` cosines, and the
    ``[N, S]`` logits buffer of the cross-entropy (logits → softmax → gradient); K > 1 adds the
    ``[N, S]`` reduced cosines and their int64 arg-max. Plus the optimizer's maths-dtype chunk
    buffers (rows, gradient and each ``[rows, D]`` state: ``min(chunk, S·K)`` rows each).
    Both update modes need the same memory.

    Args:
        sub_centers: K rows per class (Sub-center ArcFace's ``k``; 1 for other heads).
        fused: the head takes the fused kernel (``kernels.fused(head)``; False for
            ``softmax``). Only matters for K = 1.
        device: ``"cpu"`` or ``"cuda"``: the optimizer's chunk size
            (:func:`~dist_train.partial_fc.optimizer.step_chunk_rows`).

    Returns:
        ``{"persistent", "transient", "total"}``; the process's own baseline (interpreter,
        torch, batch) is not included.
    """
    weight = as_dtype(weight_dtype)
    state = master_dtype(weight) if state_dtype is None else as_dtype(state_dtype, "state_dtype")
    maths = master_dtype(torch.promote_types(weight, state))
    c_local = -(-num_classes // world_size)  # the largest shard
    d, k, n = embedding_size, sub_centers, global_batch
    per_class = k * (d * weight.itemsize + state_bytes_per_row(d, state, optimizer, momentum))
    # S of PartialFC.sample_size: the rate's classes, at least one per sample of the batch
    sampled = min(c_local, max(int(sample_rate * c_local), 1, global_batch))
    if fused and k == 1:
        per_sampled = (d + n) * maths.itemsize
    else:
        copy = 0 if (sampled >= c_local and weight == maths) else d * maths.itemsize
        per_sampled = k * (copy + d * maths.itemsize + n * maths.itemsize) + n * maths.itemsize
        if k > 1:
            per_sampled += n * (maths.itemsize + 8)
    state_2d = 0 if optimizer == "sgd" and momentum == 0 else (1 if optimizer == "sgd" else 2)
    chunk = min(step_chunk_rows(torch.device(device), d, maths.itemsize), sampled * k)
    buffers = (2 + state_2d) * chunk * d * maths.itemsize
    persistent = c_local * per_class
    transient = sampled * per_sampled + buffers
    return {"persistent": persistent, "transient": transient, "total": persistent + transient}
