"""The study schema: the example loads, defaults fill in, every mistake is one clear line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from metaunlearn.config import StudyConfig, load_config
from metaunlearn.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "digits-eight.yaml"
MINIMAL = {"concepts": {"forget": {"prompts": ["a photo of the digit eight"]}}}


def write(tmp_path: Path, data, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(tmp_path: Path, data, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert config.name == "digits-eight"
    assert config.model.source == "digits" and config.model.mixed_precision == "no"
    assert config.concepts.forget.classes == ["eight"]
    assert len(config.concepts.forget.prompts) == 3
    assert config.concepts.related.classes == ["three", "nine"]
    assert config.concepts.unrelated.classes == ["one", "four", "seven"]
    assert config.method.name == "esd" and config.method.params == "auto"
    assert config.method.lr == pytest.approx(1e-4)
    assert config.meta.enabled is False
    assert [(a.name, a.kind, a.lr) for a in config.attacks] == [
        ("full-1e-4", "full", pytest.approx(1e-4)),
        ("full-3e-5", "full", pytest.approx(3e-5)),
        ("lora-1e-3", "lora", pytest.approx(1e-3)),
        ("benign-1e-4", "full", pytest.approx(1e-4)),
    ]
    assert config.attacks[-1].data == "unrelated"
    assert config.attacks[2].options().rank == 4
    assert config.run_dir() == Path("runs/digits-eight")


def test_defaults_fill_in(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "attacks": [{"name": "short", "steps": 60}]}))
    assert config.name == "study" and config.seeds == [0]
    assert config.model.dtype == "float32" and config.model.device == "auto"
    assert config.data.images_per_prompt == 8
    assert config.method.steps == 200 and config.method.options().eta == 1.0
    assert config.method.options("sdd").ema_decay == 0.999  # every registered method's settings are there
    assert config.method.weight_decay == 0.0 and config.method.grad_clip == 1.0
    assert config.meta.mode == "first_order" and config.meta.unrelated_after == 0.0 and config.meta.forget_after == 3.0
    assert config.evaluation.seed_offset == 3_000_000_000
    attack = config.attacks[0]
    assert attack.kind == "full" and attack.optimizer == "adamw" and attack.weight_decay == 0.01
    assert attack.grad_clip == 0.0  # the attacker clips nothing unless told to
    assert attack.eval_at == [0, 10, 25, 50, 60]  # the default schedule, cut at the attack's length
    assert config.run_dir() == Path("runs/study")


def test_blank_section_and_numeral_digits(tmp_path):
    text = "concepts:\n  forget:\n    classes: [8, '3']\n  related:\nmeta:\n"
    config = load_config(write(tmp_path, text))
    assert config.concepts.forget.classes == ["eight", "three"]  # the digits world names its classes
    assert config.concepts.related.prompts == [] and config.meta.enabled is False


def test_unknown_nested_key_names_path_and_valid_keys(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "method": {"esd": {"etaa": 3}}})
    assert "unknown key 'method.esd.etaa'" in message
    assert "valid keys: x_t, ddim_steps, sample_guidance, eta" in message
    assert message.startswith(str(tmp_path / "study.yaml"))


def test_unknown_key_inside_a_list(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "attacks": [{"name": "a", "stesp": 3}]})
    assert "unknown key 'attacks.0.stesp'" in message and "steps" in message


def test_bad_literal_lists_allowed_values(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "method": {"params": "attn"}})
    assert "method.params" in message and "'attn'" in message
    assert "auto, noxattn, xattn, full, selfattn" in message


def test_several_errors_report_the_first_and_a_count(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "method": {"lr": -1, "steps": 0}})
    assert "method.lr" in message and message.endswith("(and 1 more)")


def test_bad_number_names_path(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "data": {"images_per_prompt": 0}})
    assert message.endswith("data.images_per_prompt: input should be greater than 0 (got 0)")


def test_overrides_change_values(tmp_path):
    config = load_config(EXAMPLE, [
        "method.steps=50",
        "method.lr=1e-4",             # YAML reads 1e-4 as a string: it must still become a float
        "attacks.0.lr=1e-3",
        "attacks.1.eval_at=[0, 20, 10, 20]",
        "meta.enabled=true",
        "meta.inner_lr=[1e-5, 1e-3]",
        "meta.inner_step=adam",
        "model.mixed_precision=no",   # YAML's `no` is false; the field wants the text
        "concepts.guide=a photo of the digit zero",
        "name=123",
    ])
    assert config.method.steps == 50
    assert isinstance(config.method.lr, float) and config.method.lr == pytest.approx(1e-4)
    assert config.attacks[0].lr == pytest.approx(1e-3)
    assert config.attacks[1].eval_at == [0, 10, 20]
    assert config.meta.enabled is True and config.meta.inner_lr == pytest.approx((1e-5, 1e-3))
    assert config.meta.inner_step == "adam"
    assert config.model.mixed_precision == "no"
    assert config.concepts.guide == "a photo of the digit zero"
    assert config.name == "123"


def test_override_creates_missing_section(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["meta.enabled=true", "method.esd.eta=3"])
    assert config.meta.enabled is True and config.method.options().eta == 3.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.stpes=3", "unknown key 'method.stpes'; valid keys: name, params, optimizer, lr"),
        ("method.esdd.eta=3", "unknown key 'method.esdd'; valid keys: name, params,"),
        ("metaa.enabled=true", "unknown key 'metaa'; valid keys: name, seeds, model, concepts"),
        ("attacks.5.lr=1", "index 5 out of range, 'attacks' has 4 entries"),
        ("attacks.full.lr=1", "'attacks' has no key or index 'full'"),
        ("method.steps", "not of the form dotted.key=value"),
    ],
)
def test_bad_override_fails_with_its_path(override, expected):
    with pytest.raises(ConfigError, match="^override ") as info:
        load_config(EXAMPLE, [override])
    assert expected in str(info.value)


def test_override_value_is_validated():
    with pytest.raises(ConfigError, match=r"attacks\.0\.eval_at has \[300\], outside 0\.\.steps \(200\)"):
        load_config(EXAMPLE, ["attacks.0.eval_at=[0, 300]"])


@pytest.mark.parametrize(("key", "seeds", "message"), [
    ("attacks.0.seeds", "[1, 1]", "attacks.0.seeds has duplicates: [1, 1]"),
    ("attacks.0.seeds", "[]", "attacks.0.seeds"),
    ("attacks.0.seeds", "[-1]", "attacks.0.seeds has [-1]; seeds are whole numbers from 0 to 999,999"),
    ("seeds", "[1000000]", "seeds has [1000000]; seeds are whole numbers from 0 to 999,999")])
def test_seeds_are_distinct_some_and_in_range(key, seeds, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(EXAMPLE, [f"{key}={seeds}"])


def test_empty_forget_role_fails_clearly(tmp_path):
    for concepts in ({"forget": {}}, {"forget": {"prompts": []}, "related": {"classes": ["three"]}}):
        message = error_of(tmp_path, {"concepts": concepts})
        assert "concepts.forget has no prompts, classes or images" in message


def test_bad_class_fails_and_classes_need_a_world(tmp_path):
    message = error_of(tmp_path, {"concepts": {"forget": {"classes": ["ten"]}}})
    assert "concepts.forget.classes has 'ten', not a digit" in message
    message = error_of(tmp_path, {"model": {"source": "some/model"}, "concepts": {"forget": {"classes": ["8"]}}})
    assert "concepts.forget.classes needs a built-in world as model.source (digits" in message


def test_plugin_names_and_settings_are_checked_against_the_registries(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "method": {"name": "esdd"}})
    assert message.endswith("method.name: 'esdd' is not a registered method; choose one of: esd, sdd, uce, rece, none")
    message = error_of(tmp_path, {**MINIMAL, "attacks": [{"name": "a", "kind": "lora", "lora": {"rnak": 2}}]})
    assert "unknown key 'attacks.0.lora.rnak'; valid keys: rank, alpha, targets" in message
    message = error_of(tmp_path, {**MINIMAL, "evaluation": {"metrics": ["concept_rate", "fid9"]}})
    assert ("evaluation.metrics: 'fid9' is not a registered metric; choose one of: clip_score, concept_rate, fid"
            in message)
    message = error_of(tmp_path, {**MINIMAL, "evaluation": {"concept_rate": {"detector": "nudenett"}}})
    assert ("'nudenett' is not a registered detector; choose one of: auto, clip, hf_classifier, nudenet, digits"
            in message)
    message = error_of(tmp_path, {**MINIMAL, "method": {"sdd": {"ema_decay": 2}}})
    assert "method.sdd.ema_decay: input should be less than 1 (got 2)" in message  # unselected: still checked
    config = load_config(write(tmp_path, MINIMAL), ["method.name=sdd", "method.sdd.ema_decay=0.9"])
    assert config.method.options().ema_decay == 0.9


def test_a_meta_attacker_setting_is_a_value_or_what_to_draw_from(tmp_path):
    loaded = load_config(write(tmp_path, MINIMAL), ["meta.inner_lr=3e-4", "meta.inner_steps=[1, 3]"])
    assert loaded.meta.inner_lr == 3e-4
    for bad, message in (("meta.inner_lr=[1e-3, 1e-5]", "meta.inner_lr must be a positive number or [low, high]"),
                         ("meta.inner_steps=0", "meta.inner_steps must be positive"),
                         ("meta.inner_step=[]", "meta.inner_step is an empty list"),
                         ("meta.inner_step=[sgd, lion]", "meta.inner_step")):
        assert message in error_of(tmp_path, MINIMAL, [bad])


def test_trackers_are_accelerates(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["output.trackers=[tensorboard, wandb]"]).output.trackers == [
        "tensorboard", "wandb"]
    assert "output.trackers has ['tensorbord']; accelerate's trackers are" in error_of(
        tmp_path, MINIMAL, ["output.trackers=[tensorbord]"])


def test_numbers_must_be_finite(tmp_path):
    for key in ("method.lr=.inf", "meta.forget_after=.nan", "method.esd.eta=-.inf"):
        message = error_of(tmp_path, MINIMAL, [key])
        assert key.split("=")[0] in message and ("finite" in message or "greater than" in message), message


def test_what_would_fail_only_after_unlearning_fails_before_it(tmp_path):
    """Mistakes the stages would meet hours into a run: a metric listed twice, an attack on a role the study
    does not give, Ray resources that are not amounts, a key written twice in the YAML."""
    assert "names concept_rate more than once" in error_of(
        tmp_path, MINIMAL, ["evaluation.metrics=[concept_rate, concept_rate]"])
    message = error_of(tmp_path, {**MINIMAL, "attacks": [{"name": "clean", "data": "related"}]})
    assert "attack 'clean' finetunes on concepts.related, which the study does not give" in message
    for key in ("executor.cpus.unlearn=.nan", "executor.gpus.attack=.inf", "executor.cpus.default=-1"):
        assert "negative or non-finite" in error_of(tmp_path, MINIMAL, [key]), key
    assert "a fraction above 1" in error_of(tmp_path, MINIMAL, ["executor.gpus.unlearn=1.5"])
    message = error_of(tmp_path, "concepts:\n  forget:\n    prompts: [a]\nmethod:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    assert "the key 'lr' appears twice in one mapping" in message and "line 6" in message
    assert "a key must be a name or a number" in error_of(tmp_path, "concepts:\n  ? [a, b]\n  : 1\n")
    merged = "x: &base {lr: 1.0e-4, steps: 3}\nmethod:\n  <<: *base\n  lr: 2.0e-4\n"  # merge keys still work
    from metaunlearn.config import read_yaml

    assert read_yaml(merged)["method"] == {"lr": 2.0e-4, "steps": 3}


def test_duplicate_attack_names_fail(tmp_path):
    message = error_of(tmp_path, {**MINIMAL, "attacks": [{"name": "a"}, {"name": "a", "kind": "lora"}]})
    assert "attacks has duplicate names: a" in message


def test_file_problems_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    assert "not valid YAML at line 2" in error_of(tmp_path, "name: x\nmodel: source: digits\n")
    assert "must be a mapping of sections" in error_of(tmp_path, "- a\n- b\n")
    assert "got nothing" in error_of(tmp_path, "")


def test_round_trip(tmp_path):
    config = load_config(EXAMPLE, ["meta.enabled=true", "meta.inner_lr=[1e-5, 1e-3]", "meta.inner_step=[sgd]"])
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert again.to_yaml() == config.to_yaml()


def test_fingerprint_tracks_only_named_sections():
    base = load_config(EXAMPLE)
    assert base.fingerprint("method") == load_config(EXAMPLE).fingerprint("method")
    other_method = load_config(EXAMPLE, ["method.esd.eta=3"])
    other_attacks = load_config(EXAMPLE, ["attacks.0.lr=1e-2"])
    assert other_method.fingerprint("method") != base.fingerprint("method")
    assert other_attacks.fingerprint("model", "concepts", "method") == base.fingerprint("model", "concepts", "method")
    assert other_attacks.fingerprint("attacks") != base.fingerprint("attacks")
    assert base.fingerprint("model") != base.fingerprint("data")  # section names are part of the hash
    assert len(base.fingerprint()) == 16


def test_from_dict_does_not_mutate_input():
    data = {"concepts": {"forget": {"classes": ["8"]}}, "meta": None}
    config = StudyConfig.from_dict(data, ["meta.enabled=true"])
    assert config.meta.enabled and data == {"concepts": {"forget": {"classes": ["8"]}}, "meta": None}


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
                         + [Path(__file__).parent.parent / "src/metaunlearn/configs/demo.yaml"])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.concepts.forget.prompts and config.attacks


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs" / "grids").glob("*.yaml")))
def test_every_shipped_grid_loads_with_its_world(path):
    from metaunlearn.config import ModelConfig
    from metaunlearn.durability import load_grid
    from metaunlearn.worlds import world_for

    grid = load_grid(path)
    attacks = grid.attacks(world_for(ModelConfig(source="digits")))
    assert f"{grid.name}.{grid.reference}" in {a.name for a in attacks}


def test_method_none_has_one_variant_the_meta_objective_alone(tmp_path):
    none = {**MINIMAL, "method": {"name": "none"}, "meta": {"enabled": True}}
    assert load_config(write(tmp_path, none)).variants == ["meta"]  # not the default [base, meta]: one label
    assert load_config(write(tmp_path, {**none, "variants": ["base", "meta"]})).variants == ["meta"]  # a dump
    assert load_config(write(tmp_path, MINIMAL)).variants == ["base", "meta"]


def test_a_report_made_elsewhere_counts_prompt_files_by_the_digests_its_run_recorded(tmp_path, monkeypatch):
    """Relative prompt-file paths do not resolve from another directory: the settings key of a report made
    there would differ from the run's (every evaluation dropped) without the recorded digests."""
    from metaunlearn.config import StudyConfig, prompt_file_digests
    from metaunlearn.metrics.evaluate import settings_key
    from metaunlearn.prompt_files import file_digest, recorded_digests

    monkeypatch.chdir(tmp_path)
    (tmp_path / "forget.txt").write_text("a cat\na dog\n")
    config = StudyConfig.from_dict({**MINIMAL, "evaluation": {"prompts": {"forget": "forget.txt"}}})
    key, recorded = settings_key(config), prompt_file_digests(config)
    assert recorded == {"forget.txt": file_digest("forget.txt")} and recorded["forget.txt"] != "missing"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert settings_key(config) != key
    with recorded_digests(recorded):
        assert settings_key(config) == key
    assert settings_key(config) != key  # only within
