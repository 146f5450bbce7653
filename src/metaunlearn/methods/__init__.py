"""Base unlearning methods. Adding one: a file with a `Method` subclass and
one line in METHODS."""

from __future__ import annotations

from ..config import MethodConfig
from ..errors import MetaunlearnError
from .base import Method, NoMethod, StepContext
from .esd import EsdMethod
from .sdd import SddMethod

METHODS: dict[str, type[Method]] = {"esd": EsdMethod, "sdd": SddMethod, "none": NoMethod}


def make_method(config: MethodConfig, guide: str = "") -> Method:
    if config.name not in METHODS:
        raise MetaunlearnError(f"unknown method '{config.name}'; choose one of {', '.join(METHODS)}")
    return METHODS[config.name](config, guide)


__all__ = ["METHODS", "Method", "StepContext", "make_method"]
