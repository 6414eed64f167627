"""Errors the data layer raises about its configuration.

Owns :class:`DataConfigError`. :class:`~dist_train.data.datasets.DataError` (unusable files)
stays with the readers that raise it.
"""

from __future__ import annotations

from core.errors import ConfigError


class DataConfigError(ConfigError):
    """A ``data.*`` config value that disagrees with the data; the message names the key.

    A :class:`~core.errors.ConfigError` (re-exported as ``dist_train.config.ConfigError``), so
    ``launch/train.py`` reports it as a config mistake, like any other.
    """
