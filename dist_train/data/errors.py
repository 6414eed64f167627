"""The data layer's own errors.

Owns :class:`DataError` (unusable data: a file, record or line) and :class:`DataConfigError`
(a ``data.*`` config value that disagrees with the data). The RecordIO byte format keeps its
:class:`~dist_train.data.recordio.RecordIOError`.
"""

from __future__ import annotations

from core.errors import ConfigError


class DataError(ValueError):
    """Unusable data: the message names the file, record or line."""


class DataConfigError(ConfigError):
    """A ``data.*`` config value that disagrees with the data; the message names the key.

    A :class:`~core.errors.ConfigError` (re-exported as ``dist_train.config.ConfigError``), so
    ``launch/train.py`` reports it as a config mistake, like any other.
    """
