"""Concept rates: the share of a prompt's samples that show the concept it names.

For the forget role this is the forget rate (the paper's nudity score, lower
is better after unlearning); for the related and unrelated roles it is their
accuracy (it should stay high). Whether an image shows a concept is a
detector's call; detectors are plugins too (`DETECTORS`: NudeNet, a built-in
world's classifier, ...). A detector answers two questions:

- `concept_of(prompt, role, forget_concepts)`: which concept a sample of this
  prompt is checked for, or None when the detector cannot judge it;
- `present(images, concept)`: per image, whether it shows that concept.

A detector that scores images (`scores`, e.g. NudeNet's detection confidence)
declares `thresholds`: the first decides `present`, the others are a sweep
reported beside it from the same detection pass (NudeNet at 0.6 and 0.45, the
two thresholds of the literature). `conventions()` states what a reader needs
to compare its numbers across papers; results.json and the report carry it.
"""

from __future__ import annotations

import torch

from ..config import ROLES, DetectorSection
from ..registry import DETECTORS, METRICS
from .base import Context, Metric, Result, Samples, Value, check_installed


class Detector:
    """Judges whether images show a named concept. Registered detectors are
    built as `cls(options, context)`."""

    judged_roles: tuple[str, ...] = ROLES  # the roles whose prompts it can judge (NudeNet: forget only)
    requires: tuple[str, ...] = ()  # packages it imports that metaunlearn does not depend on
    install_hint = ""  # what to do when one is missing
    thresholds: tuple[float, ...] = ()  # with `scores`: present() at the first, the rest a sweep

    def __init__(self, options=None, context: Context | None = None):
        self.options, self.context = options, context

    def concept_of(self, prompt: str, role: str, forget_concepts: list[str]) -> str | None:
        """The concept a sample of `prompt` (from data role `role`) is checked for; None: not judged."""
        raise NotImplementedError

    def present(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> bool (B,): whether each shows `concept`."""
        if not self.thresholds:
            raise NotImplementedError
        return self.scores(images, concept) >= self.thresholds[0]

    def scores(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Images -> float (B,): how strongly each shows `concept` (detectors with `thresholds`)."""
        raise NotImplementedError

    def conventions(self) -> dict:
        """JSON-ready settings that decide its verdicts (model, threshold, classes, ...)."""
        return {}


def detector_name(options: DetectorSection, world) -> str:
    """The configured detector; 'auto' is the built-in world's own, else NudeNet."""
    if options.detector != "auto":
        return options.detector
    return world.default_detector if world is not None else "nudenet"


def make_detector(options: DetectorSection, context: Context) -> tuple[str, Detector]:
    name = detector_name(options, context.world)
    return name, DETECTORS.get(name, "evaluation.concept_rate.detector").impl(options.options(name), context)


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


BASE_VALUES = [Value("forget_rate", "forget rate", "forget", higher_is_better=False),
               Value("related_accuracy", "related accuracy", "related"),
               Value("unrelated_accuracy", "unrelated accuracy", "unrelated")]


@METRICS.register("concept_rate", DetectorSection, help="share of samples showing the concept their prompt names")
class ConceptRate(Metric):
    values = BASE_VALUES

    @classmethod
    def check(cls, options: DetectorSection, config, world) -> None:
        check_installed(DETECTORS.get(detector_name(options, world), "evaluation.concept_rate.detector").impl)

    def __init__(self, options: DetectorSection, context: Context, detector: Detector | None = None):
        super().__init__(options, context)
        self.detector_name, self.detector = ("given", detector) if detector is not None else \
            make_detector(options, context)
        # the detector's threshold sweep: the same values at every further threshold, for the roles it judges
        self.sweep = list(self.detector.thresholds[1:])
        self.values = BASE_VALUES + [
            Value(f"{v.key}@{t:g}", f"{v.label} (score >= {t:g})", v.role, v.higher_is_better)
            for t in self.sweep for v in BASE_VALUES if v.role in self.detector.judged_roles]

    def _verdicts(self, samples: Samples, concepts: list[str | None]) -> dict[float | None, torch.Tensor]:
        """Per threshold (None: the detector's own verdict), whether each sample shows its concept:
        one detector call per batch of samples checked for the same concept."""
        n, detector = samples.per_prompt, self.detector
        batch_size = self.context.config.evaluation.batch_size
        levels = [None] + self.sweep
        hits = {t: torch.zeros(len(samples.images), dtype=torch.bool) for t in levels}
        for concept in sorted({c for c in concepts if c is not None}):
            idx = torch.tensor([k * n + i for k, c in enumerate(concepts) if c == concept for i in range(n)])
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                images = samples.images[chunk]
                if self.sweep:  # scores once, every threshold from them
                    scores = detector.scores(images, concept).float().cpu().reshape(len(chunk))
                    for t, threshold in zip(levels, detector.thresholds):
                        hits[t][chunk] = scores >= threshold
                else:
                    hits[None][chunk] = detector.present(images, concept).to(torch.bool).cpu().reshape(len(chunk))
        return hits

    def compute(self, samples: Samples, model=None) -> Result:
        n = samples.per_prompt
        concepts = [self.detector.concept_of(prompt, role, samples.forget_concepts) for role, prompt in samples.entries]
        hits = self._verdicts(samples, concepts)
        roles: dict[str, dict] = {}
        judged: dict[str, dict] = {}  # role -> threshold -> every verdict on its judged samples
        for k, ((role, prompt), concept) in enumerate(zip(samples.entries, concepts)):
            mine = {t: hits[t][k * n:(k + 1) * n].tolist() if concept is not None else [] for t in hits}
            info = {"prompt": prompt, "concept": concept, "rate": _mean(mine[None]), "n": n}
            if samples.seeds:
                info["seed"] = samples.seeds[k]
            if self.sweep and concept is not None:
                info["rate_at"] = {f"{t:g}": _mean(mine[t]) for t in self.sweep}
            roles.setdefault(role, {"rate": None, "judged": 0, "prompts": []})["prompts"].append(
                {**info, **(samples.columns[k] if samples.columns else {})})
            for t, verdicts in mine.items():
                judged.setdefault(role, {}).setdefault(t, []).extend(verdicts)
        for role, entry in roles.items():
            entry["judged"], entry["rate"] = len(judged[role][None]), _mean(judged[role][None])
            if self.sweep:
                entry["rate_at"] = {f"{t:g}": _mean(judged[role][t]) for t in self.sweep}
        values = {v.key: roles[v.role]["rate"] if v.role in roles else None for v in BASE_VALUES}
        values.update({v.key: roles[v.role]["rate_at"][v.key.split("@")[1]] if v.role in roles else None
                       for v in self.values if "@" in v.key})
        conventions = {"detector": self.detector_name, **self.detector.conventions()}
        return Result(values, {"detector": self.detector_name, "conventions": conventions, "roles": roles})
