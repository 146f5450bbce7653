"""Hugging Face "imagefolder" datasets read without the `datasets` library:
image files plus a metadata.jsonl whose lines hold `file_name` and `text`.

Layout: a folder with train/, test/ and/or attack/ subfolders has one split per
subfolder (each with its own metadata.jsonl; a missing subfolder is an empty
split); a folder without them is all `train` data. Every mistake a user can make
in such a folder is one MetaunlearnError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MetaunlearnError

SPLITS = ("train", "test", "attack")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA = "metadata.jsonl"


@dataclass
class FolderItem:
    path: Path
    text: str
    name: str  # relative to the dataset root, e.g. "train/img_001.png"


def has_split_folders(root: Path) -> bool:
    return any((root / s).is_dir() for s in SPLITS)


def read_items(root: str | Path, split: str, where: str) -> list[FolderItem]:
    """The captioned images of one split; `where` names the config key in errors."""
    root = Path(root)
    if not root.is_dir():
        raise MetaunlearnError(f"{where}: image folder '{root}' does not exist")
    if has_split_folders(root):
        folder = root / split
        return _read_folder(folder, root, where) if folder.is_dir() else []
    items = _read_folder(root, root, where)  # validated whatever the split: errors show up early
    return items if split == "train" else []


def _read_folder(folder: Path, root: Path, where: str) -> list[FolderItem]:
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
        raise MetaunlearnError(f"{where}: '{folder}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    metadata = folder / METADATA
    if not metadata.is_file():
        raise MetaunlearnError(f"{where}: '{folder}' has no {METADATA}; add one line per image: "
                               '{"file_name": "img.png", "text": "its caption"}')
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM, as Windows editors write
    except UnicodeDecodeError:
        raise MetaunlearnError(f"{where}: {metadata} is not UTF-8 text; save it as UTF-8") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        at = f"{where}: {metadata} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise MetaunlearnError(f"{at} is not valid JSON: {err.msg}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise MetaunlearnError(f"{at} has no file_name")
        text = entry.get("text")
        if not isinstance(text, str) or not text.strip():
            raise MetaunlearnError(f"{at} has no text (the image's caption)")
        path = folder / entry["file_name"]
        if Path(entry["file_name"]).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
            raise MetaunlearnError(f"{at} names '{entry['file_name']}', outside '{folder}'; use a path relative "
                                   "to the folder, inside it")
        if not path.is_file():
            raise MetaunlearnError(f"{at} names '{entry['file_name']}', which is not in '{folder}'")
        items.append(FolderItem(path, text.strip(), path.relative_to(root).as_posix()))
    if not items:
        raise MetaunlearnError(f"{where}: {metadata} lists no images")
    return items


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB, shorter side resized to `size`, center-cropped square: (3, size, size) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise MetaunlearnError(f"cannot read image '{path}': {err}") from None
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (array.permute(2, 0, 1) / 127.5 - 1).clamp(-1, 1)


def signature(root: str | Path) -> str:
    """Changes when any file of the folder is added, removed, resized or touched,
    so caches of its images go stale although the config did not change."""
    root = Path(root)
    digest = hashlib.sha256()
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
