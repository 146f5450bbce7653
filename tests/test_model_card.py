"""Model cards: a README.md with Hub metadata and the study's measured numbers in every released
model folder of a tiny study (unlearned models, attacked full models and LoRA adapters), that
leaves the folders loadable and complete."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from helpers import CoinDetector
from huggingface_hub import ModelCard
from test_study import FULL, LORA, tiny_study

from metaunlearn import DiffusionModel
from metaunlearn.config import StudyConfig
from metaunlearn.layout import RunLayout, model_complete
from metaunlearn.metrics.durability import auc, steps_to, window
from metaunlearn.model_card import hub_id, write_model_card, write_model_cards
from metaunlearn.report import write_report
from metaunlearn.study import run_study

assert CoinDetector  # registers detector 'coin': rates that differ between models and steps
REQUIRED_TAGS = {"concept-erasure", "machine-unlearning", "text-to-image", "diffusers", "metaunlearn", "esd",
                 "stable-diffusion"}
LOCAL_LICENSE = "set `license` in this card's metadata from the base model's license"


def front_matter(path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert ModelCard.load(path).data.to_dict() == meta  # the Hub's own parser reads the same
    return meta


def pct(value: float) -> str:  # how the cards write a fraction
    return f"{100 * value:.1f}%"


def hub(config: StudyConfig, source: str) -> StudyConfig:
    return config.model_copy(update={"model": config.model.model_copy(update={"source": source})})


@pytest.fixture(scope="module")
def study(tiny_pipeline_dir, tmp_path_factory):
    """A finished tiny study (ESD base and meta, seed 0) with full (attack seeds 0 and 1) and LoRA attacks that
    save their weights, reported, then carded; returns (run folder, config, results, the README.md files)."""
    run = tmp_path_factory.mktemp("cards") / "run"
    raw = tiny_study(tiny_pipeline_dir, run, seeds=(0,), attacks=[dict(FULL, save_final=True, seeds=[0, 1]),
                                                                  dict(LORA, save_final=True)])
    raw["evaluation"]["concept_rate"]["detector"] = "coin"
    config = StudyConfig.from_dict(raw)
    assert run_study(config, progress=False).failures == []
    write_report(run)
    results = json.loads((run / "results.json").read_text())
    return run, config, results, write_model_cards(run, config, results)


def test_every_released_model_folder_gets_a_card_with_hub_metadata(study, tiny_pipeline_dir):
    run, _, _, written = study
    attacked = [f"attacks/{m}/{a}/{'lora' if a == 'lora-seed0' else 'model'}" for m in ("original", "esd-seed0",
                                                                                      "esd-meta-seed0")
                for a in ("full-seed0", "full-seed1", "lora-seed0")]
    assert sorted(p.relative_to(run).as_posix() for p in written) == sorted(
        [f"{f}/README.md" for f in attacked + ["unlearn/esd-seed0/model", "unlearn/esd-meta-seed0/model"]])
    for path in written:
        meta, text = front_matter(path), path.read_text()
        unlearned = "/original/" not in path.as_posix()
        assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
        assert "base_model" not in meta and meta["license"] == "other" and LOCAL_LICENSE in text
        assert f"Original model: the local diffusers pipeline folder `{tiny_pipeline_dir}`" in text
        tags = set(meta["tags"])
        assert (REQUIRED_TAGS <= tags) == unlearned and {"text-to-image", "diffusers", "stable-diffusion"} <= tags
        assert ("meta-unlearning" in tags) == ("esd-meta" in path.as_posix())
        assert ("lora" in tags) == (path.parent.name == "lora")
        assert "- **forget** (erased): prompts 'a photo of the digit eight'" in text
        assert ("- **related** (kept: close to the erased concept, the first to suffer): prompts 'the digit three'"
                in text)
        assert "- **unrelated** (kept: far from the erased concept): prompts 'a dog'" in text
        assert "can be undone by finetuning" in text and "the study's prompts, samples, seeds" in text
        assert "- metric concept_rate: detector: coin" in text and "- samples per prompt: 2" in text
        if unlearned:
            assert "(metaunlearn method `esd`), unlearning seed 0:" in text and "- esd.eta: 1.0" in text
            assert "- trained UNet weights: noxattn" in text
            assert ("- cap: 0.5" in text) == ("esd-meta" in path.as_posix())
        else:
            assert "No unlearning: the study's original model" in text
    unet_card = (run / "unlearn/esd-seed0/model/README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("path/to/this/folder")' in unet_card and "Then attacked" not in unet_card
    lora_card = (run / "attacks/esd-seed0/lora-seed0/lora/README.md").read_text()
    assert "pipe = DiffusionPipeline.from_pretrained('path/to/esd-seed0')" in lora_card
    assert 'pipe.load_lora_weights("path/to/this/folder")' in lora_card
    assert "Then attacked, which made this folder's weights: attack 'lora', seed 0: lora finetuning on the forget " \
           "role's held-out images, adamw lr 0.001, 4 steps, batch 2." in lora_card


def test_the_cards_state_the_numbers_the_study_measured(study):
    run, _, results, _ = study
    specs = results["values"]
    assert [s["key"] for s in specs] == ["forget_rate", "related_accuracy", "unrelated_accuracy"]
    assert all(s["fraction"] for s in specs)
    for label in ("esd-seed0", "esd-meta-seed0"):
        values = json.loads((run / "eval" / f"{label}.json").read_text())["values"]
        text = (run / "unlearn" / label / "model" / "README.md").read_text()
        for spec in specs:
            assert f"| {spec['label']} | {pct(values[spec['key']])} |" in text
        for attack, seed in (("full", 0), ("full", 1), ("lora", 0)):
            folder = run / "attacks" / label / f"{attack}-seed{seed}"
            curve = json.loads((folder / "curve.json").read_text())
            assert [p["step"] for p in curve["points"]] == [0, 2, 4]
            attacked = (folder / ("lora" if attack == "lora" else "model") / "README.md").read_text()
            assert attacked.count("Attack `") == 1  # the attack and seed that made its weights, no other
            assert "This folder holds the weights of step 4, the attack's last." in attacked
            for card in (text, attacked):
                assert card.count(f"Attack `{attack}` (seed {seed}):") == 1  # this model's curve, no other's
                for p in curve["points"]:
                    assert f"| {p['step']} | " + " | ".join(pct(p["values"][s["key"]]) for s in specs) + " |" in card
                reach = steps_to(curve, 0.5, "forget_rate")
                assert (f"Forget rate: window (mean over the evaluated steps after 0 up to 100) "
                        f"{pct(window(curve, 'forget_rate', 100))}; time average over the attack (AUC) "
                        f"{pct(auc(curve, 'forget_rate'))}; first evaluated step at which it reaches 50%: "
                        f"{reach if reach is not None else 'not within 4 steps'}.") in card
            per_curve = results["attacks"][attack]["rows"][f"ESD-u / {'meta' if 'meta' in label else 'unlearn'}"]
            assert (label, seed, auc(curve, "forget_rate")) in [(p["model"], p["seed"], p["auc"])
                                                                for p in per_curve["per_curve"]]
        assert text.count("Attack `") == 3
        other = "esd-seed0" if label == "esd-meta-seed0" else "esd-meta-seed0"
        assert f"eval/{other}.json" not in text  # its own numbers only
        assert f"(`eval/{label}.json` of the run folder)" in text
    # the coin detector makes the numbers differ, so the tables above tell values, models and steps apart
    measured = {v for c in run.glob("attacks/*/*/curve.json") for p in json.loads(c.read_text())["points"]
                for v in p["values"].values()}
    assert len(measured) > 1


def test_card_files_leave_the_model_folders_complete_and_loadable(study):
    run, config, results, written = study
    layout = RunLayout(run)
    for label in ("esd-seed0", "esd-meta-seed0"):
        assert (layout.model(label) / "README.md").is_file()
        assert model_complete(layout.model(label)) and layout.released(label)
    assert model_complete(run / "attacks/esd-seed0/full-seed0/model")
    model = DiffusionModel.load(layout.model("esd-seed0"))
    assert model.family == "sd"
    # the report reads the same numbers after the cards were written, and writing them again changes nothing
    write_report(run)
    assert json.loads((run / "results.json").read_text()) == results
    before = {p: p.read_text() for p in written}
    assert write_model_cards(run, config, results) == written
    assert {p: p.read_text() for p in written} == before


def test_a_hub_base_model_is_named_with_its_license(study, tmp_path):
    run, config, results, _ = study
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for weights in (copy / "unlearn/esd-meta-seed0/model/unet").glob("*.safetensors"):
        weights.unlink()  # no longer a model (layout.model_complete): it gets no card
    (copy / "unlearn/esd-meta-seed0/model/README.md").unlink()
    written = write_model_cards(copy, hub(config, "CompVis/stable-diffusion-v1-4"), results)
    assert len(written) == 10 and not (copy / "unlearn/esd-meta-seed0/model/README.md").exists()
    for path in written:
        meta, text = front_matter(path), path.read_text()
        assert meta["base_model"] == "CompVis/stable-diffusion-v1-4" and meta["license"] == "creativeml-openrail-m"
        assert "[CompVis/stable-diffusion-v1-4](https://huggingface.co/CompVis/stable-diffusion-v1-4)" in text
        assert LOCAL_LICENSE not in text
    # the evaluations were made with another model.source, so they do not count for this config: the card
    # falls back to its study row's mean, and says so
    text, row = (copy / "unlearn/esd-seed0/model/README.md").read_text(), results["before_attack"]["ESD-u / unlearn"]
    assert "| value | mean of row 'ESD-u / unlearn' |" in text and "eval/esd-seed0.json" not in text
    for spec in results["values"]:
        assert f"| {spec['label']} | {pct(row[spec['key']]['mean'])} |" in text
    cases = {"runwayml/stable-diffusion-v1-5": ("creativeml-openrail-m", "stable-diffusion"),
             "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", "stable-diffusion-xl"),
             "someone/their-finetune": ("other", None)}
    for source, (license_, family) in cases.items():
        folder = tmp_path / source.replace("/", "_")  # an empty folder: the family comes from the hub id
        meta = front_matter(write_model_card(folder, hub(config, source), 0, "base"))
        assert meta["base_model"] == source and meta["license"] == license_
        assert (family in meta["tags"]) if family else not {"stable-diffusion", "stable-diffusion-xl"} & set(
            meta["tags"])


def test_a_fresh_model_card_says_nothing_is_measured_yet(study, tmp_path, tiny_pipeline_dir):
    run, config, _, _ = study
    folder = tmp_path / "model"
    shutil.copytree(RunLayout(run).model("esd-meta-seed0"), folder)
    (folder / "README.md").unlink()
    path = write_model_card(folder, config, 0, "meta")
    meta, text = front_matter(path), path.read_text()
    assert path == folder / "README.md" and model_complete(folder)
    assert "base_model" not in meta and meta["license"] == "other"
    assert REQUIRED_TAGS | {"meta-unlearning"} <= set(meta["tags"])
    assert "# esd-meta-seed0: ESD-u + meta-unlearning" in text
    assert "Not measured yet; run `metaunlearn report`" in text and "| forget rate |" not in text
    assert "- cap: 0.5" in text and "- esd.ddim_steps: 4" in text and "- seed: 0" in text
    base = front_matter(write_model_card(tmp_path / "base", config, 0, "base"))
    assert "meta-unlearning" not in base["tags"]
    assert "Meta-unlearning objective" not in (tmp_path / "base" / "README.md").read_text()
    wider = config.model_copy(update={"meta": config.meta.model_copy(update={"params": "full"})})
    text = write_model_card(folder, wider, 0, "meta").read_text()
    assert "- trained UNet weights: noxattn (the meta terms and preservation: full)" in text


def test_hub_ids_and_the_built_in_world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert hub_id("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    for local in ("digits", "models/mine", str(tmp_path / "models" / "mine"), "a/b/c", "./x", "name"):
        assert hub_id(local) is None, local
    # a local folder the run saw (environment.json), not a Hub id from another directory or once moved
    assert hub_id("models/gone", local=True) is None and hub_id("models/gone") == "models/gone"
    assert hub_id("models/mine", local=False) == "models/mine"
    config = StudyConfig.from_dict({"model": {"source": "digits"}, "concepts": {
        "forget": {"classes": ["eight"]}, "related": {"classes": ["three"]}, "unrelated": {"prompts": ["a dog"]}}})
    path = write_model_card(tmp_path / "m", config, 3, "base")  # no world is built: the card only names it
    meta, text = front_matter(path), path.read_text()
    assert "base_model" not in meta and meta["license"] == "other"
    assert "Original model: the built-in `digits` world of metaunlearn" in text
    assert "- **forget** (erased): classes eight" in text and "- **related** (kept" in text
    assert "unlearning seed 3" in text


def test_attacked_weights_of_an_earlier_model_of_the_label_get_no_card(study, tmp_path):
    run, config, results, _ = study
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    status = copy / "unlearn" / "esd-seed0" / "run.json"  # retrained since with other settings
    status.write_text(json.dumps({**json.loads(status.read_text()), "fingerprint": "retrained-0"}))
    for card in copy.glob("attacks/**/README.md"):
        card.unlink()
    written = write_model_cards(copy, config, results)
    assert written and not any("attacks/esd-seed0/" in p.as_posix() for p in written)
    assert any("attacks/esd-meta-seed0/" in p.as_posix() for p in written)
