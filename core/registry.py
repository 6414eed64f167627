"""A small name -> builder registry shared by backbones and heads.

Owns registration, removal and lookup, and what can be read from a builder without calling it
(its keyword arguments, the type it builds); it knows nothing about what it builds.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builder functions.

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("tiny")
        ... def tiny(*, embedding_size: int = 512) -> TinyNet: ...
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

    def unregister(self, name: str) -> Callable[..., T]:
        """Removes ``name`` and returns its builder; an unknown name raises like :meth:`get`."""
        builder = self.get(name)
        del self._builders[name]
        return builder

    @contextlib.contextmanager
    def temporary(self, name: str, builder: Callable[..., T]) -> Iterator[str]:
        """Registers ``builder`` as ``name`` for the ``with`` block only (tests use it).

        Yields:
            ``name``. A name starting with ``_`` stays out of :meth:`names`, so a temporary
            entry never joins the cases of tests parametrised over the registry.
        """
        self.register(name)(builder)
        try:
            yield name
        finally:
            self._builders.pop(name, None)

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

    def keywords(self, name: str) -> dict[str, Any] | None:
        """Keyword arguments the builder of ``name`` accepts -> their declared types, in order.

        A keyword without an annotation maps to :data:`typing.Any`. ``None`` when the builder
        takes ``**kwargs`` (its accepted keys cannot be listed).
        """
        builder = self.get(name)
        params = inspect.signature(builder).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        typed = builder.__init__ if isinstance(builder, type) else builder
        try:
            hints = typing.get_type_hints(typed)
        except (NameError, TypeError):
            hints = {}
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {p.name: hints.get(p.name, Any) for p in params if p.kind in keyword}

    def product(self, name: str) -> type | None:
        """The class ``name`` builds: the builder itself when it is a class, else its return
        annotation (``None`` when it has none that resolves to a class)."""
        builder = self.get(name)
        if isinstance(builder, type):
            return builder
        try:
            made = typing.get_type_hints(builder).get("return")
        except (NameError, TypeError):
            return None
        return made if isinstance(made, type) else None

    def names(self, **attrs: Any) -> list[str]:
        """Registered public names, sorted (names starting with ``_`` are private to tests).

        Args:
            attrs: keep only names whose built class has these attribute values, e.g.
                ``HEADS.names(kind="margin")``; a builder whose class is unknown (see
                :meth:`product`) raises rather than silently dropping out of the selection.
        """
        public = sorted(n for n in self._builders if not n.startswith("_"))
        if not attrs:
            return public
        selected = []
        for name in public:
            made = self.product(name)
            if made is None:
                raise TypeError(
                    f"{self.kind} {name!r}: annotate the builder's return type so that "
                    f"names({', '.join(f'{k}=...' for k in attrs)}) can select it"
                )
            if all(getattr(made, k, None) == v for k, v in attrs.items()):
                selected.append(name)
        return selected

    def __contains__(self, name: object) -> bool:
        return name in self._builders
