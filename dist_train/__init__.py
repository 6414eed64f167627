"""Distributed training machinery: config, bootstrap, collectives, Partial FC, trainer, data.

Importing this package is cheap: submodules are imported where they are used. The registry
that `backbones/` and `heads/` share lives in the neutral :mod:`core` package, which imports
nothing from here.
"""
