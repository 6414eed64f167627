"""Neutral building blocks every package may import: the name -> builder registry and the
config error type.

Owns :class:`~core.registry.Registry` and :class:`~core.errors.ConfigError`. Imports nothing
from the project (an import-linter contract in ``pyproject.toml`` keeps it so), so
``backbones/``, ``heads/`` and the data layer can use it without depending on the trainer.
"""

from core.errors import ConfigError
from core.registry import Registry

__all__ = ["ConfigError", "Registry"]
