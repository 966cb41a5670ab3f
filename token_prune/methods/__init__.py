"""``name -> method`` registry. One module per method."""

from __future__ import annotations

from .alvts import ALVTS
from .fastv import FastV
from .glimpse import GlimpsePrune
from .random_prune import RandomPrune

METHODS = {
    GlimpsePrune.name: GlimpsePrune,
    FastV.name: FastV,
    ALVTS.name: ALVTS,
    RandomPrune.name: RandomPrune,
}


def supported_methods() -> list[str]:
    return sorted(METHODS)


def method_class(name):
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; supported: {', '.join(supported_methods())}")
    return METHODS[name]


__all__ = ["METHODS", "method_class", "supported_methods", "GlimpsePrune", "FastV", "ALVTS", "RandomPrune"]
