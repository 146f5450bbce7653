"""The built-in digits world: data splits, tokenizer, and a reduced build that
runs in seconds and leaves loadable, cached, deterministic artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn.worlds import digits
from metaunlearn.worlds.digits_data import (DIGIT_WORDS, SPLITS, digit_of_word, load_split, prompts_for,
                                            vocabulary)
from metaunlearn.worlds.pipeline import build_tokenizer


def test_splits_are_disjoint_and_cover_every_digit():
    from metaunlearn.worlds.digits_data import _split_indices

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


def test_reduced_world_builds_loads_and_caches(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    config = digits.DigitsWorldConfig.reduced()
    folder = digits.get_world(config, log=lambda *_: None)
    report = json.loads((folder / digits.REPORT_FILE).read_text())
    assert report["key"] == config.key() and report["timings_s"]["total"] < 60
    metrics = report["metrics"]
    assert 0 <= metrics["detector_accuracy_real"] <= 1 and len(metrics["sample_accuracy_per_digit"]) == 10
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe("the number eight", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    detector = digits.load_detector(folder)
    assert detector(image).shape == (1, 10)

    # cached: a second call returns the folder without building
    monkeypatch.setattr(digits, "build_world", lambda *a, **k: pytest.fail("rebuilt a cached world"))
    assert digits.get_world(config) == folder
    # a changed config is a different world
    changed = digits.DigitsWorldConfig.reduced()
    changed.seed = 1
    assert changed.key() != config.key()


def test_world_build_is_deterministic(tmp_path):
    config = digits.DigitsWorldConfig.reduced()
    digits.build_world(config, tmp_path / "a", log=lambda *_: None)
    digits.build_world(config, tmp_path / "b", log=lambda *_: None)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_world_config_is_sized_for_the_quality_bar():
    # the default must stay the measured one (see bench/RESULTS.md); a silent
    # shrink would break the world's quality guarantees
    config = digits.DigitsWorldConfig()
    assert config.unet_steps >= 1000 and config.eval_samples_per_digit == 100
    assert config.pipeline.unet_attention[0] is False  # no attention at the highest resolution


@pytest.mark.slow
def test_default_world_meets_its_quality_bar(tmp_path):
    """The full build (about 4 CPU minutes): the numbers the world promises."""
    report = digits.build_world(digits.DigitsWorldConfig(), tmp_path / "world", log=lambda *_: None)
    m = report["metrics"]
    assert m["detector_accuracy_real"] >= 0.97
    assert m["detector_accuracy_reconstructed"] >= 0.95
    assert m["sample_accuracy_min"] >= 0.90
    assert report["timings_s"]["total"] <= 360
