"""The digits world's concept detector: a sample shows digit d when the
world's classifier names d. Registered as detector 'digits'."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import MetaunlearnError
from ...metrics.concept_rate import Detector
from ...metrics.features import Features
from ...registry import DETECTORS, FEATURES
from .dataset import DIGIT_WORDS, digit_of_word

# A digit named as a whole token: "eight" or "8", not the 8 in "1984" or "eighteen".
_DIGIT_TOKEN = re.compile(r"(?<![a-z0-9])(" + "|".join(DIGIT_WORDS) + r"|[0-9])(?![a-z0-9])")
CLASSIFIER_DIR = "detector"  # inside the world's folder


def digits_named(prompt: str) -> list[int]:
    """Distinct digits a prompt names, in order of appearance."""
    found = [digit_of_word(m) for m in _DIGIT_TOKEN.findall(prompt.lower())]
    return list(dict.fromkeys(found))


@DETECTORS.register("digits", help="the digits world's classifier")
class DigitDetector(Detector):
    def __init__(self, options=None, context=None, classifier=None, batch_size: int = 512):
        if classifier is None:
            world = getattr(context, "world", None)
            if world is None or world.name != "digits":
                raise MetaunlearnError("the 'digits' detector judges the digits world only (model.source: digits)")
            classifier = load_classifier(world.folder())
        self.classifier = classifier.eval()
        self.batch_size = batch_size

    def concept_of(self, prompt: str, role: str, forget_concepts: list[str]) -> str | None:
        named = digits_named(prompt)
        forget = [DIGIT_WORDS[d] for c in forget_concepts for d in digits_named(str(c))[:1]]
        if len(named) == 1:
            return DIGIT_WORDS[named[0]]
        if role == "forget":
            # "a 3 next to an 8": judge the forgotten one; no digit at all ("a
            # handwritten number"): the forget concept, when there is only one.
            hits = [DIGIT_WORDS[d] for d in named if DIGIT_WORDS[d] in forget]
            if hits:
                return hits[0]
            if not named and len(forget) == 1:
                return forget[0]
        return None  # no digit, or several with no way to choose: not judged

    @torch.no_grad()
    def present(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        digit = digit_of_word(concept)
        device = next(self.classifier.parameters()).device
        return self.classifier.predict(images.to(device), self.batch_size).cpu() == digit


@FEATURES.register("digits", help="the digits world's classifier, penultimate layer (128-d)")
class DigitFeatures(Features):
    def __init__(self, options=None, context=None, classifier=None):
        super().__init__(options, context)
        self.classifier = classifier or DigitDetector(options, context).classifier

    def extract(self, images):
        return self.classifier.embed(images.to(next(self.classifier.parameters()).device))

    def conventions(self) -> dict:
        return {"layer": "classifier penultimate, 128-d"}


def load_classifier(world_dir: str | Path):
    from .classifier import DigitClassifier

    folder = Path(world_dir) / CLASSIFIER_DIR
    if not (folder / "config.json").is_file():
        raise MetaunlearnError(f"'{world_dir}' has no digit classifier ({CLASSIFIER_DIR}/): not a built digits world")
    return DigitClassifier.load(folder)
