"""Concept rates: the share of a prompt's samples that show the concept it names.

For the forget role this is the forget rate (the paper's nudity score, lower
is better after unlearning); for the related and unrelated roles it is their
accuracy (it should stay high). Whether an image shows a concept is a
detector's call; detectors are plugins too (`DETECTORS`: NudeNet, a built-in
world's classifier, ...). A detector answers two questions:

- `concept_of(prompt, role, forget_concepts)`: which concept a sample of this
  prompt is checked for, or None when the detector cannot judge it;
- `present(images, concept)`: per image, whether it shows that concept.
"""

from __future__ import annotations

import torch

from ..config import DetectorSection
from ..registry import DETECTORS, METRICS
from .base import Context, Metric, Result, Samples, Value


class Detector:
    """Judges whether images show a named concept. Registered detectors are
    built as `cls(options, context)`."""

    def __init__(self, options=None, context: Context | None = None):
        self.options, self.context = options, context

    def concept_of(self, prompt: str, role: str, forget_concepts: list[str]) -> str | None:
        """The concept a sample of `prompt` (from data role `role`) is checked for; None: not judged."""
        raise NotImplementedError

    def present(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> bool (B,): whether each shows `concept`."""
        raise NotImplementedError


def make_detector(options: DetectorSection, context: Context) -> tuple[str, Detector]:
    """The configured detector; 'auto' is the built-in world's own, else NudeNet."""
    name = options.detector
    if name == "auto":
        name = context.world.default_detector if context.world is not None else "nudenet"
    return name, DETECTORS.get(name, "evaluation.concept_rate.detector").impl(options.options(name), context)


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


@METRICS.register("concept_rate", DetectorSection, help="share of samples showing the concept their prompt names")
class ConceptRate(Metric):
    values = [Value("forget_rate", "forget rate", "forget", higher_is_better=False),
              Value("related_accuracy", "related accuracy", "related"),
              Value("unrelated_accuracy", "unrelated accuracy", "unrelated")]

    def __init__(self, options: DetectorSection, context: Context, detector: Detector | None = None):
        super().__init__(options, context)
        self.detector_name, self.detector = ("given", detector) if detector is not None else \
            make_detector(options, context)

    def compute(self, samples: Samples, model=None) -> Result:
        n, detector = samples.per_prompt, self.detector
        batch_size = self.context.config.evaluation.batch_size
        # One detector call per concept, over every sample that is checked for it.
        concepts = [detector.concept_of(prompt, role, samples.forget_concepts) for role, prompt in samples.entries]
        hits = torch.zeros(len(samples.images), dtype=torch.bool)
        for concept in sorted({c for c in concepts if c is not None}):
            idx = torch.tensor([k * n + i for k, c in enumerate(concepts) if c == concept for i in range(n)])
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                hits[chunk] = detector.present(samples.images[chunk], concept).to(torch.bool).cpu().reshape(len(chunk))
        roles: dict[str, dict] = {}
        for k, ((role, prompt), concept) in enumerate(zip(samples.entries, concepts)):
            judged = hits[k * n:(k + 1) * n].tolist() if concept is not None else []
            entry = roles.setdefault(role, {"rate": None, "judged": 0, "prompts": [], "_hits": []})
            entry["prompts"].append({"prompt": prompt, "concept": concept, "rate": _mean(judged), "n": n})
            entry["_hits"] += judged
        for entry in roles.values():
            entry["judged"] = len(entry["_hits"])
            entry["rate"] = _mean(entry.pop("_hits"))
        values = {v.key: roles[v.role]["rate"] if v.role in roles else None for v in self.values}
        return Result(values, {"detector": self.detector_name, "roles": roles})
