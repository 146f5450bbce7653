"""The study runner on a tiny pipeline: every stage in order, skips on a re-run,
redoes only what a changed value touches, resumes after an interruption, and
reports a broken stage without losing the others."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import BrightDetector, clean_exit
from typer.testing import CliRunner

from metaunlearn.cli import app
from metaunlearn.config import StudyConfig
from metaunlearn.errors import ConfigError
from metaunlearn.study import run_study

runner = CliRunner()
FULL = {"name": "full", "steps": 4, "eval_at": [0, 2, 4], "batch_size": 2, "lr": 1e-3}
LORA = {"name": "lora", "kind": "lora", "lora": {"rank": 2}, "steps": 4, "eval_at": [0, 2, 4], "batch_size": 2,
        "lr": 1e-3}
assert BrightDetector  # registered as detector 'bright' by the helpers module


def tiny_study(source, out, seeds=(0, 1), variants=("base", "meta"), attacks=(FULL, LORA)) -> dict:
    return {"name": "tiny", "seeds": list(seeds), "variants": list(variants),
            "model": {"source": str(source), "device": "cpu"},
            "concepts": {"forget": {"prompts": ["a photo of the digit eight"]},
                         "related": {"prompts": ["the digit three"]}, "unrelated": {"prompts": ["a dog"]}},
            "data": {"images_per_prompt": 2, "generation_steps": 2},
            "method": {"steps": 3, "batch_size": 2, "esd": {"x_t": "noised", "ddim_steps": 4}},
            "meta": {"mode": "first_order", "target": "capped", "cap": 0.5},
            "evaluation": {"samples_per_prompt": 2, "steps": 2, "batch_size": 16,
                           "concept_rate": {"detector": "bright"}},
            "attacks": [dict(a) for a in attacks], "output": {"dir": str(out)}}


def last_run(log_file) -> list[str]:
    """study.log lines of the latest run, without their time stamps."""
    lines = log_file.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if "stages" in line and "study tiny" in line)
    return [line[21:] for line in lines[start + 1:]]


def events(lines: list[str], kind: str) -> set[str]:
    return {line.split()[1].rstrip(":") for line in lines if line.startswith(kind)}


def test_variants_are_validated():
    base = {"concepts": {"forget": {"prompts": ["x"]}}}
    assert StudyConfig.from_dict(base).variants == ["base", "meta"]
    for bad, message in ((["meta", "meta"], "variants has duplicates"), ([], "variants"),
                         (["sdd"], "variants.0")):
        with pytest.raises(ConfigError, match=message):
            StudyConfig.from_dict({**base, "variants": bad})


def test_a_study_runs_every_stage_then_skips_them_and_redoes_only_what_changed(
        tiny_pipeline_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    study = tiny_study(tiny_pipeline_dir, run, attacks=[FULL])
    outcome = run_study(StudyConfig.from_dict(study), progress=False)
    assert outcome.failures == [] and outcome.report == run / "report.html"
    labels = ["original", "esd-seed0", "esd-seed1", "esd-meta-seed0", "esd-meta-seed1"]
    for label in labels:
        assert json.loads((run / "eval" / f"{label}.json").read_text())["fingerprint"]
        assert (run / "eval" / f"{label}.png").is_file()
    # each unlearned model is attacked with its own seed, the original (the reference) with the first
    curves = sorted(p.parent.relative_to(run / "attacks").as_posix() for p in run.glob("attacks/*/*/curve.json"))
    assert curves == sorted(["original/full-seed0"] +
                            [f"{m}-seed{s}/full-seed{s}" for m in ("esd", "esd-meta") for s in (0, 1)])
    assert {p.name for p in (run / "attacks/esd-meta-seed1/full-seed1").glob("samples-*")} == {
        "samples-step0.png", "samples-step4.png"}
    # step 0 of an attack is the released model: its evaluation is reused, not sampled again
    for label, attack in (("original", "full-seed0"), ("esd-meta-seed1", "full-seed1")):
        curve = json.loads((run / "attacks" / label / attack / "curve.json").read_text())
        assert curve["points"][0]["values"] == json.loads((run / "eval" / f"{label}.json").read_text())["values"]
        assert (run / "attacks" / label / attack / "samples-step0.png").read_bytes() == \
            (run / "eval" / f"{label}.png").read_bytes()
    assert yaml.safe_load((run / "study.yaml").read_text())["variants"] == ["base", "meta"]
    timings = json.loads((run / "timings.json").read_text())
    assert {"data/train", "unlearn/esd-meta-seed1", "attack/original/full-seed0", "report"} <= set(timings)
    assert "gpu" in json.loads((run / "environment.json").read_text())

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    with monkeypatch.context() as m:  # a re-run with nothing changed touches no model
        for target in ("metaunlearn.unlearn.unlearn", "metaunlearn.attacks.run_attack",
                       "metaunlearn.metrics.evaluate.Evaluator.evaluate",
                       "metaunlearn.stages.prepare_concept_data"):
            m.setattr(target, boom)
        assert run_study(StudyConfig.from_dict(study), progress=False).failures == []
    lines = last_run(run / "study.log")
    assert events(lines, "start") == {"report"} and "unlearn/esd-meta-seed0" in events(lines, "skip")
    again = json.loads((run / "timings.json").read_text())
    assert {k: v for k, v in again.items() if k != "report"} == {k: v for k, v in timings.items() if k != "report"}

    # a meta setting redoes the meta models and what depends on them, nothing else
    study["meta"]["cap"] = 0.3
    assert run_study(StudyConfig.from_dict(study), progress=False).failures == []
    started = events(last_run(run / "study.log"), "start")
    assert started == {"report"} | {f"{stage}/esd-meta-seed{s}" for stage in ("unlearn", "evaluate") for s in (0, 1)} \
        | {f"attack/esd-meta-seed{s}/full-seed{s}" for s in (0, 1)}
    # data whose manifest is there but a role file gone is not done (made again, not failed at load)
    from metaunlearn.layout import RunLayout, data_done

    config = StudyConfig.from_dict(study)
    assert data_done(config, "train")
    (RunLayout.of(config).data("train") / "forget.safetensors").unlink()
    assert not data_done(config, "train")


def test_an_interrupted_study_resumes_where_it_stopped(tiny_pipeline_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = StudyConfig.from_dict(tiny_study(tiny_pipeline_dir, run, seeds=[0], attacks=[FULL]))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("metaunlearn.attacks.run_attack", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_study(config, progress=False)
    assert "stopped attack/original/full-seed0: interrupted" in "\n".join(last_run(run / "study.log"))
    assert not (run / "report.html").exists()

    outcome = run_study(config, progress=False)
    lines = last_run(run / "study.log")
    assert outcome.failures == [] and outcome.report is not None
    assert {"unlearn/esd-seed0", "unlearn/esd-meta-seed0", "evaluate/esd-meta-seed0"} <= events(lines, "skip")
    assert events(lines, "start") == {"report", "attack/original/full-seed0", "attack/esd-seed0/full-seed0",
                                      "attack/esd-meta-seed0/full-seed0"}


def test_a_broken_attack_is_reported_and_the_others_are_kept(tiny_pipeline_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    broken = {**LORA, "name": "broken", "lora": {"rank": 2, "targets": ["no_such_module"]}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_pipeline_dir, run, seeds=[0], attacks=[FULL, broken])))
    result = clean_exit(runner.invoke(app, ["run", str(study), "--quiet"]), 1)  # a failed stage, not a crash
    assert "failed: attack/original/broken-seed0: MetaunlearnError" in result.stderr
    results = json.loads((run / "results.json").read_text())
    assert {f["stage"] for f in results["failures"]} == {
        f"attack/{m}/broken-seed0" for m in ("original", "esd-seed0", "esd-meta-seed0")}
    assert all(row["curves"] == 1 for row in results["attacks"]["full"]["rows"].values())
    assert all(row["curves"] == 0 for row in results["attacks"]["broken"]["rows"].values())
    assert "no_such_module" in (run / "report.html").read_text()
    assert "FAILED  attack/esd-seed0/broken-seed0" in (run / "study.log").read_text()


def test_a_failed_unlearning_blocks_what_needs_it_and_the_rest_goes_on(tiny_pipeline_dir, tmp_path, monkeypatch):
    from metaunlearn import stages

    run, short = tmp_path / "run", {**FULL, "steps": 2, "eval_at": [0, 2]}
    config = StudyConfig.from_dict(tiny_study(tiny_pipeline_dir, run, seeds=[0], attacks=[short]))
    run_unlearn = stages.run_unlearn

    def meta_fails(cfg, seed, progress=True):
        if cfg.meta.enabled:
            raise RuntimeError("boom")
        return run_unlearn(cfg, seed, progress)

    monkeypatch.setattr(stages, "run_unlearn", meta_fails)
    outcome = run_study(config, progress=False)
    assert [(f["stage"], f["error"]) for f in outcome.failures] == [("unlearn/esd-meta-seed0", "RuntimeError: boom")]
    lines = last_run(run / "study.log")
    # what needs the failed model is left out, not run (and not counted as failures of its own)...
    assert events(lines, "blocked") == {"evaluate/esd-meta-seed0", "attack/esd-meta-seed0/full-seed0"}
    assert [line.split()[1] for line in lines if line.startswith("start") and "esd-meta" in line] == [
        "unlearn/esd-meta-seed0"]
    # ...everything else runs to the end, the report included
    assert events(lines, "finish") == {"data/train", "data/attack", "evaluate/original", "unlearn/esd-seed0",
                                       "evaluate/esd-seed0", "attack/original/full-seed0",
                                       "attack/esd-seed0/full-seed0", "report"}
    assert outcome.report == run / "report.html"
    results = json.loads((run / "results.json").read_text())
    assert [f["stage"] for f in results["failures"]] == ["unlearn/esd-meta-seed0"]
    assert {name: row["curves"] for name, row in results["attacks"]["full"]["rows"].items()} == {
        "original": 1, "ESD-u / unlearn": 1, "ESD-u / meta": 0}
    # the report says the study is unfinished, and what is missing
    assert results["incomplete"] == ["evaluation of esd-meta-seed0", "attack full on ESD-u / meta: 0 of 1 runs"]
    assert "Incomplete: the study is not finished" in (run / "report.md").read_text()


def test_the_attack_command_gives_an_unlearned_model_the_seeds_the_runner_does(tmp_path, monkeypatch):
    from metaunlearn import stages
    from metaunlearn.layout import attack_seeds, unlearn_seed_of

    config = StudyConfig.from_dict(tiny_study("unused", tmp_path / "run", seeds=[0, 1], attacks=[FULL]))
    model_dir = tmp_path / "run/unlearn/esd-seed1/model"
    model_dir.mkdir(parents=True)
    (model_dir.parent / "run.json").write_text(json.dumps({"seed": 1, "status": "done"}))
    assert unlearn_seed_of(model_dir) == 1 and unlearn_seed_of(None) is None
    assert attack_seeds(config, config.attacks[0], 1) == [1]  # the runner's choice for this model
    assert attack_seeds(config, config.attacks[0], None) == [0]  # the original: the first study seed
    ran = []
    monkeypatch.setattr(stages, "concept_data", lambda *a, **k: None)
    monkeypatch.setattr(stages, "evaluator", lambda *a, **k: None)
    monkeypatch.setattr(stages, "run_one_attack", lambda c, a, seed, *rest, **k: ran.append(seed) or {})
    monkeypatch.setattr("metaunlearn.plots.plot_curves", lambda *a, **k: None)
    stages.run_attacks(config, model_dir)
    stages.run_attacks(config, None)
    assert ran == [1, 0]


def test_the_meta_section_is_an_input_of_meta_models_only(tmp_path):
    from metaunlearn.layout import unlearn_fingerprint, unlearn_label, variant_config

    config = variant_config(StudyConfig.from_dict(tiny_study("unused", tmp_path)), "base")
    other_meta = config.model_copy(update={"meta": config.meta.model_copy(update={"cap": 0.9})})
    assert unlearn_fingerprint(other_meta, 0) == unlearn_fingerprint(config, 0)  # meta off: not an input
    meta = variant_config(config, "meta")
    assert unlearn_fingerprint(meta, 0) != unlearn_fingerprint(config, 0)
    assert (unlearn_label(config, 0), unlearn_label(meta, 1)) == ("esd-seed0", "esd-meta-seed1")


def test_the_attack_split_is_planned_only_for_attacks_on_a_role_s_data(tiny_pipeline_dir, tmp_path):
    """A forget concept given as a plain image folder has no attack split; a study without attacks, or
    whose attackers bring their own data, must not need one."""
    from metaunlearn.config import StudyConfig
    from metaunlearn.study import plan

    def stages(attacks):
        config = StudyConfig.from_dict(tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=(0,),
                                                  variants=("base",), attacks=attacks))
        return {s.name: s.needs for s in plan(config)}

    assert "data/attack" not in stages(())
    own = {**FULL, "name": "own", "data": {"prompts": ["a cat"]}}
    planned = stages((own,))
    assert "data/attack" not in planned and planned["attack/esd-seed0/own-seed0"] == ("evaluate/esd-seed0",)
    planned = stages((own, FULL))
    assert planned["attack/esd-seed0/full-seed0"] == ("data/attack", "evaluate/esd-seed0")
    # step 0 is the model's evaluation, made once; the world is built once, by its stage
    assert planned["attack/original/own-seed0"] == ("evaluate/original",) and planned["evaluate/original"] == (
        "model",)


def test_a_ray_task_gets_the_run_folder_by_its_absolute_path(tmp_path, monkeypatch):
    """A node's Ray workers need not start in the driver's folder: the tasks get output.dir resolved (the
    other paths count in fingerprints and stay as written), and where built worlds are kept."""
    from metaunlearn.layout import unlearn_fingerprint
    from metaunlearn.ray_executor import portable, worker_env

    monkeypatch.chdir(tmp_path)
    config = StudyConfig.from_dict({**tiny_study("unused", "runs/{name}"), "name": "s"})
    data = portable(config)
    assert data["output"]["dir"] == str(tmp_path / "runs" / "s")
    assert unlearn_fingerprint(StudyConfig.from_dict(data), 0) == unlearn_fingerprint(config, 0)  # no input
    monkeypatch.delenv("METAUNLEARN_CACHE", raising=False)
    assert worker_env() is None
    monkeypatch.setenv("METAUNLEARN_CACHE", "/shared/worlds")
    assert worker_env() == {"env_vars": {"METAUNLEARN_CACHE": "/shared/worlds"}}
