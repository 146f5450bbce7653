"""What a metric is: it judges the samples of every evaluation prompt and
returns named values, each declared with how to read it (`Value`), so
results.json, the report's tables and the curves show whatever metrics a
study configured without knowing any of them.

A metric is a plugin: a `Metric` subclass registered in `METRICS` with its
options class; `evaluation.metrics` lists the ones a study computes and each
one's options sit under its name in the `evaluation` section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..registry import Options

if TYPE_CHECKING:
    from ..config import StudyConfig
    from ..model import DiffusionModel
    from ..worlds import World


@dataclass(frozen=True)
class Value:
    """One number a metric reports, and how to read it."""

    key: str  # unique across the study's metrics, e.g. 'forget_rate'
    label: str  # for tables and plots, e.g. 'forget rate'
    role: str | None = None  # the data role it concerns ('forget', 'related', 'unrelated'), if one
    higher_is_better: bool = True
    fraction: bool = True  # a share in [0, 1], shown in percent
    group: str = "concept"  # 'concept' (is the concept there?) or 'utility' (image quality, alignment)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Every evaluation prompt's samples, prompt-major: entry k's images are
    `images[k * per_prompt:(k + 1) * per_prompt]`."""

    entries: list[tuple[str, str]]  # (role, prompt)
    images: torch.Tensor  # (len(entries) * per_prompt, 3, H, W) in [0, 1]
    per_prompt: int
    forget_concepts: list[str]  # the forget role's classes, else its prompts
    seeds: list[int] = field(default_factory=list)  # per entry: its first sample's seed
    columns: list[dict] = field(default_factory=list)  # per entry: its prompt file's other columns
    original: bool = False  # the study's original model made them
    evaluator: Any = None  # the Evaluator that made them (its original_samples, for reference metrics)

    def of_role(self, role: str) -> torch.Tensor:
        """Every sample of a role's prompts."""
        keep = [k for k, (r, _) in enumerate(self.entries) if r == role]
        if not keep:
            return self.images[:0]
        return torch.cat([self.of(k) for k in keep])

    def of(self, k: int) -> torch.Tensor:
        return self.images[k * self.per_prompt:(k + 1) * self.per_prompt]


@dataclass
class Context:
    """What a metric may need besides the samples: the study, the built-in world
    (None for other models) and the folder of the original model."""

    config: StudyConfig
    world: World | None
    original: str | Path
    load_original: Callable[[], DiffusionModel] | None = None  # for metrics that compare with its samples
    cache_dir: Path | None = None  # where metrics may keep what they computed once (reference features)


def device_of(context: Context | None) -> str:
    """Where an evaluation model runs: the study's model.device (its models and the one judged stay on one
    device); without a study (a detector built by hand), CUDA when torch sees one."""
    from ..engine import available_device

    return available_device(context.config.model.device if context is not None else "auto")


@dataclass
class Result:
    values: dict[str, float | None]  # every declared key; None: not measurable here
    details: dict  # JSON-ready, e.g. per prompt


def check_installed(plugin) -> None:
    """Raise the plugin's own install hint when a package it imports is missing: checked before a study's
    first stage, not when the evaluator is first built (after hours of unlearning)."""
    from importlib.util import find_spec

    from ..errors import MetaunlearnError

    def missing(module: str) -> bool:
        try:
            return find_spec(module) is None
        except (ImportError, ValueError):  # a dotted name whose parent package is missing
            return True

    absent = [m for m in getattr(plugin, "requires", ()) if missing(m)]
    if absent:
        raise MetaunlearnError(getattr(plugin, "install_hint", "") or f"{plugin.__name__} needs the package "
                               f"{absent[0]}: pip install it")


class Metric:
    """Judges samples. `values` declares every key `compute` returns."""

    values: list[Value] = []

    def __init__(self, options: Options, context: Context):
        self.options, self.context = options, context

    @classmethod
    def check(cls, options: Options, config, world) -> None:
        """Raise MetaunlearnError for inputs this metric will read that are missing (reference folders,
        files): run before a study's first stage, so no training is spent before the mistake shows."""

    def compute(self, samples: Samples, model: DiffusionModel) -> Result:
        raise NotImplementedError
