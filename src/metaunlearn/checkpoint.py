"""Atomic, resumable training checkpoints.

A checkpoint is a folder `step-NNNNNN/` written under a temporary name and
renamed into place when complete, so a kill -9 at any moment leaves either the
previous checkpoint or the new one, never a partial one that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], training_state: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write trainable tensors (safetensors), optimizer/scheduler state and
    small extra tensors (e.g. an EMA teacher); keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "params.safetensors")
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    for file in tmp.iterdir():
        _fsync(file)
    if final.exists():  # out of the way first: a kill between the two renames leaves no half-deleted step
        trash = folder / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "step.json").is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    extra = path / "extra.safetensors"
    return {"step": json.loads((path / "step.json").read_text())["step"],
            "params": load_file(path / "params.safetensors"),
            "extra": load_file(extra) if extra.is_file() else {},
            "training_state": torch.load(path / "training_state.pt", weights_only=True)}
