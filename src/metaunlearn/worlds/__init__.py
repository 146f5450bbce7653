"""Built-in worlds: tiny text-to-image models built on the spot, each with its
own dataset (role data by class), prompts and concept detector.

A world is a plugin: a `World` subclass registered in `WORLDS` under the name
that `model.source` uses (`source: digits`), with its build options under that
name (`model: {source: digits, digits: {preset: reduced}}`). A folder a world
built carries a world.json naming it, so a copy of the folder is recognised as
that world too. Nothing outside this package knows any particular world.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..registry import WORLDS, Options

if TYPE_CHECKING:
    import torch

    from ..config import ModelConfig, RoleConfig
    from ..model import DiffusionModel

WORLD_FILE = "world.json"

# A data feed is (item count, chunks); its chunks are (images (B, 3, H, W) in [-1, 1],
# captions, sources), so a large role never holds all its full-size images at once.
Chunks = Iterator[tuple["torch.Tensor", list[str], list[str]]]


class World:
    """A built-in world. `folder()` builds it (once, cached) or returns the folder it was opened from."""

    name: ClassVar[str] = ""
    default_detector: ClassVar[str] = ""  # a registered detector that judges this world's classes
    default_features: ClassVar[str] = ""  # registered image features for FID/KID in this world ('': inception)

    def __init__(self, options: Options, folder: Path | None = None):
        self.options, self._folder = options, folder

    @classmethod
    def from_folder(cls, folder: Path) -> World:
        """The world a built folder (with its world.json) belongs to."""
        return cls(WORLDS.get(cls.name).options.model_validate({}), Path(folder))

    def folder(self, log=print, rebuild: bool = False) -> Path:
        raise NotImplementedError

    def describe(self, folder: Path) -> str:
        """A few lines on a built folder's quality, for `metaunlearn world`."""
        return f"{self.name} world: {folder}"

    carried: ClassVar[tuple[str, ...]] = ()  # files or folders besides world.json a folder of this world needs

    def mark(self, folder: Path) -> None:
        """Make a model folder saved from this world's model (an unlearned one) a folder of this world:
        a study with it as `model.source` then has the world's classes, detector and reference images."""
        import shutil

        source = self.folder()
        for name in (WORLD_FILE, *self.carried):
            if (source / name).is_dir():
                shutil.copytree(source / name, Path(folder) / name, dirs_exist_ok=True)
            elif (source / name).is_file():
                shutil.copy2(source / name, Path(folder) / name)

    def is_built(self) -> bool:
        raise NotImplementedError

    def normalise_classes(self, classes: list[str]) -> list[str]:
        """The canonical names of `classes`; ValueError naming the bad ones."""
        raise NotImplementedError

    def class_prompts(self, name: str) -> list[str]:
        """Prompts that ask for class `name` (evaluation of a role given by classes only)."""
        raise NotImplementedError

    def reference_images(self, classes: list[str], size: int) -> torch.Tensor:
        """Real held-out images of `classes` (no stage trains on them), (N, 3, size, size) in [0, 1]:
        the reference set of FID/KID in this world."""
        raise NotImplementedError

    def class_feed(self, role: RoleConfig, split: str, model: DiffusionModel, batch: int) -> tuple[int, Chunks]:
        """A role's images of its classes from the world's dataset split, captioned by its prompts."""
        raise NotImplementedError


def cache_root() -> Path:
    """Where built worlds are kept: $METAUNLEARN_CACHE, else the platform's user cache folder."""
    env = os.environ.get("METAUNLEARN_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("metaunlearn"))


def worlds_root() -> Path:
    """Where built worlds are kept: one folder each, named by the world and its config's hash."""
    return cache_root() / "worlds"


def world_report(path: str | os.PathLike | None) -> dict | None:
    """The world.json of a built world's folder, or None for any other model."""
    if not path:
        return None
    try:
        report = json.loads((Path(path) / WORLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def world_for(model: ModelConfig) -> World | None:
    """The world `model.source` names or a folder of which it is; None for other models."""
    source = model.source
    if source in WORLDS:
        return WORLDS.get(source).impl(model.options(source))
    report = world_report(source)
    if report is not None and report.get("world") in WORLDS:
        return WORLDS.get(report["world"]).impl.from_folder(Path(source))
    return None


def resolve_model_source(model: ModelConfig) -> Path | str:
    """The folder or hub id the original model loads from (a world is built on first use)."""
    world = world_for(model)
    return world.folder() if world is not None else model.source


from . import digits  # noqa: E402,F401  (the built-in world registers itself)
