"""Built-in worlds. `model.source: digits` names the digits world; anything else
is a diffusers folder or hub id that `DiffusionModel.load` resolves itself.

Imports stay lazy: config.py imports `worlds.digits_data`, which runs this file,
and building a world pulls in training code nobody needs to read a config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WORLD_FILE = "world.json"  # written by worlds.digits.build_world (its REPORT_FILE)


def resolve_model_source(source: str) -> Path | str:
    """'digits' -> the cached digits world folder (built on first use); else `source` unchanged."""
    if source == "digits":
        from .digits import DigitsWorldConfig, get_world

        return get_world(DigitsWorldConfig())
    return source


def world_report(path: str | os.PathLike | None) -> dict | None:
    """The world.json of a built-in world folder, or None for any other model."""
    if not path:
        return None
    try:
        report = json.loads((Path(path) / WORLD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def is_digits_world(path: str | os.PathLike | None) -> bool:
    report = world_report(path)
    return report is not None and report.get("world") == "digits"
