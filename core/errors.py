"""The configuration error type shared by the config schema and the layers that check a config
value against their data.

Owns :class:`ConfigError` only. :mod:`dist_train.config` re-exports it (the name users catch);
the data layer subclasses it (:class:`dist_train.data.errors.DataConfigError`) without importing
the config module.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted path."""
