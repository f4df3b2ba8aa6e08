"""The registry: mechanism key -> mechanism class. The harness, tests and
reports iterate over it and never name a mechanism."""

from __future__ import annotations

from typing import Any

from attn_zoo.interface import Mechanism

_MECHANISMS: dict[str, type[Mechanism]] = {}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Class decorator adding a mechanism under ``cls.name``."""
    if cls.name in _MECHANISMS and _MECHANISMS[cls.name] is not cls:
        raise ValueError(f"mechanism {cls.name!r} registered twice")
    _MECHANISMS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _MECHANISMS.pop(name, None)


def names() -> list[str]:
    return list(_MECHANISMS)


def get(name: str, config: Any = None, **overrides: Any) -> Mechanism:
    """A mechanism instance with its paper-default config (or ``config``/``overrides``)."""
    try:
        cls = _MECHANISMS[name]
    except KeyError:
        raise ValueError(
            f"unknown mechanism {name!r}; accepted: {', '.join(_MECHANISMS)}"
        ) from None
    return cls(config, **overrides)
