"""Base unlearning methods. Adding one: a module with a `Method` subclass that
registers itself (`@METHODS.register(name, OptionsClass)`); the built-in ones
are imported here."""

from __future__ import annotations

from ..config import MethodConfig
from ..registry import METHODS
# each registers itself; the order is the order of `choose one of` in errors
from . import esd  # noqa: F401,I001
from . import sdd  # noqa: F401
from . import uce  # noqa: F401
from . import rece  # noqa: F401
from . import none  # noqa: F401
from .base import Method


def make_method(config: MethodConfig, guide: str = "") -> Method:
    return METHODS.get(config.name, "method.name").impl(config, guide)


def trained_params(config: MethodConfig) -> str:
    """The UNet weights the method trains: `config.params`, with 'auto' resolved by the method."""
    return METHODS.get(config.name, "method.name").impl.trained_params(config)


__all__ = ["METHODS", "Method", "make_method", "trained_params"]
