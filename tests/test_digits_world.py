"""The built-in digits world: data splits, tokenizer, its detector, and a
reduced build that runs in seconds and leaves loadable, cached, deterministic
artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn.config import DetectorSection, StudyConfig
from metaunlearn.errors import MetaunlearnError
from metaunlearn.metrics import Context
from metaunlearn.metrics.concept_rate import make_detector
from metaunlearn.worlds.digits import DigitsOptions, DigitsWorld
from metaunlearn.worlds.digits import build as digits
from metaunlearn.worlds.digits.classifier import train_classifier
from metaunlearn.worlds.digits.dataset import (DIGIT_WORDS, SPLITS, digit_of_word, load_split, prompts_for,
                                               vocabulary)
from metaunlearn.worlds.digits.detector import CLASSIFIER_DIR, DigitDetector, load_classifier
from metaunlearn.worlds.pipeline import build_tokenizer

SIZE = digits.DigitsWorldConfig.reduced().pipeline.image_size


def test_splits_are_disjoint_and_cover_every_digit():
    from metaunlearn.worlds.digits.dataset import _split_indices

    idx = _split_indices(0)
    sets = [set(idx[s]) for s in SPLITS]
    assert sum(map(len, sets)) == 1797 and len(set.union(*sets)) == 1797
    for split in SPLITS:
        images, labels = load_split(split)
        assert images.shape[1:] == (3, 32, 32) and images.min() >= -1 and images.max() <= 1
        assert set(labels.tolist()) == set(range(10))
    eights, labels = load_split("attack", digits=[8])
    assert len(eights) > 20 and (labels == 8).all()


def test_prompts_name_digits_in_several_phrasings():
    assert len(set(prompts_for(8))) >= 5
    assert any("8" in p for p in prompts_for(8)) and any("eight" in p for p in prompts_for(8))
    assert digit_of_word("eight") == digit_of_word("8") == 8
    with pytest.raises(ValueError, match="not a digit"):
        digit_of_word("eleven")


def test_tokenizer_keeps_words_whole_and_knows_every_character():
    tok = build_tokenizer(vocabulary())
    for word in DIGIT_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("Zebra, 8!", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids  # punctuation and unknown words spell out, never <unk>
    a = tok(prompts_for(3)[0]).input_ids
    b = tok(prompts_for(8)[0]).input_ids
    assert a != b


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_reduced_world_builds_loads_caches_and_builds_again_bit_for_bit(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    config = digits.DigitsWorldConfig.reduced()
    folder = digits.get_world(config, log=lambda *_: None)
    report = json.loads((folder / digits.REPORT_FILE).read_text())
    assert report["key"] == config.key()
    # build times are recorded, not judged here (a busy machine is slow, not wrong): bench/README.md
    assert set(report["timings_s"]) == {"vae", "detector", "unet", "evaluation", "total"}
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe("the number eight", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    detector = load_classifier(folder)
    assert detector(image).shape == (1, 10)
    # the reported quality is the saved detector's on the held-out real digits
    metrics = report["metrics"]
    test_x, test_y = load_split("test", config.pipeline.image_size, seed=config.seed)
    accuracy = (detector.predict((test_x + 1) / 2) == test_y).float().mean().item()
    assert metrics["detector_accuracy_real"] == round(accuracy, 4)
    per_digit = metrics["sample_accuracy_per_digit"]
    assert list(per_digit) == [str(d) for d in range(10)] and metrics["sample_accuracy_min"] == min(per_digit.values())

    # deterministic: a second build of the same config gives the same weights
    digits.build_world(config, tmp_path / "again", log=lambda *_: None)
    a, b = _tensors(folder), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # cached: a second call returns the folder without building
    monkeypatch.setattr(digits, "build_world", lambda *a, **k: pytest.fail("rebuilt a cached world"))
    assert digits.get_world(config) == folder
    # a changed config is a different world
    changed = digits.DigitsWorldConfig.reduced()
    changed.seed = 1
    assert changed.key() != config.key()


def test_default_world_config_is_sized_for_the_quality_bar():
    # the default must stay the measured one (see bench/RESULTS.md); a silent
    # shrink would break the world's quality guarantees
    config = digits.DigitsWorldConfig()
    assert config.unet_steps >= 1000 and config.eval_samples_per_digit == 100
    assert config.pipeline.unet_attention[0] is False  # no attention at the highest resolution


@pytest.mark.slow
def test_default_world_meets_its_quality_bar(tmp_path):
    """The full build (about 4 CPU minutes): the quality the world promises (its build time is a
    benchmark number: bench/README.md)."""
    report = digits.build_world(digits.DigitsWorldConfig(), tmp_path / "world", log=lambda *_: None)
    m = report["metrics"]
    assert m["detector_accuracy_real"] >= 0.97
    assert m["detector_accuracy_reconstructed"] >= 0.95
    assert m["sample_accuracy_min"] >= 0.90


# ----------------------------------------------------------------- its detector
@pytest.fixture(scope="module")
def world_with_detector(tmp_path_factory):
    """A folder holding only a quickly trained digit classifier: all DigitDetector needs."""
    images, labels = load_split("train", SIZE)
    classifier = train_classifier((images + 1) / 2, labels, steps=150, seed=0)
    folder = tmp_path_factory.mktemp("world")
    classifier.save(folder / CLASSIFIER_DIR)
    return folder


def context(world=None) -> Context:
    config = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["the number eight"]}}})
    return Context(config, world, "")


def test_digit_detector_judges_real_digits(world_with_detector):
    world = DigitsWorld(DigitsOptions(), world_with_detector)
    for choice in ("digits", "auto"):  # 'auto' is the world's own detector
        name, detector = make_detector(DetectorSection(detector=choice), context(world))
        assert name == "digits" and isinstance(detector, DigitDetector)
    eights, _ = load_split("test", SIZE, digits=[8])
    ones, _ = load_split("test", SIZE, digits=[1])
    on_eights = detector.present((eights + 1) / 2, "eight")
    on_ones = detector.present((ones + 1) / 2, "8")  # a numeral names the same concept
    assert on_eights.dtype == torch.bool and on_eights.shape == (len(eights),)
    assert on_eights.float().mean() > 0.8
    assert on_ones.float().mean() < 0.2


def test_digit_detector_needs_the_digits_world(tmp_path):
    with pytest.raises(MetaunlearnError, match="judges the digits world only"):
        make_detector(DetectorSection(detector="digits"), context())
    with pytest.raises(MetaunlearnError, match="no digit classifier"):
        make_detector(DetectorSection(detector="digits"), context(DigitsWorld(DigitsOptions(), tmp_path)))


def test_digit_concept_of_parses_prompts():
    detector = DigitDetector(classifier=torch.nn.Linear(1, 1))  # concept_of never touches the classifier
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


def test_a_model_saved_from_the_world_is_a_folder_of_it(world_with_detector, tmp_path):
    """An unlearned digits model marked by its world: a study on top of it keeps the world's classes,
    detector and splits (world.json's seed)."""
    from metaunlearn.config import ModelConfig
    from metaunlearn.worlds import world_for

    (world_with_detector / "world.json").write_text(json.dumps({"world": "digits", "config": {"seed": 7}}))
    released = tmp_path / "unlearn" / "esd-seed0" / "model"
    released.mkdir(parents=True)
    DigitsWorld(DigitsOptions(), world_with_detector).mark(released)
    assert (released / CLASSIFIER_DIR / "classifier.safetensors").is_file()
    world = world_for(ModelConfig(source=str(released)))
    assert isinstance(world, DigitsWorld) and world.folder() == released and world.split_seed() == 7
    name, detector = make_detector(DetectorSection(detector="auto"), context(world))
    assert name == "digits" and isinstance(detector, DigitDetector)
    on_top = StudyConfig.from_dict({"model": {"source": str(released)},
                                    "concepts": {"forget": {"classes": ["8"]}, "related": {"classes": ["three"]}}})
    assert on_top.concepts.forget.classes == ["eight"]
