"""The Hugging Face detectors ('clip' zero-shot, 'hf_classifier'), on tiny random
models built offline. Verdicts are checked against the models run directly
through transformers, not through the detectors' own code path."""

from __future__ import annotations

import pytest
import torch

from helpers import build_tiny_classifier, build_tiny_clip
from metaunlearn.config import StudyConfig
from metaunlearn.errors import ConfigError, MetaunlearnError
from metaunlearn.metrics import ConceptRate, Context, Samples
from metaunlearn.metrics.concept_rate import make_detector
from metaunlearn.metrics.hf_classifier import BATCH_SIZE, ClassifierDetector, ClassifierOptions
from metaunlearn.metrics.zero_shot import ClipDetector, ClipOptions

ARTISTS = ["Van Gogh", "Picasso", "Monet", "a dog", "a cat", "a church"]
NEGATIVES = ["a photo", "a painting"]
CLASSES = ["church, church building", "dog", "cat", "tench"]
WORDS = ["a", "in", "the", "of", "van", "gogh", "picasso", "monet", "photo", "painting", "dog", "cat", "church",
         "style"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"clip": str(build_tiny_clip(root / "clip", words=WORDS)),
            "classifier": str(build_tiny_classifier(root / "classifier", CLASSES))}


def images(n: int = 16) -> torch.Tensor:
    """Solid colours and noise: inputs a random tiny CLIP tells apart (noise alone all lands on one label)."""
    g = torch.Generator().manual_seed(1)
    out = torch.rand(n, 3, 40, 40, generator=g)
    out[:n // 2] = torch.rand(n // 2, 3, 1, 1, generator=g).expand(n // 2, 3, 40, 40)
    return out


def direct_clip(folder: str, imgs: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, softmax of CLIPModel's own logits_per_image), straight from transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=texts, images=list((imgs * 255).round().byte()), return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = [model.get_image_features(pixel_values=inputs["pixel_values"]),
                 model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])]
        feats = [torch.nn.functional.normalize(f if torch.is_tensor(f) else f.pooler_output, dim=-1) for f in feats]
        logits = model(**inputs).logits_per_image
    return feats[0] @ feats[1].T, logits.softmax(dim=-1)


def test_clip_concept_of_labels_whole_words_and_the_forget_fallback(models):
    d = ClipDetector(ClipOptions(model=models["clip"], labels=["Van Gogh", "Picasso", "Monet"]))
    assert d.concept_of("a starry night by VAN GOGH", "related", []) == "Van Gogh"
    assert d.concept_of("monet and picasso", "unrelated", []) == "Picasso"  # the labels' order decides
    assert d.concept_of("Picassos everywhere", "related", []) is None  # whole words only
    assert d.concept_of("a starry night", "forget", ["Vincent van Gogh"]) == "Van Gogh"  # containment
    assert d.concept_of("a starry night", "forget", ["monet"]) == "Monet"
    assert d.concept_of("a starry night", "forget", ["Van Gogh", "Monet"]) is None  # two labels: no choice
    assert d.concept_of("a starry night", "forget", ["nudity"]) is None
    assert d.concept_of("a starry night", "related", ["Van Gogh"]) is None  # fallback is forget-only
    free = ClipDetector(ClipOptions(model=models["clip"], negatives=["a photo"]))
    assert [free.concept_of(p, "forget", []) for p in ("a dog", "a cat", "a dog")] == ["a dog", "a cat", "a dog"]
    assert free.candidates() == ["a dog", "a cat", "a photo"]


# (template, negatives) pairs under which this tiny CLIP's verdicts vary (with the
# first, some images go to a negative); negatives are used as written, untemplated.
@pytest.mark.parametrize("template, negatives", [
    ("{}", NEGATIVES), ("a painting in the style of {}", ["a painting in the style of a photo"])])
def test_clip_top1_is_the_argmax_of_clips_own_embeddings(models, template, negatives):
    d = ClipDetector(ClipOptions(model=models["clip"], labels=ARTISTS, negatives=negatives, template=template))
    imgs = images()
    cosine, probs = direct_clip(models["clip"], imgs, [template.format(a) for a in ARTISTS] + negatives)
    winner = cosine.argmax(dim=-1)
    assert len(set(winner.tolist()) & set(range(len(ARTISTS)))) >= 2, "the check needs images CLIP sorts apart"
    flagged = 0
    for k, label in enumerate(ARTISTS):
        verdict = d.present(imgs, label)
        assert verdict.dtype == torch.bool and verdict.tolist() == (winner == k).tolist(), label
        assert torch.allclose(d.scores(imgs, label), probs[:, k], atol=1e-5)
        flagged += int(verdict.sum())
    assert flagged == int((winner < len(ARTISTS)).sum())  # the rest went to a negative
    assert flagged < len(imgs) if template == "{}" else flagged == len(imgs)
    assert d.thresholds == () and d.conventions()["rule"] == "top-1"
    with pytest.raises(ValueError, match="no label 'Dali'"):
        d.present(imgs, "Dali")


def test_clip_threshold_rule_is_probability_at_least_t_and_monotone(models):
    imgs, counts = images(), []
    for t in (0.05, 0.15, 0.3, 0.6, 1.0):
        d = ClipDetector(ClipOptions(model=models["clip"], labels=ARTISTS, negatives=NEGATIVES, threshold=t))
        assert d.thresholds == (t,) and d.conventions()["rule"] == "p >= t"
        p, verdict = d.scores(imgs, "a church"), d.present(imgs, "a church")
        assert verdict.tolist() == (p >= t).tolist()
        counts.append(int(verdict.sum()))
    assert counts == sorted(counts, reverse=True) and counts[0] > 0 and counts[-1] == 0, counts


def test_clip_with_one_candidate_text_is_an_error_not_every_image_present(models):
    with pytest.raises(ConfigError, match="has one label \\('Monet'\\) and no negatives"):
        StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}}, "evaluation": {"concept_rate": {
            "detector": "clip", "clip": {"labels": ["Monet"]}}}})
    one = ClipDetector(ClipOptions(model=models["clip"], negatives=["a dog"]))  # its one prompt, no other
    with pytest.raises(MetaunlearnError, match="one candidate text only \\('a dog'\\)"):
        one.present(images(2), "a dog")
    with_negative = ClipDetector(ClipOptions(model=models["clip"], labels=["Monet"], negatives=["a photo"]))
    assert with_negative.scores(images(2), "Monet").shape == (2,)


def test_clip_without_labels_scores_the_prompts_against_each_other(models):
    prompts = ["a dog", "a cat", "a church"]
    d = ClipDetector(ClipOptions(model=models["clip"], negatives=["a photo"]))
    assert [d.concept_of(p, "unrelated", []) for p in prompts] == prompts
    imgs = images()
    cosine, probs = direct_clip(models["clip"], imgs, prompts + ["a photo"])
    for k, prompt in enumerate(prompts):
        assert d.present(imgs, prompt).tolist() == (cosine.argmax(dim=-1) == k).tolist()
        assert torch.allclose(d.scores(imgs, prompt), probs[:, k], atol=1e-5)


def test_clip_options_are_checked_by_the_study_config():
    def study(options: dict):
        return StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}},
                                      "evaluation": {"concept_rate": {"detector": "clip", "clip": options}}})

    with pytest.raises(ConfigError, match=r"clip\.template must contain '\{\}'") as err:
        study({"template": "a painting"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"clip\.threshold"):
        study({"threshold": 0})
    options = study({"labels": ["Monet", "Picasso"], "threshold": 0.5}).evaluation.options("concept_rate").options(
        "clip")
    assert options == ClipOptions(labels=["Monet", "Picasso"], threshold=0.5)


def direct_logits(folder: str, imgs: torch.Tensor, device: str = "cpu", chunk: int = BATCH_SIZE) -> torch.Tensor:
    """On the detector's device and in its batches: a GPU's kernels (TF32 matmuls, chosen by batch size)
    round otherwise than the CPU's, enough to flip a near tie between two classes."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(folder).eval().to(device)
    processor = ViTImageProcessor.from_pretrained(folder)
    pixels = processor(images=list((imgs * 255).round().byte()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return torch.cat([model(pixel_values=p.to(device)).logits.cpu() for p in pixels.split(chunk)])


def classifier(models, **options) -> ClassifierDetector:
    labels = options.pop("labels", {"church": ["church, church building"], "animal": ["dog", "cat"]})
    return ClassifierDetector(ClassifierOptions(model=models["classifier"], labels=labels, **options))


def test_classifier_concept_of(models):
    d = classifier(models)
    assert d.concept_of("a Church at dusk", "related", []) == "church"
    assert d.concept_of("an animal near a church", "related", []) == "church"  # the labels' order decides
    assert d.concept_of("churches", "related", []) is None  # whole words only
    assert d.concept_of("a place of worship", "forget", ["Church"]) == "church"
    assert d.concept_of("a place of worship", "forget", ["church", "animal"]) is None  # not a single one
    assert d.concept_of("a place of worship", "forget", ["temple"]) is None
    assert d.concept_of("a place of worship", "related", ["church"]) is None


def test_classifier_verdicts_follow_the_models_logits(models):
    imgs = images(70)  # more than one batch of 64
    d = classifier(models)
    logits = direct_logits(models["classifier"], imgs, d.device)
    top1, probs = logits.argmax(dim=-1), logits.softmax(dim=-1)
    church, animal = d.present(imgs, "church"), d.present(imgs, "animal")
    assert church.tolist() == (top1 == 0).tolist() and animal.tolist() == ((top1 == 1) | (top1 == 2)).tolist()
    assert 0 < int(animal.sum()) < len(imgs), "the check needs images that the classifier sorts apart"
    top2 = logits.topk(2, dim=-1).indices
    assert classifier(models, top_k=2).present(imgs, "church").tolist() == (top2 == 0).any(dim=-1).tolist()
    # the same batches on the same device: the softmax and the sums may still round otherwise on a GPU
    atol = 1e-5 if d.device == "cpu" else 1e-4
    assert torch.allclose(d.scores(imgs, "animal"), probs[:, 1] + probs[:, 2], atol=atol)
    assert classifier(models, top_k=len(CLASSES)).present(imgs, "church").all()
    church_scores = d.scores(imgs, "church")
    assert torch.allclose(church_scores, probs[:, 0], atol=atol)
    ranked = church_scores.sort().values
    t = float(ranked[34:36].mean())  # halfway between two images' scores: float noise cannot flip a verdict
    thresholded = classifier(models, threshold=t)
    assert thresholded.present(imgs, "church").tolist() == (church_scores >= t).tolist()
    assert int(thresholded.present(imgs, "church").sum()) == 35
    assert thresholded.conventions()["threshold"] == t and thresholded.thresholds == (t,)


def test_classifier_refuses_unknown_labels_and_missing_models(models, tmp_path):
    with pytest.raises(MetaunlearnError, match=r"'church' \(concept 'church'\) is not a label") as err:
        classifier(models, labels={"dog": ["dog"], "church": ["church"]})
    assert "church, church building" in str(err.value) and "\n" not in str(err.value)  # a valid example
    with pytest.raises(MetaunlearnError, match="cannot load an image classifier") as err:
        ClassifierDetector(ClassifierOptions(model=str(tmp_path / "missing"), labels={"dog": ["dog"]}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["clip", "hf_classifier"])
def test_concept_rate_is_the_mean_of_present(models, name):
    options = {"clip": {"model": models["clip"], "labels": ARTISTS, "negatives": NEGATIVES},
               "hf_classifier": {"model": models["classifier"], "labels": {"a church": ["church, church building"],
                                                                          "a dog": ["dog"]}, "top_k": 2}}[name]
    entries = [("forget", "a church at night"), ("forget", "a dog"), ("related", "a cat"), ("unrelated", "a tree")]
    config = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["a church"]}},
                                    "evaluation": {"batch_size": 5, "concept_rate": {"detector": name, name: options}}})
    context, section = Context(config, None, ""), config.evaluation.options("concept_rate")
    built, detector = make_detector(section, context)
    assert built == name
    n, imgs = 6, images(24)
    result = ConceptRate(section, context, detector=detector).compute(Samples(entries, imgs, n, ["a church"]))
    fresh = make_detector(section, context)[1]
    concepts = [fresh.concept_of(p, r, ["a church"]) for r, p in entries]
    hits = [fresh.present(imgs[k * n:(k + 1) * n], c) if c else None for k, c in enumerate(concepts)]
    assert result.values["forget_rate"] == pytest.approx(float(torch.cat(hits[:2]).float().mean()))
    cat = None if hits[2] is None else pytest.approx(float(hits[2].float().mean()))
    assert result.values["related_accuracy"] == cat and (name == "clip") == (cat is not None)
    assert result.values["unrelated_accuracy"] is None  # "a tree" names no label
    assert [e["concept"] for e in result.details["roles"]["forget"]["prompts"]] == ["a church", "a dog"]
    assert 0 < result.values["forget_rate"] < 1, "the check needs both verdicts"
    assert result.details["conventions"]["model"] == options["model"]


def test_a_methods_held_out_judge_keeps_a_label_free_clips_candidates():
    """RECE judges candidate edits on the forget prompts alone: a label-free clip detector still scores them
    against the related and unrelated prompts (as negatives, templated as the evaluation writes them)."""
    from metaunlearn.unlearn import held_out_config

    study = {"concepts": {"forget": {"prompts": ["a dog"]}, "related": {"prompts": ["a cat"]},
                          "unrelated": {"prompts": ["a church"]}},
             "evaluation": {"concept_rate": {"detector": "clip", "clip": {"template": "art of {}",
                                                                         "negatives": ["a photo"]}}}}
    config = StudyConfig.from_dict(study)
    judge = held_out_config(config).evaluation.options("concept_rate").options("clip")
    assert judge.negatives == ["art of a cat", "art of a church", "a photo"]
    assert config.evaluation.options("concept_rate").options("clip").negatives == ["a photo"]  # a copy changed
    labelled = StudyConfig.from_dict(study, ["evaluation.concept_rate.clip.labels=[dog, cat]"])
    assert held_out_config(labelled).evaluation.options("concept_rate").options("clip").negatives == ["a photo"]
