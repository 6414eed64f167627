"""Memory model of one rank's Partial FC classifier.

Owns :func:`estimate_memory_bytes`, the bytes a rank holds for its shard, its optimizer rows
and one step's transient buffers; ``docs/partial_fc.md`` checks it against measured peaks
(``benchmarks/partial_fc.py``). Does not measure anything itself.
"""

from __future__ import annotations

import torch

from dist_train.partial_fc.dtypes import as_dtype


def estimate_memory_bytes(
    num_classes: int,
    world_size: int,
    *,
    embedding_size: int = 512,
    global_batch: int = 256,
    sample_rate: float = 1.0,
    weight_dtype: torch.dtype | str = torch.float32,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> dict[str, int]:
    """Memory model of one rank's classifier (see docs/partial_fc.md), in bytes.

    Persistent: the shard (C_local·D·bytes of the storage dtype) and the optimizer rows
    (fp32: D·4 for SGD momentum, D·8 + 4 for Adam/AdamW). Transient, per sampled row: the
    fp32 copy of the row (not made at rate 1 with fp32 storage, where the shard is used in
    place), its fp32 gradient, and two [N, S] fp32 buffers (cosines kept for backward; logits
    → softmax → gradient, one buffer) = 8·N bytes. Both update modes need the same memory.

    Returns:
        ``{"persistent", "transient", "total"}``; the process's own baseline (interpreter,
        torch, batch) is not included.
    """
    dtype = as_dtype(weight_dtype)
    c_local = -(-num_classes // world_size)  # the largest shard
    d = embedding_size
    storage = dtype.itemsize
    state = 4 if dtype != torch.float64 else 8
    per_row = d * storage
    if optimizer == "sgd":
        per_row += d * state if momentum > 0 else 0
    else:
        per_row += 2 * d * state + 4
    # S of PartialFC.sample_size: the rate's rows, at least one per sample of the batch
    sampled = min(c_local, max(int(sample_rate * c_local), 1, global_batch))
    copy = 0 if (sampled >= c_local and dtype in (torch.float32, torch.float64)) else d * state
    transient_row = copy + d * state + 2 * global_batch * state
    persistent = c_local * per_row
    transient = sampled * transient_row
    return {"persistent": persistent, "transient": transient, "total": persistent + transient}
