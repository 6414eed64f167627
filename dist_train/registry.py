"""A small name → builder registry shared by backbones and heads.

Owns registration and lookup only; it knows nothing about what it builds.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builder functions.

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("tiny")
        ... def tiny(*, embedding_size: int = 512): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a builder under ``name``; a duplicate name raises."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The builder for ``name``; an unknown name raises naming the closest known one."""
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._builders, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        """Builds ``name`` with keyword arguments; a wrong keyword raises naming the builder."""
        builder = self.get(name)
        try:
            return builder(**kwargs)
        except TypeError as exc:
            if "unexpected keyword" in str(exc) or "positional argument" in str(exc):
                raise TypeError(f"{self.kind} {name!r}: {exc}") from exc
            raise

    def names(self) -> list[str]:
        """Registered public names, sorted (names starting with ``_`` are private to tests)."""
        return sorted(n for n in self._builders if not n.startswith("_"))

    def __contains__(self, name: object) -> bool:
        return name in self._builders
