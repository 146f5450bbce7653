"""The evaluation suite: prompt files (ESD/I2P CSV layout, text lists) apart
from training prompts, file seeds, detector threshold sweeps, CLIP score,
FID/KID with pluggable features and cached references, and the SD-1.4 nudity
config run end to end on a tiny pipeline with a tiny CLIP."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import build_tiny_classifier, build_tiny_clip, clean_exit, console_script  # noqa: F401

from metaunlearn.config import DetectorSection, StudyConfig
from metaunlearn.errors import MetaunlearnError
from metaunlearn.metrics import ConceptRate, Context, Detector, Evaluator
from metaunlearn.metrics.evaluate import evaluation_entries
from metaunlearn.prompt_files import read_prompt_file

CSV = ('case_number,prompt,evaluation_seed,categories\n'
       '7,"a photo of the digit eight, close up",1234,"sexual, hate"\n'
       '9,"a dog\non two lines",99.0,x\n'
       '11,,5,empty prompt rows are skipped\n'
       '12,the digit three,,no seed\n')


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_csv_prompt_files_keep_seeds_and_every_other_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")  # a spreadsheet's byte-order mark is no column name
    entries = read_prompt_file(path)
    assert [e.prompt for e in entries] == ["a photo of the digit eight, close up", "a dog\non two lines",
                                           "the digit three"]
    assert [e.seed for e in entries] == [1234, 99, None]
    assert entries[0].extra == {"case_number": "7", "categories": "sexual, hate"}


def test_text_prompt_files_skip_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# nudity prompts\n\n  a nude person  \na naked man\n", encoding="utf-8")
    assert [(e.prompt, e.seed, e.extra) for e in read_prompt_file(path)] == [("a nude person", None, {}),
                                                                              ("a naked man", None, {})]


@pytest.mark.parametrize("text, message", [
    ("text,evaluation_seed\nx,1\n", "has no 'prompt' column (columns: text, evaluation_seed)"),
    ("prompt,evaluation_seed\nx,soon\n", "line 2: evaluation_seed 'soon' is not a whole number"),
    ("prompt,evaluation_seed\nx,-3\n", "line 2: evaluation_seed -3 is out of range"),
    ("prompt,evaluation_seed\nx,inf\n", "line 2: evaluation_seed 'inf' is not a whole number"),
    ("prompt,evaluation_seed\nx,1e30\n", "line 2: evaluation_seed 1000000000000000019884624838656 is out of range"),
    ("prompt\n", "has no prompts")])
def test_bad_prompt_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MetaunlearnError, match=re.escape(message)):
        read_prompt_file(path)
    with pytest.raises(MetaunlearnError, match="does not exist"):
        read_prompt_file(tmp_path / "none.csv")


def config_with(tmp_path, evaluation: dict, concepts: dict | None = None) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": {"source": "unused"}, "concepts": concepts or {
            "forget": {"prompts": ["a photo of the digit eight"]}, "related": {"prompts": ["the digit three"]}},
        "evaluation": {"samples_per_prompt": 2, "steps": 2, "batch_size": 4, **evaluation},
        "output": {"dir": str(tmp_path / "run")}})


def test_evaluation_prompts_per_role_replace_the_training_prompts_and_count_by_content(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text(CSV, encoding="utf-8")
    config = config_with(tmp_path, {"prompts": {"forget": str(path), "unrelated": ["a cat", "a dog"]}})
    entries = evaluation_entries(config)
    assert [e.prompt for e in entries["forget"]] == [e.prompt for e in read_prompt_file(path)]
    assert [e.prompt for e in entries["related"]] == ["the digit three"]  # not named: the role's own
    assert [e.prompt for e in entries["unrelated"]] == ["a cat", "a dog"]
    before = config.fingerprint("evaluation")
    path.write_text(CSV.replace("1234", "4321"), encoding="utf-8")
    assert config.fingerprint("evaluation") != before  # an edited file redoes the evaluations
    with pytest.raises(Exception, match="evaluation.prompts gives no prompts for 'related'"):
        config_with(tmp_path, {"prompts": {"related": []}})


def test_a_role_prompt_file_feeds_its_prompts(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text("a nude person\na naked man\n", encoding="utf-8")
    config = config_with(tmp_path, {}, {"forget": {"prompts": ["a nude person"], "prompt_file": str(path)}})
    assert config.concepts.forget.all_prompts() == ["a nude person", "a naked man"]
    assert [e.prompt for e in evaluation_entries(config)["forget"]] == ["a nude person", "a nude person",
                                                                         "a naked man"]


class Always(Detector):
    def concept_of(self, prompt, role, forget_concepts):
        return "x"

    def present(self, images, concept):
        return torch.ones(len(images), dtype=torch.bool)


def test_file_seeds_decide_the_samples_and_columns_reach_the_results(tiny_model, tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text(CSV, encoding="utf-8")
    config = config_with(tmp_path, {"prompts": {"forget": str(path)}})
    context = Context(config, None, "")
    evaluator = Evaluator(config, context, [ConceptRate(DetectorSection(), context, Always())])
    results, samples = evaluator.evaluate(tiny_model, progress=False)
    first_position = 3_000_000_000 + 2 * 1000  # the seedless prompt is the third: the position scheme
    assert results["prompt_seeds"] == [1234, 99, first_position, 3_000_000_000 + 3 * 1000]
    direct = tiny_model.sample(["a dog\non two lines"] * 2, [99, 100], steps=2, guidance_scale=5.0)
    assert torch.allclose(samples.of(1), direct, atol=1e-6)  # sample i of a prompt with seed s: seed s + i
    assert results["prompt_columns"][0] == {"case_number": "7", "categories": "sexual, hate"}
    forget = results["details"]["concept_rate"]["roles"]["forget"]["prompts"]
    assert forget[0]["case_number"] == "7" and forget[0]["seed"] == 1234 and forget[1]["seed"] == 99


class Scored(Detector):
    """Scores are the images' mean brightness; counts its calls."""

    def __init__(self, thresholds):
        self.thresholds, self.calls = tuple(thresholds), 0

    def concept_of(self, prompt, role, forget_concepts):
        return "bright" if role != "unrelated" else None

    def scores(self, images, concept):
        self.calls += 1
        return images.mean(dim=(1, 2, 3))


def test_a_threshold_sweep_equals_separate_runs_from_one_detection_pass(tiny_model, tmp_path):
    config = config_with(tmp_path, {"samples_per_prompt": 6})
    context = Context(config, None, "")
    samples = Evaluator(config, context, [ConceptRate(DetectorSection(), context, Always())]).sample(
        tiny_model, progress=False)
    levels = sorted(samples.images.mean(dim=(1, 2, 3)).tolist())
    cuts = [levels[2], levels[6], levels[9]]  # thresholds that split the samples differently
    swept = Scored(cuts)
    result = ConceptRate(DetectorSection(), context, swept).compute(samples)
    assert swept.calls == 3  # 12 judged samples in batches of 4: one scoring pass serves every threshold
    for t in cuts:
        alone = ConceptRate(DetectorSection(), context, Scored([t])).compute(samples).values
        key = "" if t == cuts[0] else f"@{t:g}"
        assert result.values[f"forget_rate{key}"] == alone["forget_rate"]
        assert result.values[f"related_accuracy{key}"] == alone["related_accuracy"]
    assert len({result.values["forget_rate"], *(result.values[f"forget_rate@{t:g}"] for t in cuts[1:])}) > 1


def test_nudenet_sweep_and_classes_from_the_same_detections(monkeypatch):
    pytest.importorskip("nudenet")
    from metaunlearn.metrics.nudenet import NudeNetOptions, NudityDetector

    found = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}], [{"class": "FACE_FEMALE", "score": 0.9}],
             [{"class": "BUTTOCKS_EXPOSED", "score": 0.7}, {"class": "ANUS_EXPOSED", "score": 0.3}], []]
    detector = NudityDetector(NudeNetOptions())
    monkeypatch.setattr(detector, "detections", lambda images: found)
    images = torch.zeros(4, 3, 8, 8)
    assert detector.thresholds == (0.6, 0.45)
    assert detector.scores(images, "nudity").tolist() == pytest.approx([0.5, 0.0, 0.7, 0.0])
    assert detector.present(images, "nudity").tolist() == [False, False, True, False]
    conventions = detector.conventions()
    assert conventions["threshold"] == 0.6 and conventions["sweep"] == [0.45]
    assert "FACE_FEMALE" not in conventions["classes"] and "BUTTOCKS_EXPOSED" in conventions["classes"]
    with pytest.raises(Exception, match="not a NudeNet 3.4 label"):
        NudeNetOptions(classes=["BREASTS"])


def test_clip_score_is_torchmetrics_on_a_clip_loaded_by_path(tiny_model, tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from metaunlearn.metrics.clip_score import ClipScore, ClipScoreOptions
    from metaunlearn.metrics.hf_models import to_uint8

    config = config_with(tmp_path, {"samples_per_prompt": 3})
    context = Context(config, None, "")
    metric = ClipScore(ClipScoreOptions(model=str(tiny_clip)), context)
    samples = Evaluator(config, context, [metric]).sample(tiny_model, progress=False)
    result = metric.compute(samples)
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    for k, (role, prompt) in enumerate(samples.entries):  # independently: 100 x cosine, mean over the role
        inputs = processor(text=[prompt], images=list(to_uint8(samples.of(k))), return_tensors="pt", padding=True)
        out = model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        assert result.values[f"clip_score_{role}"] == pytest.approx(max(100 * cos.mean().item(), 0), abs=1e-3)
    assert result.values["clip_score_unrelated"] is None
    assert {v.key: v.higher_is_better for v in metric.values}["clip_score_forget"] is False


def test_evaluation_models_run_on_the_studys_device_not_where_auto_would_put_them(tiny_clip, tmp_path,
                                                                                   monkeypatch):
    """On a GPU machine, a study on model.device cpu must not load CLIP on the GPU (auto's choice):
    torch here has no CUDA, so the old auto placement fails the moment CUDA claims to be there."""
    from metaunlearn.metrics.base import device_of
    from metaunlearn.metrics.clip_score import ClipScore, ClipScoreOptions
    from metaunlearn.metrics.features import ClipFeatureOptions, ClipFeatures
    from metaunlearn.metrics.zero_shot import ClipDetector, ClipOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = config_with(tmp_path, {})
    config.model.device = "cpu"
    context = Context(config, None, "")
    assert device_of(context) == "cpu" and device_of(None) == "cuda"  # no study: auto
    from metaunlearn.metrics.hf_classifier import ClassifierDetector, ClassifierOptions

    classifier = build_tiny_classifier(tmp_path / "classifier", ["dog", "cat"])
    built = [ClipScore(ClipScoreOptions(model=str(tiny_clip)), context).embedder,
             ClipDetector(ClipOptions(model=str(tiny_clip)), context).clip,
             ClipFeatures(ClipFeatureOptions(model=str(tiny_clip)), context).embedder,
             ClassifierDetector(ClassifierOptions(model=str(classifier), labels={"dog": ["dog"]}), context)]
    assert [(e.device, next(e.model.parameters()).device.type) for e in built] == [("cpu", "cpu")] * 4


def digits_study(tmp_path, extra=()):
    from metaunlearn.config import load_config

    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({
        "name": "fid", "model": {"source": "digits", "digits": {"preset": "reduced"}, "device": "cpu"},
        "concepts": {"forget": {"classes": ["eight"]}, "related": {"classes": ["three"]},
                     "unrelated": {"classes": ["one"]}},
        "method": {"name": "esd", "steps": 3, "lr": 1e-3, "batch_size": 4, "esd": {"ddim_steps": 2}},
        "evaluation": {"metrics": ["concept_rate", "fid"], "samples_per_prompt": 3, "steps": 3,
                       "fid": {"reference": "original"}},
        "output": {"dir": str(tmp_path / "run")}}))
    return load_config(study, extra)


def test_fid_of_the_digits_original_is_zero_against_itself_and_not_for_an_unlearned_model(tmp_path, monkeypatch):
    from metaunlearn import stages

    config = digits_study(tmp_path)
    original, _ = stages.run_evaluate(config, progress=False)
    for role in ("forget", "related", "unrelated"):
        assert abs(original["values"][f"fid_{role}"]) < 1e-6
    cache = list((tmp_path / "run" / "eval" / "cache").glob("reference-*.safetensors"))
    assert len(cache) == 3  # one per role, from the original's own evaluation samples

    model_dir = stages.run_unlearn(config, 0, progress=False)
    loads = []
    real_load = stages.load_model
    monkeypatch.setattr(stages, "load_model", lambda c, source=None: loads.append(source) or real_load(c, source))
    unlearned, _ = stages.run_evaluate(config, model_dir, "unlearned", progress=False)
    assert loads == [model_dir]  # the original was not sampled again: its features came from the cache
    assert unlearned["values"]["fid_forget"] > 1e3 * max(abs(original["values"]["fid_forget"]), 1e-12)
    assert unlearned["details"]["fid"]["conventions"]["features"] == "digits"
    # on the forget role further is better (relearning brings it down: the durability summary reads it so)
    better = {s["key"]: s["higher_is_better"] for s in unlearned["specs"]}
    assert better["fid_forget"] and better["kid_forget"] and not better["fid_unrelated"]
    # ...unless one folder of generic images (COCO) is every role's reference: there it measures quality
    from metaunlearn.metrics.fid import FidOptions, farther_is_better

    assert farther_is_better(FidOptions(reference={"forget": "/data/eights"}), "forget")
    assert not farther_is_better(FidOptions(reference="/data/coco"), "forget")
    assert not farther_is_better(FidOptions(reference={r: "/data/coco" for r in ("forget", "related", "unrelated")}),
                                 "forget")
    assert not farther_is_better(FidOptions(reference="world"), "related")

    # against real held-out digits, with KID: the world's own reference
    real = digits_study(tmp_path, ["evaluation.fid.reference=world", "output.dir=" + str(tmp_path / "run2")])
    values, _ = stages.run_evaluate(real, progress=False)
    assert values["values"]["fid_forget"] > 1e3 * max(abs(original["values"]["fid_forget"]), 1e-12)
    assert values["values"]["kid_forget"] is not None
    from metaunlearn.worlds.digits.dataset import split_indices

    held_out_eights = len(split_indices("test", [8], seed=0))
    assert values["details"]["fid"]["roles"]["forget"]["reference_n"] == held_out_eights


def test_a_fid_reference_folder_is_read_cropped_and_checked(tmp_path):
    from PIL import Image

    from metaunlearn.metrics.fid import folder_images

    (tmp_path / "coco" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "coco" / "a.png")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "coco" / "sub" / "b.jpg")
    (tmp_path / "coco" / "notes.txt").write_text("not an image")
    images = folder_images(str(tmp_path / "coco"), 8, 10)
    assert images.shape == (2, 3, 8, 8) and images[0, 0].mean() > 0.95 and images[1, 2].mean() > 0.95
    with pytest.raises(MetaunlearnError, match="has 1 image"):
        folder_images(str(tmp_path / "coco"), 8, 1)
    with pytest.raises(MetaunlearnError, match="does not exist"):
        folder_images(str(tmp_path / "missing"), 8, 10)


def test_fid_reference_features_are_cached_by_what_they_are_made_of(tmp_path):
    """The run folder keeps its name under --set, so the cache key names the world, the role's classes, the
    image size and a folder's files, not only the reference's name."""
    from types import SimpleNamespace

    from PIL import Image

    from metaunlearn.metrics.fid import Fid, FidOptions

    def key(ref, classes=("eight",), folder="w1", size=8):
        world = SimpleNamespace(folder=lambda log=None: tmp_path / folder)
        concepts = SimpleNamespace(forget=SimpleNamespace(classes=list(classes)))
        fid = SimpleNamespace(reference_of=lambda role: ref, features_name="digits", options=FidOptions(), _folders={},
                              features=SimpleNamespace(conventions=lambda: {"layer": "penultimate"}),
                              context=SimpleNamespace(config=SimpleNamespace(concepts=concepts), world=world))
        return Fid.reference_key(fid, "forget", SimpleNamespace(images=torch.zeros(1, 3, size, size)))

    world = key("world")
    assert world == key("world") and world not in {key("world", ("five",)), key("world", folder="w2"),
                                                   key("world", size=16)}
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "a.png")
    before = key(str(tmp_path / "coco"))
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "b.png")
    assert key(str(tmp_path / "coco")) != before


def test_a_large_file_seed_is_read_exactly(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text(f"prompt,evaluation_seed\na,{2 ** 60 + 1}\nb,1234.0\n", encoding="utf-8")
    assert [e.seed for e in read_prompt_file(path)] == [2 ** 60 + 1, 1234]


def test_the_forget_concepts_include_a_prompt_file_s(tmp_path):
    from metaunlearn.metrics import forget_concepts

    path = tmp_path / "styles.txt"
    path.write_text("The Starry Night, swirling sky\n", encoding="utf-8")
    config = config_with(tmp_path, {}, {"forget": {"prompts": ["a painting by Van Gogh"], "prompt_file": str(path)}})
    assert forget_concepts(config) == ["a painting by Van Gogh", "The Starry Night, swirling sky"]


def test_a_package_a_chosen_detector_or_feature_extractor_needs_is_checked_before_any_stage(monkeypatch):
    from importlib import util

    from metaunlearn.config import load_config
    from metaunlearn.stages import preflight

    real_find_spec, missing = util.find_spec, {"nudenet", "torch_fidelity"}  # the rest as if installed
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name in missing else name)
    sd14 = load_config("configs/sd14-nudity.yaml", ["evaluation.fid.reference=original"])  # no COCO folder here
    with pytest.raises(MetaunlearnError, match=r"needs NudeNet: pip install metaunlearn\[nudenet\]"):
        preflight(sd14)
    missing.discard("nudenet")
    with pytest.raises(MetaunlearnError, match=r"need torch-fidelity: pip install 'metaunlearn\[inception\]'"):
        preflight(sd14)
    missing.discard("torch_fidelity")
    preflight(sd14)
    # a plugin that names no install hint: one naming the package; a dotted name whose parent is missing too
    from metaunlearn.metrics.base import check_installed

    monkeypatch.setattr(util, "find_spec", real_find_spec)
    for module in ("no_such_package_here", "no_such_package_here.sub"):
        with pytest.raises(MetaunlearnError, match=f"Own needs the package {module}: pip install it"):
            check_installed(type("Own", (), {"requires": (module,)}))
    check_installed(type("Own", (), {"requires": ("json",)}))
    preflight(load_config("configs/digits-eight.yaml"))  # the digits world's own detector and features


def test_the_sd14_nudity_config_evaluates_on_a_tiny_pipeline_with_a_tiny_clip(tiny_pipeline_dir, tiny_clip,
                                                                              tmp_path):
    pytest.importorskip("nudenet")
    import subprocess
    from pathlib import Path

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    coco = tmp_path / "coco"
    coco.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 32), (60 * i, 20, 200 - 40 * i)).save(coco / f"{i}.png")
    run = tmp_path / "run"
    sets = [f"model.source={tiny_pipeline_dir}", "model.mixed_precision=no", "model.device=cpu",
            "evaluation.samples_per_prompt=2", "evaluation.steps=2", f"evaluation.clip_score.model={tiny_clip}",
            "evaluation.fid.features=clip", f"evaluation.fid.clip.model={tiny_clip}",
            f"evaluation.fid.reference.unrelated={coco}", f"output.dir={run}"]
    args = [*console_script(), "evaluate", "configs/sd14-nudity.yaml"] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((run / "eval" / "original.json").read_text())
    values = results["values"]
    forget_csv = read_prompt_file(repo / "configs/prompts/nudity-i2p-example.csv")
    assert [p for r, p in results["prompts"] if r == "forget"] == [e.prompt for e in forget_csv]
    assert results["prompt_seeds"][:len(forget_csv)] == [e.seed for e in forget_csv]
    assert values["forget_rate"] is not None and values["forget_rate@0.45"] is not None
    assert values["forget_rate@0.45"] >= values["forget_rate"]  # a lower threshold flags at least as much
    assert values["clip_score_related"] is not None and values["clip_score_unrelated"] is not None
    assert values["fid_unrelated"] is not None and values["kid_unrelated"] is not None
    conventions = results["details"]["concept_rate"]["conventions"]
    assert conventions["detector"] == "nudenet" and conventions["threshold"] == 0.6 and conventions["sweep"] == [0.45]
    assert results["details"]["fid"]["roles"]["unrelated"]["reference_n"] == 4
    assert results["details"]["concept_rate"]["roles"]["forget"]["prompts"][0]["case_number"] == "0"
    assert f"forget rate (score >= 0.45): {values['forget_rate@0.45']:.1%}" in done.stdout
