"""The names of the training methods: ``method=<name>`` in a config picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aclip.config import ConfigError

if TYPE_CHECKING:
    from aclip.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method=<cls.name>``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ConfigError naming the choices otherwise."""
    if name not in METHODS:
        raise ConfigError(
            f"config key 'method': unknown method {name!r} (one of {', '.join(sorted(METHODS))})"
        )
    return METHODS[name]
