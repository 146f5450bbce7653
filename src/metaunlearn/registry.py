"""Plugin registries: a name -> (config class, implementation) table per kind.

Every plugin is one module that registers itself beside its code (the peft
pattern):

    @METHODS.register("esd", EsdOptions, help="Erased Stable Diffusion")
    class EsdMethod(Method): ...

The study config validates a plugin's name and its options against these
tables, so a misspelt name is a one-line error listing the valid ones, and a
third-party package adds a plugin without editing ours: it registers from its
own module, found either by being imported before the config is read or
through a `metaunlearn.<kind>` entry point (e.g. `metaunlearn.methods`).

The built-in plugins of a kind live in one package that is imported on the
first lookup, not at import time: the plugins import the config module, which
must not import them back.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from .errors import ConfigError

T = TypeVar("T")


class Options(BaseModel):
    """Base class of a plugin's own settings (and of every config section):
    unknown keys rejected, no NaN or infinity where a number is expected."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value


class NoOptions(Options):
    """For plugins without settings of their own."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    options: type[Options]
    impl: T
    help: str


class Registry(Generic[T]):
    """Plugins of one kind. `builtins` are the packages whose import registers ours."""

    def __init__(self, kind: str, *builtins: str):
        self.kind, self.builtins = kind, builtins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: str, options: type[Options] = NoOptions, help: str = "") -> Callable[[T], T]:
        """Decorator (or plain call) registering `impl` under `name`; re-registering a
        name replaces it, so a reloaded module or a test's toy plugin stays valid."""
        if not isinstance(options, type) or not issubclass(options, Options):
            raise TypeError(f"{self.kind} '{name}': options must subclass metaunlearn.registry.Options")

        def add(impl: T) -> T:
            self._entries[name] = Entry(name, options, impl, help)
            return impl

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package in self.builtins:
            importlib.import_module(package)
        from importlib.metadata import entry_points

        for point in entry_points(group=f"metaunlearn.{self.kind}s"):
            point.load()  # the plugin module registers itself on import

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str, where: str = "") -> Entry[T]:
        """The entry for `name`; a ConfigError naming `where` and the valid names otherwise."""
        self._load()
        if name not in self._entries:
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {self.kind} '{name}'; choose one of: {', '.join(self._entries)}")
        return self._entries[name]

    def options(self, name: str, values: Any = None) -> Options:
        """The validated options of plugin `name` (its defaults when `values` is None)."""
        return self.get(name).options.model_validate(values or {})


METHODS: Registry = Registry("method", "metaunlearn.methods")
ATTACKS: Registry = Registry("attack", "metaunlearn.attacks")
METRICS: Registry = Registry("metric", "metaunlearn.metrics")
DETECTORS: Registry = Registry("detector", "metaunlearn.metrics", "metaunlearn.worlds")
WORLDS: Registry = Registry("world", "metaunlearn.worlds")
FEATURES: Registry = Registry("feature", "metaunlearn.metrics", "metaunlearn.worlds")  # FID/KID image features
