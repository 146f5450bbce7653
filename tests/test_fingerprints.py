"""What makes a finished stage stale: inputs outside the config's text (the files of image folders, an
attacker's prompt file, a model.source that is another run's model), and what keeps a finished model
counted done (an interrupted try of other settings leaves model/ as it was)."""

from __future__ import annotations

import json

import pytest

from metaunlearn import DiffusionModel
from metaunlearn.config import AttackConfig, StudyConfig
from metaunlearn.layout import (RUN_STATUS, attack_fingerprint, evaluation_fingerprint, model_identity,
                                unlearn_done, unlearn_fingerprint)

from helpers import concept_data
from test_train import make_config, run


def study(tmp_path, **concepts) -> StudyConfig:
    return StudyConfig.from_dict({"model": {"source": "somewhere", "device": "cpu"},
                                  "concepts": {"forget": {"prompts": ["a cat"]}, **concepts},
                                  "output": {"dir": str(tmp_path / "run")}})


def test_studies_of_real_images_keep_their_fingerprints(tmp_path):
    config = StudyConfig.from_dict({"model": {"source": "digits", "device": "cpu"},
                                    "concepts": {"forget": {"classes": ["eight"], "prompts": ["the number eight"]}},
                                    "output": {"dir": str(tmp_path / "run")}})
    assert unlearn_fingerprint(config, 3) == f"{config.fingerprint('model', 'concepts', 'data', 'method')}-3"


def test_generated_images_count_by_how_they_are_seeded(tmp_path, monkeypatch):
    """A model trained on images the original model drew depends on the seeds they were drawn with: a
    change of that scheme (DATA_FORMAT) makes the runs on generated data stale, and only those."""
    from metaunlearn import layout

    config, teach = study(tmp_path), AttackConfig(name="teach", data={"prompts": ["a dog"]})
    real = StudyConfig.from_dict({"model": {"source": "digits", "device": "cpu"},
                                  "concepts": {"forget": {"classes": ["eight"]}}})
    stages = lambda: (unlearn_fingerprint(config, 0), evaluation_fingerprint(config, "m"),  # noqa: E731
                      attack_fingerprint(config, teach, 0, "m"), attack_fingerprint(real, teach, 0, "m"),
                      unlearn_fingerprint(real, 0), attack_fingerprint(real, AttackConfig(name="full"), 0, "m"))
    before = stages()
    monkeypatch.setattr(layout, "DATA_FORMAT", layout.DATA_FORMAT + 1)
    after = stages()
    assert [b != a for b, a in zip(before, after)] == [True] * 4 + [False] * 2


@pytest.mark.parametrize("setting", ["model.device=auto", "method.checkpoint_every=7", "method.log_every=5",
                                     "method.gradient_checkpointing=true", "meta.in_place=false",
                                     "evaluation.batch_size=8", "data.batch_size=4"])
def test_how_a_run_is_carried_out_is_no_input(tmp_path, setting):
    config = study(tmp_path)
    changed = StudyConfig.from_dict(config.model_dump(mode="json"), [setting])
    assert changed.model_dump() != config.model_dump()
    assert unlearn_fingerprint(changed, 0) == unlearn_fingerprint(config, 0)
    assert changed.fingerprint() == config.fingerprint()
    assert StudyConfig.from_dict(config.model_dump(mode="json"), ["method.lr=3e-4"]).fingerprint() \
        != config.fingerprint()


def test_a_file_added_to_an_image_folder_makes_every_stage_stale(tmp_path):
    folder = tmp_path / "related"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    config = study(tmp_path, related={"images": str(folder)})
    attack = AttackConfig(name="full")
    before = (unlearn_fingerprint(config, 0), evaluation_fingerprint(config, "m"),
              attack_fingerprint(config, attack, 0, "m"))
    (folder / "b.png").write_bytes(b"y")
    after = (unlearn_fingerprint(config, 0), evaluation_fingerprint(config, "m"),
             attack_fingerprint(config, attack, 0, "m"))
    assert all(b != a for b, a in zip(before, after))


def test_an_attacker_s_own_prompt_file_counts_by_its_content(tmp_path):
    prompts = tmp_path / "teach.txt"
    prompts.write_text("a cat\n")
    config, attack = study(tmp_path), AttackConfig(name="teach", data={"prompt_file": str(prompts)})
    before = attack_fingerprint(config, attack, 0, "m")
    prompts.write_text("a dog\n")
    assert attack_fingerprint(config, attack, 0, "m") != before


def test_a_source_that_is_another_run_s_model_counts_by_that_run(tmp_path):
    folder = tmp_path / "other" / "unlearn" / "esd-seed0"
    (folder / "model").mkdir(parents=True)
    (folder / RUN_STATUS).write_text(json.dumps({"fingerprint": "f1", "status": "done"}))
    config = study(tmp_path).model_copy(update={"model": study(tmp_path).model.model_copy(
        update={"source": str(folder / "model")})})
    before = unlearn_fingerprint(config, 0)
    (folder / RUN_STATUS).write_text(json.dumps({"fingerprint": "f2", "status": "done"}))
    assert unlearn_fingerprint(config, 0) != before


def test_an_interrupted_try_of_other_settings_keeps_the_finished_model(tiny_pipeline_dir, tmp_path, monkeypatch):
    from metaunlearn import engine

    config, out = make_config(tiny_pipeline_dir, "method.steps=2"), tmp_path / "unlearn" / "esd-seed0"
    model = DiffusionModel.load(tiny_pipeline_dir)
    run(config, model, concept_data(model), out)
    finished = unlearn_fingerprint(config, 0)
    assert model_identity(out / "model") == finished

    other = make_config(tiny_pipeline_dir, "method.steps=2", "method.lr=1e-4")

    def interrupted(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Engine, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(other, DiffusionModel.load(tiny_pipeline_dir), concept_data(model), out)
    status = json.loads((out / RUN_STATUS).read_text())
    assert status["status"] == "running" and status["released"]["fingerprint"] == finished
    # model/ still holds the finished model: its identity stays, but it is not released meanwhile (no report
    # or card shows it under the other settings)
    assert model_identity(out / "model") == finished
    for c in (config, other):
        monkeypatch.setattr(c.output, "dir", str(tmp_path))
    assert not unlearn_done(config, 0) and not unlearn_done(other, 0)
    # back to the first settings: the finished model is restored as done without training (Engine.run raises)
    assert run(config, model, concept_data(model), out) == out / "model"
    assert json.loads((out / RUN_STATUS).read_text()) == status["released"]
    assert unlearn_done(config, 0) and not unlearn_done(other, 0)


def test_a_model_restored_without_training_keeps_its_training_time(tmp_path, monkeypatch):
    import metaunlearn.model_card
    import metaunlearn.unlearn
    from metaunlearn import stages
    from metaunlearn.layout import RunLayout, unlearn_label

    config = study(tmp_path)
    folder = RunLayout.of(config).unlearn(unlearn_label(config, 0))
    (folder / "model" / "unet").mkdir(parents=True)
    (folder / "model" / "model_index.json").write_text("{}")
    (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    done = {"fingerprint": unlearn_fingerprint(config, 0), "seed": 0, "status": "done"}
    (folder / RUN_STATUS).write_text(json.dumps({"fingerprint": "other", "status": "running", "released": done}))
    (folder / "timing.json").write_text(json.dumps({"seconds": 99.0}))
    monkeypatch.setattr(stages, "load_model", lambda config: None)
    monkeypatch.setattr(stages, "concept_data", lambda *a, **k: None)
    monkeypatch.setattr(metaunlearn.model_card, "write_model_card", lambda *a, **k: None)

    def restore(config, model, data, out, seed, fingerprint, progress):  # what unlearn() does for these inputs
        (out / RUN_STATUS).write_text(json.dumps(done))
        return out / "model"

    monkeypatch.setattr(metaunlearn.unlearn, "unlearn", restore)
    assert stages.run_unlearn(config, 0) == folder / "model"
    assert json.loads((folder / "timing.json").read_text()) == {"seconds": 99.0}  # the training's, not the restore's


def test_a_method_that_judges_its_edits_by_sampling_depends_on_what_the_judge_reads(tmp_path):
    """RECE keeps the round whose held-out samples show the concept least: how they are drawn and judged
    decides which model it releases; the other roles' evaluation prompts and the metrics beside the forget
    rate do not, and ESD's model depends on none of it."""
    def fingerprint(method: str, *evaluation: str) -> str:
        config = StudyConfig.from_dict(study(tmp_path).model_dump(mode="json"),
                                       [f"method.name={method}", *evaluation])
        return unlearn_fingerprint(config, 0)

    rece = fingerprint("rece")
    assert rece != fingerprint("rece", "evaluation.samples_per_prompt=50")
    assert rece != fingerprint("rece", "evaluation.prompts.forget=[a kitten]")
    assert rece == fingerprint("rece", "evaluation.prompts.related=[a dog]")
    assert rece == fingerprint("rece", "evaluation.metrics=[concept_rate,clip_score]")
    assert fingerprint("esd") == fingerprint("esd", "evaluation.samples_per_prompt=50")
    # a label-free clip detector judges against the other roles' prompts too
    clip = ("evaluation.concept_rate.detector=clip", "evaluation.concept_rate.clip.negatives=[a photo]")
    assert fingerprint("rece", *clip) != fingerprint("rece", *clip, "evaluation.prompts.related=[a dog]")
    labelled = (*clip, "evaluation.concept_rate.clip.labels=[cat, dog]")
    assert fingerprint("rece", *labelled) == fingerprint("rece", *labelled, "evaluation.prompts.related=[a dog]")


def test_a_folder_of_weights_counts_by_its_files_and_a_hub_id_by_its_name(tmp_path):
    folder = tmp_path / "weights"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(b"0")
    config = study(tmp_path).model_copy(update={"model": study(tmp_path).model.model_copy(
        update={"source": str(folder)})})
    stages = lambda: (model_identity(folder), unlearn_fingerprint(config, 0),  # noqa: E731
                      evaluation_fingerprint(config, folder))
    before = stages()
    (folder / "unet" / "weights.bin").write_bytes(b"12")  # retrained in place
    assert all(b != a for b, a in zip(before, stages()))
    assert model_identity("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    (folder / "world.json").write_text("{}")  # an exported model of a world study: still known by its files
    assert model_identity(folder).startswith(f"{folder}#")


def test_a_built_world_s_folder_and_a_world_s_name_count_by_name(tmp_path, monkeypatch):
    """A built world's cache folder is named by its config's hash and built once; 'digits' names the world
    even where a folder of that name is at hand (it is not what loads)."""
    monkeypatch.setenv("METAUNLEARN_CACHE", str(tmp_path / "cache"))
    built = tmp_path / "cache" / "worlds" / "digits-0123"
    built.mkdir(parents=True)
    (built / "world.json").write_text("{}")
    assert model_identity(built) == str(built)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert model_identity("digits") == "digits"
    config = StudyConfig.from_dict({"model": {"source": "digits", "device": "cpu"},
                                    "concepts": {"forget": {"classes": ["eight"]}}})
    assert unlearn_fingerprint(config, 0) == f"{config.fingerprint('model', 'concepts', 'data', 'method')}-0"


def test_adding_a_seed_to_an_attack_keeps_the_curves_already_made(tmp_path):
    """Each curve is one attack seed's (its fingerprint holds it): a longer list of seeds must not re-run or
    hide the seeds already done, while any setting the curve depends on does."""
    config = study(tmp_path)
    one, two = AttackConfig(name="full", seeds=[0]), AttackConfig(name="full", seeds=[0, 1])
    assert attack_fingerprint(config, one, 0, "m") == attack_fingerprint(config, two, 0, "m")
    assert attack_fingerprint(config, two, 0, "m") != attack_fingerprint(config, two, 1, "m")
    faster = AttackConfig(name="full", seeds=[0, 1], lr=1e-3)
    assert attack_fingerprint(config, faster, 0, "m") != attack_fingerprint(config, two, 0, "m")
    curve = {"attack": one.model_dump(mode="json")}  # as a curve records its attack's settings, seeds included
    assert two.made_curve(curve) and not faster.made_curve(curve) and not two.made_curve({})


def test_a_curve_made_while_the_seed_list_was_in_the_fingerprint_stays_done(tmp_path):
    """Curves made before the seed list was left out of an attack's fingerprint are not re-run (hours at SD
    scale), as long as the settings they recorded are the attack's."""
    from metaunlearn.layout import CURVE, RunLayout, attack_done

    config = study(tmp_path)
    attack = AttackConfig(name="full", seeds=[0, 1])
    folder = RunLayout.of(config).attack("esd-seed0", attack.name, 0)
    folder.mkdir(parents=True)
    old = {"attack": AttackConfig(name="full", seeds=[0]).model_dump(mode="json"), "points": [{"step": 0}],
           "fingerprint": attack_fingerprint(config, attack, 0, "m", recorded_seeds=[0])}
    (folder / CURVE).write_text(json.dumps(old))
    assert attack_done(config, attack, 0, "m", "esd-seed0")
    assert not attack_done(config, AttackConfig(name="full", seeds=[0, 1], lr=1e-3), 0, "m", "esd-seed0")
    (folder / CURVE).write_text(json.dumps({**old, "fingerprint": "something else"}))
    assert not attack_done(config, attack, 0, "m", "esd-seed0")
