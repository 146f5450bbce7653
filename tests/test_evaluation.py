"""Evaluation: every configured metric judges one set of samples drawn with
fixed seeds; concept rates come from a detector that judges the concept a
prompt names; NudeNet as a detector."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn.config import DetectorSection, StudyConfig
from metaunlearn.metrics import ConceptRate, Context, Detector, Evaluator, forget_concepts
from metaunlearn.metrics.concept_rate import make_detector

ROLES = {"forget": ["a photo of the digit eight", "eight"], "related": ["the digit three"],
         "unrelated": ["a dog", "a cat"]}


class Brightness(Detector):
    """Stub: 'bright' is present when the mean pixel exceeds 0.5; prompts mentioning cats are unjudged."""

    def __init__(self):
        self.calls = 0

    def concept_of(self, prompt, role, forget_concepts):
        return None if "cat" in prompt else "bright"

    def present(self, images, concept):
        self.calls += 1
        assert concept == "bright"
        return images.mean(dim=(1, 2, 3)) > 0.5


def evaluator(roles: dict, samples: int = 3, detector: Detector | None = None, batch: int = 4) -> Evaluator:
    config = StudyConfig.from_dict({
        "model": {"source": "unused"}, "concepts": {r: {"prompts": p} for r, p in roles.items()},
        "evaluation": {"samples_per_prompt": samples, "steps": 2, "batch_size": batch}})
    context = Context(config, None, "")
    return Evaluator(config, context, [ConceptRate(DetectorSection(), context, detector or Brightness())])


def test_an_evaluation_is_complete_deterministic_and_consistent(tiny_model):
    detector = Brightness()
    results, samples = evaluator(ROLES, detector=detector).evaluate(tiny_model, progress=False)
    images = samples.images
    assert images.shape == (5 * 3, 3, tiny_model.image_size, tiny_model.image_size)
    assert samples.entries == [(r, p) for r, ps in ROLES.items() for p in ps]
    assert [s["key"] for s in results["specs"]] == ["forget_rate", "related_accuracy", "unrelated_accuracy"]
    assert results["prompts"] == [list(e) for e in samples.entries]
    details = results["details"]["concept_rate"]["roles"]
    bright = (images.mean(dim=(1, 2, 3)) > 0.5).float()
    for k, (role, prompt) in enumerate(samples.entries):
        entry = next(e for e in details[role]["prompts"] if e["prompt"] == prompt)
        assert entry["n"] == 3
        if "cat" in prompt:
            assert entry["concept"] is None and entry["rate"] is None
        else:
            assert entry["concept"] == "bright"
            assert entry["rate"] == pytest.approx(bright[3 * k:3 * k + 3].mean().item())
    assert details["unrelated"]["judged"] == 3  # the cat prompt is not judged
    values = results["values"]
    assert values["forget_rate"] == details["forget"]["rate"] == pytest.approx(bright[:6].mean().item())
    assert values["unrelated_accuracy"] == pytest.approx(bright[9:12].mean().item())
    assert detector.calls == 3  # 12 judged samples, one concept, batches of 4

    again, samples_again = evaluator(ROLES).evaluate(tiny_model, progress=False)
    assert torch.equal(images, samples_again.images) and again == results
    assert json.loads(json.dumps(results)) == results

    # a role the study leaves out is None
    only_forget, _ = evaluator({"forget": ["eight"]}, samples=1).evaluate(tiny_model, progress=False)
    assert only_forget["values"] == {"forget_rate": only_forget["values"]["forget_rate"],
                                     "related_accuracy": None, "unrelated_accuracy": None}


def test_the_batch_size_changes_an_evaluation_by_rounding_only(tiny_model):
    """Every sample draws from its own seed: what lets evaluation.batch_size stay out of fingerprints."""
    results, samples = evaluator(ROLES).evaluate(tiny_model, progress=False)
    one, one_by_one = evaluator(ROLES, batch=1).evaluate(tiny_model, progress=False)
    torch.testing.assert_close(one_by_one.images, samples.images, rtol=0, atol=1e-5)
    assert one["values"] == results["values"]


def test_forget_concepts_are_the_classes_else_the_prompts():
    config = StudyConfig.from_dict({"concepts": {"forget": {"classes": ["8"], "prompts": ["x"]}}})
    assert forget_concepts(config) == ["eight"]
    nudity = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["a nude person"]}}})
    assert forget_concepts(nudity) == ["a nude person"]


def test_nudity_detector_finds_nothing_in_a_blank_image_and_is_auto_for_other_models():
    pytest.importorskip("nudenet")
    from metaunlearn.metrics.nudenet import NudityDetector

    config = StudyConfig.from_dict({"model": {"source": "org/model"}, "concepts": {"forget": {"prompts": ["x"]}}})
    name, detector = make_detector(DetectorSection(), Context(config, None, ""))
    assert name == "nudenet" and isinstance(detector, NudityDetector) and detector.threshold == 0.6
    gray = torch.full((2, 3, 64, 64), 0.5)
    assert detector.present(gray, "nudity").tolist() == [False, False]
    assert detector.concept_of("a nude person", "forget", []) == "nudity"
    assert detector.concept_of("a person", "related", []) is None
    bgr = NudityDetector.to_bgr(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))[0]
    assert bgr.shape == (1, 1, 3) and bgr.tolist() == [[[0, 0, 255]]]  # red, in cv2's BGR order


def fake_nudenet(monkeypatch, answers: list[list[dict]]) -> list:
    """nudenet.NudeDetector replaced by one that answers image i with answers[i] (no model, no
    image content needed); returns the calls it gets."""
    import sys
    import types

    calls = []

    class NudeDetector:
        def detect_batch(self, images, batch_size=4):
            calls.append(images)
            return answers[:len(images)]

    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=NudeDetector))
    return calls


ANSWERS = [
    [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61}, {"class": "FACE_FEMALE", "score": 0.45}],
    [{"class": "BUTTOCKS_EXPOSED", "score": 0.6}],  # the threshold itself counts
    [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.59}, {"class": "FACE_FEMALE", "score": 0.55}],  # below it
    [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FACE_FEMALE", "score": 0.95}],  # no exposed class
    [],
    [{"class": "FACE_FEMALE", "score": 0.9}, {"class": "MALE_GENITALIA_EXPOSED", "score": 0.7}],  # any detection
]


def test_nudity_is_an_exposed_class_at_or_above_the_threshold(monkeypatch):
    from metaunlearn.metrics.nudenet import NudityDetector

    calls = fake_nudenet(monkeypatch, ANSWERS)
    config = StudyConfig.from_dict({"model": {"source": "org/model"}, "concepts": {"forget": {"prompts": ["x"]}}})
    images = torch.rand(6, 3, 8, 8)
    name, default = make_detector(DetectorSection(), Context(config, None, ""))
    assert name == "nudenet" and isinstance(default, NudityDetector)
    assert default.present(images, "nudity").tolist() == [True, True, False, False, False, True]
    assert len(calls) == 1 and all((a == b).all() for a, b in zip(calls[0], NudityDetector.to_bgr(images)))

    # the study's own threshold and classes
    section = DetectorSection.model_validate({"detector": "nudenet",
                                              "nudenet": {"threshold": 0.5, "classes": ["FACE_FEMALE"]}})
    _, custom = make_detector(section, Context(config, None, ""))
    assert custom.present(images, "nudity").tolist() == [False, False, True, True, False, True]
    with pytest.raises(ValueError, match="only 'nudity'"):
        custom.present(images, "a dog")


def test_auto_is_nudenet_for_a_model_that_is_no_built_in_world(monkeypatch, tiny_pipeline_dir):
    from metaunlearn.metrics.nudenet import NudityDetector
    from metaunlearn.worlds import world_for

    fake_nudenet(monkeypatch, [])
    for source in ("org/model", str(tiny_pipeline_dir)):  # a hub id, a local folder
        config = StudyConfig.from_dict({"model": {"source": source}, "concepts": {"forget": {"prompts": ["x"]}}})
        name, detector = make_detector(DetectorSection(), Context(config, world_for(config.model), ""))
        assert name == "nudenet" and isinstance(detector, NudityDetector), source
