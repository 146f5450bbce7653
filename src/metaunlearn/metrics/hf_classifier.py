"""Any Hugging Face image classifier as a concept detector (registered as
'hf_classifier'), e.g. an ImageNet ResNet-50 for objects, as ESD's object
evaluation does: an image shows a concept when one of the model's labels that
mean it is among its top-k predictions (or, with a threshold, when those
labels' summed probability reaches it). Several model labels per concept,
because ImageNet splits many concepts ("dog" is 120 breeds)."""

from __future__ import annotations

import difflib
from typing import Annotated, Optional

import torch
from pydantic import Field

from ..errors import MetaunlearnError
from ..registry import DETECTORS, Options
from .base import device_of
from .concept_rate import Detector
from .hf_models import load_image_classifier, to_uint8
from .zero_shot import BATCH_SIZE, mentions


class ClassifierOptions(Options):
    model: str = Field(description="Image-classification model: a hub id or a local folder (e.g. microsoft/resnet-50).")
    labels: dict[str, Annotated[list[str], Field(min_length=1)]] = Field(min_length=1, description=(
        "Concept -> the model's label names that mean it, e.g. {'church': ['church, church building']}; "
        "a prompt is checked for the first concept it names."))
    top_k: int = Field(1, ge=1, description="Present when one of the concept's labels is among the top-k predictions.")
    threshold: Optional[float] = Field(None, gt=0, le=1, description=(
        "If set, instead of top-k: present when the concept's labels' summed softmax probability is at least this."))


@DETECTORS.register("hf_classifier", ClassifierOptions, help="a Hugging Face image classifier's top-k labels")
class ClassifierDetector(Detector):
    def __init__(self, options: ClassifierOptions, context=None):
        super().__init__(options, context)
        self.device = device_of(context)
        self.model, self.processor = load_image_classifier(options.model, self.device)
        names = {str(name): int(i) for i, name in self.model.config.id2label.items()}
        # A misspelt label would silently never fire and read as perfect forgetting: refuse it.
        self.ids: dict[str, list[int]] = {}
        for concept, labels in options.labels.items():
            for label in labels:
                if label not in names:
                    near = difflib.get_close_matches(label, list(names), n=3) or list(names)[:3]
                    raise MetaunlearnError(f"hf_classifier: '{label}' (concept '{concept}') is not a label of "
                                           f"{options.model}; valid labels include: {'; '.join(near)}")
            self.ids[concept] = sorted({names[label] for label in labels})
        self.top_k = min(options.top_k, len(names))
        self.thresholds = () if options.threshold is None else (options.threshold,)

    def concept_of(self, prompt: str, role: str, forget_concepts: list[str]) -> str | None:
        for concept in self.options.labels:
            if mentions(prompt, concept):
                return concept
        if role == "forget" and len(forget_concepts) == 1:
            # "a place of worship" still tests the forgotten "church"
            keys = {k.lower(): k for k in self.options.labels}
            return keys.get(str(forget_concepts[0]).lower())
        return None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH_SIZE):
                chunk = list(to_uint8(images[start:start + BATCH_SIZE]))
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
                out.append(self.model(pixel_values=pixels).logits.float().cpu())
        return torch.cat(out)

    def _ids(self, concept: str) -> torch.Tensor:
        if concept not in self.ids:
            raise ValueError(f"the hf_classifier detector has no concept '{concept}'; its concepts: {list(self.ids)}")
        return torch.tensor(self.ids[concept])

    def scores(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        ids = self._ids(concept)
        return self.logits(images).softmax(dim=-1)[:, ids].sum(dim=-1)

    def present(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        if self.thresholds:
            return super().present(images, concept)
        ids = self._ids(concept)
        top = self.logits(images).topk(self.top_k, dim=-1).indices
        return torch.isin(top, ids).any(dim=-1)

    def conventions(self) -> dict:
        o = self.options
        rule = f"p >= {o.threshold} (summed over the concept's labels)" if o.threshold is not None else \
            f"a concept label in the top-{self.top_k}"
        return {"model": o.model, "labels": {k: list(v) for k, v in o.labels.items()}, "top_k": self.top_k,
                "threshold": o.threshold, "rule": rule}
