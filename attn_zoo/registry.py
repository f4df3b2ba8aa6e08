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


def pick(text: str) -> list[str]:
    """Registry keys from a comma-separated list, or every one for ``all`` (what a
    command's ``--mechanisms`` takes); an unknown key is a ValueError naming them."""
    chosen = names() if text == "all" else text.split(",")
    if unknown := [name for name in chosen if name not in _MECHANISMS]:
        raise ValueError(f"unknown mechanism {unknown[0]!r}; accepted: {', '.join(_MECHANISMS)}")
    return chosen


def get(name: str, config: Any = None, **overrides: Any) -> Mechanism:
    """A mechanism instance with its paper-default config (or ``config``/``overrides``)."""
    try:
        cls = _MECHANISMS[name]
    except KeyError:
        raise ValueError(
            f"unknown mechanism {name!r}; accepted: {', '.join(_MECHANISMS)}"
        ) from None
    return cls(config, **overrides)
