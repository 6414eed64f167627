"""Partial FC: the classifier sharded by class across ranks, sampled per step.

A package by job, each module readable alone:

- :mod:`~dist_train.partial_fc.module`: :class:`PartialFC` (the shard, the sampling, the
  forward) and :func:`build_partial_fc`;
- :mod:`~dist_train.partial_fc.kernels`: the autograd kernels (:class:`CosineCrossEntropy`,
  the blockwise cosine + margin + cross-entropy across shards; :class:`CosineLinear`,
  :class:`ShardedCrossEntropy` for the heads it does not take);
- :mod:`~dist_train.partial_fc.optimizer`: the row-wise optimizer :class:`PartialFCOptimizer`;
- :mod:`~dist_train.partial_fc.native`: its compiled CPU step (SGD with momentum, ``rows.c``);
- :mod:`~dist_train.partial_fc.state`: the world-size-free state (built by
  :meth:`PartialFC.shard_state`, :func:`merge_state_dicts`, :func:`export_class_centers`,
  :func:`checkpoint_class_centers`);
- :mod:`~dist_train.partial_fc.memory`: the memory model :func:`estimate_memory_bytes`;
- :mod:`~dist_train.partial_fc.dtypes`: storage dtypes of rows and optimizer state, and the
  stochastic rounding into bf16/fp16.

Does not own the margin maths (``heads.margins``), the optimizer rules (:mod:`dist_train.optim`),
the state layout shared with the center loss (:mod:`dist_train.sharded_state`), the backbone or
its optimizer. Every public name is importable from here.
"""

from dist_train.partial_fc.dtypes import (
    WEIGHT_DTYPES,
    as_dtype,
    check_state_dtype,
    master_dtype,
    stochastic_round_bf16,
    stochastic_round_fp16,
    store_rounded,
)
from dist_train.partial_fc.kernels import CosineCrossEntropy, CosineLinear, ShardedCrossEntropy
from dist_train.partial_fc.memory import estimate_memory_bytes
from dist_train.partial_fc.module import INIT_BLOCK_ROWS, PartialFC, build_partial_fc, init_rows
from dist_train.partial_fc.optimizer import STEP_CHUNK_ROWS, PartialFCOptimizer, step_chunk_rows
from dist_train.partial_fc.state import (
    FORMAT,
    checkpoint_class_centers,
    export_class_centers,
    merge_state_dicts,
)

__all__ = [
    "FORMAT",
    "INIT_BLOCK_ROWS",
    "STEP_CHUNK_ROWS",
    "WEIGHT_DTYPES",
    "CosineCrossEntropy",
    "CosineLinear",
    "PartialFC",
    "PartialFCOptimizer",
    "ShardedCrossEntropy",
    "as_dtype",
    "check_state_dtype",
    "build_partial_fc",
    "estimate_memory_bytes",
    "checkpoint_class_centers",
    "export_class_centers",
    "init_rows",
    "master_dtype",
    "merge_state_dicts",
    "step_chunk_rows",
    "stochastic_round_bf16",
    "stochastic_round_fp16",
    "store_rounded",
]
