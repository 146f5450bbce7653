"""Zero-shot CLIP as a concept detector (registered as 'clip'): an image shows
a concept when CLIP matches it with that concept's text rather than with the
other candidates' (artists, objects, ... or, without labels, the study's own
prompts). Candidates are scored against each other, not against a fixed cosine
cut-off: raw CLIP similarities are not comparable across models or prompts,
while a softmax over a fixed label set is (the usual zero-shot protocol)."""

from __future__ import annotations

import re
from typing import Optional

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import MetaunlearnError
from ..registry import DETECTORS, Options
from .base import device_of
from .concept_rate import Detector
from .hf_models import DEFAULT_CLIP, ClipEmbedder

BATCH_SIZE = 64


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, ignoring case ("cat" is not in "catalog").
    Lookarounds instead of \\b, so phrases that begin or end with punctuation still match."""
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


class ClipOptions(Options):
    model: str = Field(DEFAULT_CLIP, description="CLIP model: a hub id or a local folder.")
    labels: list[str] = Field([], description=(
        "Concepts it tells apart (e.g. ['Van Gogh', 'Picasso', 'Monet']); a prompt is checked for the first "
        "one it names. Empty: every evaluation prompt of the study is its own label."))
    template: str = Field("{}", description=(
        "Text CLIP compares images with, '{}' standing for a label, e.g. 'a painting in the style of {}'."))
    negatives: list[str] = Field([], description=(
        "Extra texts, used as written, that are never a prompt's concept (e.g. 'a photo', 'a painting'), "
        "so an image that shows none of the concepts has somewhere to go."))
    threshold: Optional[float] = Field(None, gt=0, le=1, description=(
        "None: present when the concept's text is CLIP's top-1 among all candidates; a number: present "
        "when its softmax probability over the candidates is at least this."))

    @model_validator(mode="after")
    def _two_candidates(self) -> "ClipOptions":
        if len(set(self.labels)) == 1 and not [n for n in self.negatives if n not in self.labels]:
            raise ValueError(f"has one label ('{self.labels[0]}') and no negatives: a softmax over one text says "
                             "every image shows it; add labels, or negatives such as ['a photo', 'a painting']")
        return self

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError("must contain '{}' where the label goes, e.g. 'a painting in the style of {}'")
        return value


@DETECTORS.register("clip", ClipOptions, help="zero-shot CLIP: the concept's text wins among the candidates")
class ClipDetector(Detector):
    def __init__(self, options: ClipOptions | None = None, context=None):
        super().__init__(options or ClipOptions(), context)
        self.clip = ClipEmbedder(self.options.model, device_of(context))
        # The model's own temperature: 100 for released CLIPs (what zero-shot papers use).
        self.logit_scale = float(self.clip.model.logit_scale.exp())
        # With a threshold the probability decides (and can be swept); without, top-1 does.
        self.thresholds = () if self.options.threshold is None else (self.options.threshold,)
        self.prompts: list[str] = []  # without labels: every prompt concept_of has seen, in order
        self._text: dict[tuple[str, ...], torch.Tensor] = {}

    def concept_of(self, prompt: str, role: str, forget_concepts: list[str]) -> str | None:
        labels = self.options.labels
        if not labels:
            # ConceptRate asks about every prompt before judging any image, so all of
            # them are candidates by the time present() runs.
            if prompt not in self.prompts:
                self.prompts.append(prompt)
            return prompt
        for label in labels:
            if mentions(prompt, label):
                return label
        if role == "forget":
            # A forget prompt that names no label ("a starry night") is judged for the
            # forgotten concept, if the forget concepts point at one label only.
            forget = [c.lower() for c in forget_concepts if c]
            hits = [lab for lab in labels if any(lab.lower() in c or c in lab.lower() for c in forget)]
            if len(hits) == 1:
                return hits[0]
        return None

    def candidates(self) -> list[str]:
        """The concepts scored against each other; negatives last."""
        concepts = self.options.labels or self.prompts
        return list(dict.fromkeys(concepts)) + [n for n in dict.fromkeys(self.options.negatives) if n not in concepts]

    def _texts(self, candidates: list[str]) -> torch.Tensor:
        key = tuple(candidates)
        if key not in self._text:
            concepts = self.options.labels or self.prompts
            texts = [self.options.template.replace("{}", c) if c in concepts else c for c in candidates]
            self._text[key] = self.clip.text_embeddings(texts)
        return self._text[key]

    def probabilities(self, images: torch.Tensor, concept: str) -> tuple[torch.Tensor, int]:
        """Softmax over the candidates (B, C) and the concept's column."""
        if not self.options.labels and concept not in self.prompts:
            self.prompts.append(concept)  # a caller that skipped concept_of
        if concept not in (self.options.labels or self.prompts):
            raise ValueError(f"the clip detector has no label '{concept}'; its labels: {self.options.labels}")
        candidates = self.candidates()
        if len(candidates) < 2:  # a softmax over one text is 1 for every image: always "present"
            raise MetaunlearnError(f"the clip detector has one candidate text only ('{candidates[0]}'), so every "
                                   "image would match it: give evaluation.concept_rate.clip two or more labels, or "
                                   "negatives (e.g. ['a photo', 'a painting'])")
        text = self._texts(candidates)
        images_emb = torch.cat([self.clip.image_embeddings(images[i:i + BATCH_SIZE])
                                for i in range(0, len(images), BATCH_SIZE)])
        probs = (self.logit_scale * images_emb @ text.T).softmax(dim=-1)
        return probs, candidates.index(concept)

    def scores(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        probs, column = self.probabilities(images, concept)
        return probs[:, column]

    def present(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        if self.thresholds:
            return super().present(images, concept)
        probs, column = self.probabilities(images, concept)
        return probs.argmax(dim=-1) == column

    def conventions(self) -> dict:
        o = self.options
        return {"model": o.model, "template": o.template, "labels": list(o.labels) or "the prompts",
                "negatives": list(o.negatives), "rule": "top-1" if o.threshold is None else "p >= t",
                "threshold": o.threshold, "logit_scale": self.logit_scale}
