"""Partial FC: the classifier sharded by class across ranks (see :mod:`.module`)."""

from dist_train.partial_fc.module import *  # noqa: F403
from dist_train.partial_fc.module import (  # noqa: F401
    _CosineLinear,
    _ShardedCrossEntropy,
    _stochastic_round_bf16,
)
