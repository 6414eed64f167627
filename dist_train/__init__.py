"""Distributed training machinery: config, bootstrap, collectives, Partial FC, trainer, data.

Importing this package is cheap: submodules are imported where they are used, so that
`backbones/` and `heads/` can use :mod:`dist_train.registry` without pulling in the trainer.
"""
