"""Concept-rate evaluation: detectors judge the concept a prompt names, and
evaluate_concepts samples every prompt with fixed seeds and reports rates."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn.config import EvaluationConfig, StudyConfig
from metaunlearn.errors import MetaunlearnError
from metaunlearn.evaluation import (Detector, DigitDetector, evaluate_concepts, evaluation_roles, forget_concepts,
                                    make_detector, write_results)
from metaunlearn.evaluation.digit_classifier import train_classifier
from metaunlearn.worlds.digits import DETECTOR_DIR, DigitsWorldConfig
from metaunlearn.worlds.digits_data import load_split, prompts_for

SIZE = DigitsWorldConfig.reduced().pipeline.image_size


@pytest.fixture(scope="module")
def world_with_detector(tmp_path_factory):
    """A folder holding only a quickly trained digit detector: all DigitDetector needs."""
    images, labels = load_split("train", SIZE)
    classifier = train_classifier((images + 1) / 2, labels, steps=150, seed=0)
    folder = tmp_path_factory.mktemp("world")
    classifier.save(folder / DETECTOR_DIR)
    return folder


def test_digit_detector_judges_real_digits(world_with_detector):
    detector = make_detector("digits", world_with_detector)
    assert isinstance(detector, DigitDetector)
    eights, _ = load_split("test", SIZE, digits=[8])
    ones, _ = load_split("test", SIZE, digits=[1])
    on_eights = detector.present((eights + 1) / 2, "eight")
    on_ones = detector.present((ones + 1) / 2, "8")  # a numeral names the same concept
    assert on_eights.dtype == torch.bool and on_eights.shape == (len(eights),)
    assert on_eights.float().mean() > 0.8
    assert on_ones.float().mean() < 0.2


def test_digit_concept_of_parses_prompts():
    detector = DigitDetector(torch.nn.Linear(1, 1))  # concept_of never touches the classifier
    assert detector.concept_of("a handwritten 8", "related", []) == "eight"
    assert detector.concept_of("the number eight", "unrelated", []) == "eight"
    assert all(detector.concept_of(p, "related", []) == "three" for p in prompts_for(3))
    # whole tokens only: no digit in "eighteen" or "1984"
    assert detector.concept_of("eighteen dogs in 1984", "related", []) is None
    # a forget prompt naming no digit is checked for the forget concept
    assert detector.concept_of("a handwritten number", "forget", ["eight"]) == "eight"
    assert detector.concept_of("a handwritten number", "forget", ["8"]) == "eight"
    assert detector.concept_of("a handwritten number", "related", ["eight"]) is None
    assert detector.concept_of("a 3 next to an 8", "forget", ["eight"]) == "eight"
    assert detector.concept_of("a 3 next to an 8", "related", ["eight"]) is None


class Brightness(Detector):
    """Stub: 'bright' is present when the mean pixel exceeds 0.5; unrelated prompts mentioning cats are unjudged."""

    name = "brightness"

    def __init__(self):
        self.calls = 0

    def concept_of(self, prompt, role, forget_concepts):
        return None if "cat" in prompt else "bright"

    def present(self, images, concept):
        self.calls += 1
        assert concept == "bright"
        return images.mean(dim=(1, 2, 3)) > 0.5


def test_evaluate_concepts_is_complete_deterministic_and_consistent(tiny_model, tmp_path):
    roles = {"forget": ["a photo of the digit eight", "eight"], "related": ["the digit three"],
             "unrelated": ["a dog", "a cat"]}
    config = EvaluationConfig(samples_per_prompt=3, steps=2, batch_size=4)
    detector = Brightness()
    results, images, prompts = evaluate_concepts(tiny_model, detector, roles, ["eight"], config, progress=False,
                                                 return_images=True)
    assert images.shape == (5 * 3, 3, tiny_model.image_size, tiny_model.image_size)
    assert prompts == [p for ps in roles.values() for p in ps for _ in range(3)]
    assert set(results["roles"]) == set(roles)
    bright = (images.mean(dim=(1, 2, 3)) > 0.5).float()
    for role, prompts_of_role in roles.items():
        entries = results["roles"][role]["prompts"]
        assert [e["prompt"] for e in entries] == prompts_of_role
        for e in entries:
            assert e["n"] == 3
            if "cat" in e["prompt"]:
                assert e["concept"] is None and e["rate"] is None
            else:
                k = prompts.index(e["prompt"])
                assert e["concept"] == "bright" and 0 <= e["rate"] <= 1
                assert e["rate"] == pytest.approx(bright[k:k + 3].mean().item())
    assert results["roles"]["unrelated"]["judged"] == 3  # the cat prompt is not judged
    assert results["forget_rate"] == results["roles"]["forget"]["rate"]
    assert results["forget_rate"] == pytest.approx(bright[:6].mean().item())
    assert results["unrelated_accuracy"] == pytest.approx(bright[9:12].mean().item())
    assert detector.calls == 3  # 12 judged samples, one concept, batches of 4

    again, images_again, _ = evaluate_concepts(tiny_model, Brightness(), roles, ["eight"], config,
                                               progress=False, return_images=True)
    assert torch.equal(images, images_again) and again == results

    # a role left out is None, and results round-trip through JSON
    only_forget = evaluate_concepts(tiny_model, Brightness(), {"forget": ["eight"]}, ["eight"],
                                    EvaluationConfig(samples_per_prompt=1, steps=1), progress=False)
    assert only_forget["related_accuracy"] is None and only_forget["unrelated_accuracy"] is None
    path = write_results(results, tmp_path / "eval" / "results.json")
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind


def test_evaluation_roles_and_forget_concepts_from_a_study():
    config = StudyConfig.from_dict({"concepts": {"forget": {"digits": ["8"]},
                                                 "related": {"prompts": ["the digit three"]}}})
    roles = evaluation_roles(config)
    assert list(roles) == ["forget", "related"]  # the empty unrelated role is left out
    assert roles["forget"] == prompts_for(8) and roles["related"] == ["the digit three"]
    assert forget_concepts(config) == ["eight"]
    nudity = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["a nude person"]}}})
    assert forget_concepts(nudity) == ["a nude person"]


def test_nudity_detector_finds_nothing_in_a_blank_image():
    pytest.importorskip("nudenet")
    from metaunlearn.evaluation import NudityDetector

    detector = NudityDetector()
    gray = torch.full((2, 3, 64, 64), 0.5)
    assert detector.present(gray, "nudity").tolist() == [False, False]
    assert detector.concept_of("a nude person", "forget", []) == "nudity"
    assert detector.concept_of("a person", "related", []) is None
    bgr = NudityDetector.to_bgr(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))[0]
    assert bgr.shape == (1, 1, 3) and bgr.tolist() == [[[0, 0, 255]]]  # red, in cv2's BGR order


def test_make_detector_errors_and_auto(tmp_path, world_with_detector):
    with pytest.raises(MetaunlearnError, match="no digit detector"):
        make_detector("digits", tmp_path)
    with pytest.raises(MetaunlearnError, match="unknown detector"):
        make_detector("clip", tmp_path)
    # an unlearned model folder has no detector/: 'auto' and 'digits' take it from the world
    assert isinstance(make_detector("auto", tmp_path, world_dir=world_with_detector), DigitDetector)
    assert isinstance(make_detector("digits", tmp_path, world_dir=world_with_detector), DigitDetector)
    (tmp_path / "world.json").write_text(json.dumps({"world": "digits"}))
    with pytest.raises(MetaunlearnError, match="no digit detector"):
        make_detector("auto", tmp_path)  # a digits world without its detector is an error, not NudeNet
