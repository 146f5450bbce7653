"""Prompt sets from files: CSV in the layout of the ESD and I2P prompt files,
or plain text lists.

- CSV (.csv): a header row with a `prompt` column; `evaluation_seed` (when
  present) fixes the seed of the prompt's samples (sample i of a prompt with
  seed s uses seed s + i: with one sample per prompt, the image the file's
  authors made); `case_number` and every other column are kept and carried
  into results.json beside the prompt's numbers.
- Text (any other suffix): one prompt per line; blank lines and lines
  starting with '#' are skipped.

Files are read as UTF-8; errors name the file and line.
"""

from __future__ import annotations

import contextlib
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MetaunlearnError

SEED_COLUMN = "evaluation_seed"
MAX_FILE_SEED = 2**62  # a sample's seed is the file's plus its index: torch takes seeds below 2**64


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    seed: int | None = None  # from the file, else the evaluation's own scheme
    extra: dict = field(default_factory=dict)  # the file's other columns (case_number, categories, ...)


def read_prompt_file(path: str | Path) -> list[PromptEntry]:
    """Every prompt of a CSV or text prompt file, in file order."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except FileNotFoundError:
        raise MetaunlearnError(f"prompt file '{path}' does not exist") from None
    except IsADirectoryError:
        raise MetaunlearnError(f"prompt file '{path}' is a folder; give a .csv or .txt file") from None
    except UnicodeDecodeError:
        raise MetaunlearnError(f"prompt file '{path}' is not UTF-8 text") from None
    except OSError as err:
        raise MetaunlearnError(f"cannot read prompt file '{path}': {err.strerror}") from None
    entries = _read_csv(path, text) if path.suffix.lower() == ".csv" else _read_lines(text)
    if not entries:
        raise MetaunlearnError(f"prompt file '{path}' has no prompts")
    return entries


def _read_lines(text: str) -> list[PromptEntry]:
    lines = (line.strip() for line in text.splitlines())
    return [PromptEntry(line) for line in lines if line and not line.startswith("#")]


def _read_csv(path: Path, text: str) -> list[PromptEntry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted prompts may span lines
    columns = [c.strip() for c in reader.fieldnames or []]
    if "prompt" not in columns:
        raise MetaunlearnError(f"prompt file '{path}' has no 'prompt' column (columns: {', '.join(columns) or 'none'}"
                               "); CSV prompt files follow the ESD/I2P layout: prompt, evaluation_seed, case_number")
    entries = []
    for row in reader:
        line = reader.line_num
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        prompt = row.pop("prompt")
        if not prompt:
            continue
        seed = row.pop(SEED_COLUMN, "")
        try:
            # whole numbers exactly (through a float, seeds above 2**53 would be rounded); some exports write 1234.0
            seed = (int(seed) if seed.lstrip("-").isdigit() else int(float(seed))) if seed else None
        except (ValueError, OverflowError):  # 'inf' is a float but no whole number
            raise MetaunlearnError(f"{path}, line {line}: {SEED_COLUMN} '{seed}' is not a whole number") from None
        if seed is not None and not 0 <= seed <= MAX_FILE_SEED:
            raise MetaunlearnError(f"{path}, line {line}: {SEED_COLUMN} {seed} is out of range "
                                   f"(0 to {MAX_FILE_SEED:,})")
        entries.append(PromptEntry(prompt, seed, row))
    return entries


_RECORDED: dict[str, str] = {}  # digests a run recorded, for files unreadable from here (recorded_digests)


def file_digest(path: str | Path) -> str:
    """A short content hash (what results made from a prompt file depend on); when unreadable, the digest
    the run recorded for that path if known (recorded_digests), else 'missing'."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]
    except OSError:
        return _RECORDED.get(str(path), "missing")


@contextlib.contextmanager
def recorded_digests(digests: dict[str, str]):
    """Within: a prompt file unreadable from here (relative paths, a report made from another directory or
    machine) counts by the digest its run recorded, so the run's results still match their settings."""
    global _RECORDED
    before = _RECORDED
    _RECORDED = {**before, **digests}
    try:
        yield
    finally:
        _RECORDED = before
