"""core.registry: registration, temporary entries, keyword listing and selection by kind."""

from __future__ import annotations

import pytest

import heads
from core.registry import Registry


class Thing:
    kind = "a"


class Other:
    kind = "b"


def make_thing(*, size: int = 1, name: str = "x") -> Thing:
    return Thing()


def test_register_get_build_and_duplicates():
    reg: Registry[object] = Registry("thing")
    reg.register("thing")(make_thing)
    assert isinstance(reg.build("thing", size=2), Thing)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("thing")(make_thing)
    with pytest.raises(KeyError, match="did you mean 'thing'"):
        reg.get("thinq")
    with pytest.raises(TypeError, match="thing 'thing'"):
        reg.build("thing", colour=1)


def test_unregister_and_temporary_entries():
    reg: Registry[object] = Registry("thing")
    reg.register("thing")(make_thing)
    assert reg.unregister("thing") is make_thing and "thing" not in reg
    with pytest.raises(KeyError):
        reg.unregister("thing")
    with reg.temporary("_tmp", make_thing) as name:
        assert name == "_tmp" and name in reg and reg.names() == []  # private: not listed
    assert "_tmp" not in reg
    with pytest.raises(RuntimeError), reg.temporary("tmp", make_thing):
        raise RuntimeError  # removed even when the block fails
    assert "tmp" not in reg


def test_keywords_product_and_names_by_attribute():
    reg: Registry[object] = Registry("thing")
    reg.register("thing")(make_thing)
    reg.register("other")(Other)
    assert reg.keywords("thing") == {"size": int, "name": str}
    assert reg.product("thing") is Thing and reg.product("other") is Other
    assert reg.names(kind="a") == ["thing"] and reg.names(kind="b") == ["other"]
    reg.register("open")(lambda **kw: Thing())
    assert reg.keywords("open") is None
    with pytest.raises(TypeError, match="annotate the builder's return type"):
        reg.names(kind="a")


def test_heads_by_kind_cover_every_head():
    kinds = [heads.HEADS.names(kind=k) for k in ("margin", "metric", "combined")]
    assert sorted(sum(kinds, [])) == heads.names()
