"""Every plugin kind, defined here (not in the package), registered, and run
through a tiny study end to end, report included: a closed-form method, an
attack kind, a metric and a world. If any of these needs an edit to config,
the engine, the runner or the report, the seams are broken."""

from __future__ import annotations

import json

import pytest
import yaml
import torch
from pydantic import Field

from metaunlearn.attacks import Attack
from metaunlearn.config import StudyConfig
from metaunlearn.methods import Method
from metaunlearn.metrics import Metric, Result, Value
from metaunlearn.registry import ATTACKS, DETECTORS, METHODS, METRICS, WORLDS, Options
from metaunlearn.study import run_study
from metaunlearn.worlds import WORLD_FILE, World, cache_root

from helpers import BrightDetector
from test_study import FULL, tiny_study


def run(study: dict) -> tuple[dict, str]:
    outcome = run_study(StudyConfig.from_dict(study), progress=False)
    assert outcome.failures == [], outcome.failures
    return json.loads((outcome.run_dir / "results.json").read_text()), (outcome.run_dir / "report.html").read_text()


@pytest.fixture
def registered():
    """Registers what a test hands it, and unregisters it afterwards."""
    added = []

    def add(registry, name, impl, options=None):
        registry.register(name, *([options] if options else []))(impl)
        added.append((registry, name))
        return impl

    yield add
    for registry, name in added:
        registry.unregister(name)


# ----------------------------------------------------------------- a method
class ScaleOptions(Options):
    factor: float = Field(0.5, description="What the cross-attention values are multiplied by.")


class ScaleValues(Method):
    """A toy closed-form edit: scale every cross-attention value projection."""

    closed_form = True

    def edit(self, model, data, judge=None) -> None:
        with torch.no_grad():
            for name, param in model.unet.named_parameters():
                if name.endswith("attn2.to_v.weight"):
                    param.mul_(self.options.factor)


def test_a_closed_form_method_plugin(registered, tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    registered(METHODS, "scale-v", ScaleValues, ScaleOptions)
    study = tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=[0], attacks=[FULL])
    study["method"] = {"name": "scale-v", "steps": 2, "batch_size": 2, "scale-v": {"factor": 0.25}}
    results, page = run(study)

    weights = [load_file(f / "unet" / "diffusion_pytorch_model.safetensors")
               for f in (tiny_pipeline_dir, tmp_path / "run/unlearn/scale-v-seed0/model")]
    edited = [k for k in weights[0] if k.endswith("attn2.to_v.weight")]
    assert edited and all(torch.allclose(weights[1][k], 0.25 * weights[0][k]) for k in edited)
    assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0] if k not in edited)  # no training
    assert not (tmp_path / "run/unlearn/scale-v-seed0/log.jsonl").exists()
    # with meta on, the edited model goes through a meta stage on the same engine
    meta_log = (tmp_path / "run/unlearn/scale-v-meta-seed0/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in meta_log] == [1, 2]
    assert "meta/after_objective" in json.loads(meta_log[0])
    assert list(results["attacks"]["full"]["rows"]) == ["original", "SCALE-V / unlearn", "SCALE-V / meta"]
    assert "SCALE-V / meta" in page


# ----------------------------------------------------------------- an attack
class BiasOnly(Attack):
    """A toy attacker who finetunes the UNet's biases only."""

    def trainable(self, model):
        model.unet.requires_grad_(False)
        params = {n: p for n, p in model.unet.named_parameters() if n.endswith(".bias")}
        for p in params.values():
            p.requires_grad_(True)
        return params


def test_an_attack_plugin(registered, tiny_pipeline_dir, tmp_path):
    registered(ATTACKS, "bias-only", BiasOnly)
    attack = {**FULL, "name": "biases", "kind": "bias-only", "optimizer": "sgd", "lr": 1e-2}
    results, page = run(tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=[0], variants=["base"],
                                   attacks=[attack]))
    curve = json.loads((tmp_path / "run/attacks/esd-seed0/biases-seed0/curve.json").read_text())
    from metaunlearn import DiffusionModel

    unet = DiffusionModel.load(tiny_pipeline_dir).unet
    assert curve["trainable_parameters"] == sum(p.numel() for n, p in unet.named_parameters() if n.endswith(".bias"))
    assert [p["step"] for p in curve["points"]] == [0, 2, 4] and curve["attack"]["optimizer"] == "sgd"
    assert results["attacks"]["biases"]["rows"]["ESD-u / unlearn"]["curves"] == 1
    assert "Attack biases" in page and "bias-only finetuning" in page


# ----------------------------------------------------------------- a metric
class Brightness(Metric):
    """A toy metric: the mean pixel value of every sample."""

    values = [Value("brightness", "mean brightness", higher_is_better=False)]

    def compute(self, samples, model) -> Result:
        return Result({"brightness": samples.images.mean().item()}, {"samples": len(samples.images)})


def test_a_closed_form_method_judges_its_edits_by_the_forget_rate_whatever_metric_comes_first(
        registered, tiny_pipeline_dir, tmp_path):
    from metaunlearn import DiffusionModel
    from metaunlearn.config import load_config
    from metaunlearn.errors import ConfigError
    from metaunlearn.unlearn import forget_judge

    registered(METRICS, "brightness", Brightness)
    study = tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=[0], variants=["base"], attacks=[])
    study["evaluation"].update(metrics=["brightness", "concept_rate"], samples_per_prompt=2, steps=2)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    model = DiffusionModel.load(tiny_pipeline_dir)
    rate = forget_judge(load_config(path), model)()
    assert rate in {0.0, 0.5, 1.0}  # two samples of the one forget prompt, not a brightness
    study["evaluation"]["metrics"] = ["brightness"]
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match="add concept_rate to evaluation.metrics"):
        forget_judge(load_config(path), model)()
    # checked up front as at run time: by the forget rate a metric declares, not by the metric's name
    from metaunlearn.stages import preflight

    rece = load_config(path, ["method.name=rece"])
    with pytest.raises(ConfigError, match="add concept_rate to evaluation.metrics"):
        preflight(rece)
    registered(METRICS, "own-rate", type("OwnRate", (Brightness,), {"values": [Value("forget_rate", "rate")]}))
    preflight(load_config(path, ["method.name=rece", "evaluation.metrics=[brightness, own-rate]"]))


def test_a_metric_plugin(registered, tiny_pipeline_dir, tmp_path):
    registered(METRICS, "brightness", Brightness)
    study = tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=[0], variants=["base"], attacks=[FULL])
    study["evaluation"]["metrics"] = ["concept_rate", "brightness"]
    results, page = run(study)
    assert [v["key"] for v in results["values"]] == ["forget_rate", "related_accuracy", "unrelated_accuracy",
                                                     "brightness"]
    original = json.loads((tmp_path / "run/eval/original.json").read_text())
    assert 0 < original["values"]["brightness"] < 1 and original["details"]["brightness"] == {"samples": 6}
    row = results["attacks"]["full"]["rows"]["ESD-u / unlearn"]["values"]["brightness"]
    assert set(row) == {"before", "2", "4"} and 0 < row["4"]["mean"] < 1
    assert "mean brightness before" in page and "mean brightness: lower is better" in page


# ----------------------------------------------------------------- a world
COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


class ColourOptions(Options):
    size: int = 32


class Colours(World):
    """A toy world: a random tiny pipeline and two classes of flat-coloured images."""

    name = "colours"
    default_detector = "bright"

    def folder(self, log=print, rebuild=False):
        from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline

        folder = self._folder or cache_root() / "worlds" / "colours"
        if rebuild or not (folder / WORLD_FILE).is_file():
            build_pipeline(TinyPipelineConfig(), ["a", "red", "blue", "square", "dog"]).save_pretrained(folder)
            (folder / WORLD_FILE).write_text(json.dumps({"world": "colours"}))
        return folder

    def is_built(self) -> bool:
        return (self.folder() / WORLD_FILE).is_file()

    def normalise_classes(self, classes):
        bad = [c for c in classes if c.lower() not in COLOURS]
        if bad:
            raise ValueError(f"has {bad}; the colours are {', '.join(COLOURS)}")
        return [c.lower() for c in classes]

    def class_prompts(self, name):
        return [f"a {name} square"]

    def class_feed(self, role, split, model, batch):
        images = torch.stack([torch.tensor(COLOURS[c]).view(3, 1, 1).expand(3, 32, 32) for c in role.classes])
        captions = [f"a {c} square" for c in role.classes]
        return len(images), iter([(images, captions, [f"colours:{split}:{c}" for c in role.classes])])


def test_a_world_plugin(registered, tmp_path):
    registered(WORLDS, "colours", Colours, ColourOptions)
    assert DETECTORS.get("bright").impl is BrightDetector
    study = tiny_study("colours", tmp_path / "run", seeds=[0], variants=["base"], attacks=[FULL])
    study["concepts"] = {"forget": {"classes": ["RED"]}, "unrelated": {"classes": ["blue"]}}
    study["evaluation"].pop("concept_rate")  # 'auto': the world's own detector
    study["method"]["preservation_weight"] = 0.0
    results, page = run(study)
    forget = json.loads((tmp_path / "run/data/train/manifest.json").read_text())
    assert forget["counts"] == {"forget": 1, "related": None, "unrelated": 1}
    original = json.loads((tmp_path / "run/eval/original.json").read_text())
    assert original["prompts"] == [["forget", "a red square"], ["unrelated", "a blue square"]]
    assert original["details"]["concept_rate"]["detector"] == "bright"
    assert "forget: a red square" in page and results["attacks"]["full"]["rows"]["ESD-u / unlearn"]["curves"] == 1
    with pytest.raises(Exception, match="the colours are red, blue"):
        StudyConfig.from_dict({**study, "concepts": {"forget": {"classes": ["green"]}}})
