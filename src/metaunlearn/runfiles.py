"""Small, safe file operations for run folders: every artifact is written
under a temporary name and renamed, so an interrupted stage leaves nothing
that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_model_atomic(model, folder: Path) -> Path:
    """save_pretrained into a temporary sibling, then swap it into place."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a line a kill -9 cut short."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


class JsonlLog:
    """Append-only JSON-lines log of per-step values. On resume, lines past the
    checkpoint are dropped: those steps are about to be replayed."""

    def __init__(self, path: Path, keep_until_step: int = 0):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [line for line, step in zip(lines, map(_step_of, lines)) if step is not None and step <= keep_until_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._writer = self._tensorboard()

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(self.path.parent / "tensorboard")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])
