"""Atomic, resumable training checkpoints.

A checkpoint is a folder `step-NNNNNN/` (trained tensors as safetensors, the
optimizer and schedule state, small extra tensors such as an EMA teacher)
written whole beside its final name and renamed into place, so a kill -9 at
any moment leaves the previous checkpoint or the new one, never a partial one
that looks whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .layout import atomic_dir

PREFIX = "step-"
DAMAGED = "damaged-"  # before a checkpoint's name: one a resume passed over, set aside
STALE_SECONDS = 3600  # a checkpoint's temporary folder untouched this long belongs to a killed write
DISK_FULL = ("unexpected pos", "No space left", "StorageFull", "os error 28")  # torch.save, safetensors


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], training_state: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint of `step`; keep the newest `keep`."""
    final = Path(folder) / f"{PREFIX}{step:06d}"
    try:
        with atomic_dir(final) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "params.safetensors")
            if extra_tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()},
                          tmp / "extra.safetensors")
            torch.save(training_state, tmp / "training_state.pt")
            (tmp / "step.json").write_text(json.dumps({"step": step}))
    except Exception as err:  # torch and safetensors word a full disk their own ways
        if isinstance(err, OSError) or not any(s in str(err) for s in DISK_FULL):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(final)) from None
    for old in list_checkpoints(folder)[:-keep] + abandoned_writes(folder):
        shutil.rmtree(old, ignore_errors=True)
    return final


def abandoned_writes(folder: Path, now: float | None = None) -> list[Path]:
    """Temporary folders of checkpoint writes killed midway (kill -9 skips their cleanup; each is a whole
    checkpoint in size). A live write holds its folder seconds to minutes; one untouched for STALE_SECONDS
    is abandoned, while a concurrent writer's (an orphaned worker's) live one is left alone."""
    now = time.time() if now is None else now
    found = []
    for p in Path(folder).iterdir():
        if p.name.startswith((f".{PREFIX}", f".old-{PREFIX}")):
            try:
                if p.is_dir() and now - p.stat().st_mtime > STALE_SECONDS:
                    found.append(p)
            except FileNotFoundError:  # renamed or removed meanwhile by the writer it belongs to
                continue
    return found


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not Path(folder).is_dir():
        return []
    found = [p for p in Path(folder).iterdir() if p.name.startswith(PREFIX) and (p / "step.json").is_file()]
    return sorted(found, key=lambda p: (len(p.name), p.name))  # by step: past 999999 the names grow a digit


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_newest_intact(folder: Path, names: set[str]) -> tuple[dict | None, list[str]]:
    """The newest checkpoint that loads whole and holds every tensor in `names`, and a
    line per newer one that did not (truncated files, a corrupt step.json): a damaged
    latest checkpoint costs the steps since the one before it, not the run."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
            missing = names - set(state["params"])
            if missing:
                raise KeyError(f"no tensor {sorted(missing)[0]}")
            return state, skipped
        except Exception as error:  # noqa: BLE001 - any damage means: try the one before
            reason = (str(error).strip().splitlines() or [""])[0][:120]
            skipped.append(f"{path} is damaged ({type(error).__name__}{': ' + reason if reason else ''})")
    return None, skipped


def set_aside_after(folder: Path, kept: Path | None) -> None:
    """Move the checkpoints after `kept` (the damaged ones a resume from it passed over; all, for None) out
    of the way: kept for a post-mortem as `damaged-step-N`, never loaded, and no longer counted among the
    newest a save keeps (they would push out the checkpoints written after the resume). Only the newest
    damaged one is kept: each is a whole checkpoint in size."""
    found = list_checkpoints(folder)
    later = found[found.index(kept) + 1:] if kept in found else found
    if not later:
        return
    for old in [*Path(folder).glob(f"{DAMAGED}{PREFIX}*"), *later[:-1]]:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to set aside
        later[-1].replace(later[-1].with_name(DAMAGED + later[-1].name))


def load_checkpoint(path: Path) -> dict:
    extra = path / "extra.safetensors"
    return {"path": path, "step": int(json.loads((path / "step.json").read_text())["step"]),
            "params": load_file(path / "params.safetensors"),
            "extra": load_file(extra) if extra.is_file() else {},
            # onto the CPU: a GPU run's optimizer state resumes on a machine without one (load_state_dict then
            # moves each tensor to its parameter's device)
            "training_state": torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")}
