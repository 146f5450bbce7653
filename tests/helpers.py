"""Builders shared by the tests: concept data from random latents with real
prompt embeddings, so no image has to be generated."""

from __future__ import annotations

import torch

from metaunlearn import DiffusionModel
from metaunlearn.data import ConceptData, RoleData
from metaunlearn.metrics import Detector
from metaunlearn.registry import DETECTORS

FORGET, RELATED, UNRELATED = "a photo of the digit eight", "the digit three", "a dog"


def role(model: DiffusionModel, name: str, prompts: list[str], n: int, seed: int) -> RoleData:
    g = torch.Generator().manual_seed(seed)
    return RoleData(name, torch.randn(n, *model.latent_shape, generator=g), torch.arange(n) % len(prompts),
                    prompts, model.encode_prompts(prompts), [f"random:{seed}:{i}" for i in range(n)])


def concept_data(model: DiffusionModel, split: str = "train") -> ConceptData:
    return ConceptData(role(model, "forget", [FORGET, "a photo of the digit one"], 4, 0),
                       role(model, "related", [RELATED], 3, 1), role(model, "unrelated", [UNRELATED], 3, 2), split)


@DETECTORS.register("bright", help="test stand-in: every prompt judged, bright = present")
class BrightDetector(Detector):
    """A stand-in for models with no detector: judges every prompt, and calls the
    concept present when an image is brighter than mid-gray."""

    def concept_of(self, prompt, role, forget_concepts):
        return "bright"

    def present(self, images, concept):
        return images.mean(dim=(1, 2, 3)) > 0.5
