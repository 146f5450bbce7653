"""The command line: help everywhere, one-line errors for bad input to every command, the world
command, and evaluate and attack end to end, in process and through the installed console script."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from metaunlearn.cli import app

from helpers import clean_exit, console_script, one_line_error

runner = CliRunner()


def _commands():
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_help_on_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "world" in result.output
    for name in _commands():
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.output


def test_world_command_builds_and_reports(tmp_path):
    out = tmp_path / "world"
    result = runner.invoke(app, ["world", "digits", "--preset", "reduced", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "detector accuracy" in result.output and (out / "world.json").is_file()
    assert json.loads((out / "world.json").read_text())["world"] == "digits"
    # refusing to overwrite a non-empty folder loses nothing
    again = runner.invoke(app, ["world", "digits", "--preset", "reduced", "--out", str(out)])
    assert "exists and is not empty" in one_line_error(again) and (out / "world.json").is_file()


# Bad input to every command: exit status 1 and one 'error: ' line, no traceback. STUDY is a
# study whose model does not exist: each error comes before any model would load.
BAD_INPUT = [
    (["world", "mnist"], "unknown world 'mnist'"),
    (["world", "mnist", "--preset", "reduced"], "unknown world 'mnist'"),
    (["world", "digits", "--preset", "reduced", "--out", "{file}"], "exists and is not a folder"),
    (["data", "{study}", "--split", "bogus"], "unknown data split 'bogus'"),
    (["unlearn", "{study}", "--set", "method.stpes=3"], "method.stpes"),
    (["unlearn", "{study}", "--set", "method.name=none"], "needs the meta objective (meta.enabled: true); add --meta"),
    (["unlearn", "{study}", "--set", "method.name=rece", "--set", "evaluation.metrics=[fid]"],
     "judges them by the forget rate"),
    (["unlearn", "{study}", "--set", "evaluation.prompts.forget={tmp}/none.csv"], "none.csv' does not exist"),
    (["evaluate", "{study}", "--model", "{tmp}/no-such-model"], "no model at"),
    (["evaluate", "{study}", "--label", "../failures"], "the label '../failures' is not a name"),
    (["evaluate", "{study}", "--model", "{tmp}/m", "--label", "original"], "the label 'original' is the study's"),
    (["evaluate", "{study}", "--model", "{tmp}/esd-seed0"], "the label 'esd-seed0' is one of this study's models"),
    (["evaluate", "{study}", "--label", "esd-seed0"], "the label 'esd-seed0' is one of this study's models, not the"),
    (["unlearn", "{study}", "--seed", "-1"], "--seed -1: seeds are whole numbers from 0 to"),
    (["attack", "{study}"], "the study lists no attacks"),
    (["durability", "{study}", "{tmp}/no-grid.yaml"], "cannot read grid file"),
    (["select", "{study}", "{tmp}/no-grid.yaml"], "cannot read grid file"),
    (["run", "{tmp}/no-study.yaml"], "cannot read config file"),
    (["run", "{study}", "--set", "output.dir={file}"], "is a file, not a folder"),
    (["report", "{tmp}/no-run"], "no-run' is not a folder"),
    (["report", "{tmp}/.."], "not the run folder of a study"),
    (["evaluate", "{study}", "--set", "model.device=cuda:7"], "model.device 'cuda:7' is not available here"),
    (["demo", "--out", "{file}"], "is a file, not a folder"),
    (["export", "{tmp}/m", "--base", "{tmp}/m", "--as", "ckpt"], "cannot export as 'ckpt'"),
    (["run", "{study}", "--executor", "dask"], "--executor 'dask' is not known"),
    (["run", "{study}", "--workers", "2"], "--address and --workers apply to --executor ray only"),
    (["run", "{study}", "--executor", "ray", "--address", "auto", "--workers", "2"], "a cluster at --address has"),
    # found before the first stage, not after every model was trained and sampled
    (["run", "{study}", "--set", "evaluation.metrics=[concept_rate,fid]", "--set",
      "evaluation.fid.reference={tmp}/no-coco"], "FID reference folder '{tmp}/no-coco' does not exist"),
    (["run", "{study}", "--set", "evaluation.metrics=[fid]", "--set", "evaluation.fid.reference=world"],
     "FID reference 'world' for role forget needs a built-in world"),
    (["evaluate", "{study}", "--set", "evaluation.prompts.related={tmp}/none.txt"], "none.txt' does not exist"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:2]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({"model": {"source": str(tmp_path / "no-model")},
                                 "concepts": {"forget": {"prompts": ["a dog"]}}, "output": {"dir": str(tmp_path)}}))
    (tmp_path / "a-file").write_text("")
    args = [a.format(study=study, tmp=tmp_path, file=tmp_path / "a-file") for a in args]
    assert message.format(tmp=tmp_path) in one_line_error(runner.invoke(app, args))


def test_every_command_has_a_bad_input_test():
    assert {args[0] for args, _ in BAD_INPUT} == set(_commands())


def test_a_usage_error_is_click_s_exit_status_2():
    result = clean_exit(runner.invoke(app, ["world", "digits", "--preset", "huge"]), 2)
    assert "Invalid value" in result.output and "'huge'" in result.output


def test_demo_runs_the_packaged_study_on_a_reduced_world(tmp_path, capsys):
    from metaunlearn.demo import run_demo

    # the packaged demo.yaml (digits concepts, meta settings) with everything made tiny
    small = ("model.digits.preset=reduced", "seeds=[0]", "variants=[meta]", "method.steps=2",
             "method.esd.ddim_steps=2", "evaluation.samples_per_prompt=1", "evaluation.steps=2",
             "attacks=[{name: full, steps: 2, eval_at: [0, 2]}]")
    outcome = run_demo(tmp_path / "demo", small, progress=False)
    assert outcome.failures == [] and outcome.report == tmp_path / "demo" / "report.html"
    assert f"report: {outcome.report}" in capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert list(results["attacks"]["full"]["rows"]) == ["original", "ESD-u / meta"]
    # the evaluation suite in the demo: FID per role (the world's features, real held-out digits) before
    # and after each attack, durability per curve, and the conventions stated
    full = results["attacks"]["full"]["rows"]["ESD-u / meta"]
    assert full["values"]["fid_forget"]["before"] is not None and full["values"]["fid_forget"]["2"] is not None
    assert [(c["seed"], c["steps_to_50"] is None or c["steps_to_50"] in (0, 2)) for c in full["per_curve"]] == \
        [(0, True)]
    assert results["conventions"]["metrics"]["fid"]["features"] == "digits"
    assert results["conventions"]["metrics"]["fid"]["reference"]["forget"] == "world"
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Evaluation conventions" in report and "Utility (lower FID/KID" in report
    assert "FID forget before" in report


def write_study(tmp_path, source, detector: str, attacks=()) -> str:
    """A tiny study whose related and unrelated roles the detector leaves unjudged."""
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "model": {"source": str(source), "device": "cpu"},
        "concepts": {"forget": {"prompts": ["a photo of the digit eight"]}, "related": {"prompts": ["a dog"]},
                     "unrelated": {"prompts": ["a cat"]}},
        "data": {"images_per_prompt": 1, "generation_steps": 2},
        "evaluation": {"samples_per_prompt": 2, "steps": 2, "concept_rate": {"detector": detector}},
        "attacks": [{"name": "full", "steps": 2, "eval_at": [0, 2], "batch_size": 1, "lr": 1e-3}] if attacks else [],
        "output": {"dir": str(tmp_path / "run")}}))
    return str(study)


def check_evaluate_output(stdout: str, run) -> None:
    """What `evaluate` prints is what it wrote: a rate per judged role, 'not measured' for the others."""
    results = json.loads((run / "eval" / "original.json").read_text())
    values = results["values"]
    assert values["related_accuracy"] is None and values["unrelated_accuracy"] is None
    assert f"forget rate: {values['forget_rate']:.1%}\n" in stdout
    assert "related accuracy: not measured" in stdout and "unrelated accuracy: not measured" in stdout
    assert f"results: {run / 'eval' / 'original.json'}" in stdout


def check_attack_output(stdout: str, run) -> None:
    """What `attack` prints is the curve it wrote, whose unjudged roles stay None at every step."""
    curve = json.loads((run / "attacks" / "original" / "full-seed0" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2]
    assert all(p["values"]["related_accuracy"] is None and p["values"]["unrelated_accuracy"] is None
               for p in curve["points"])
    steps = "  ".join(f"{p['step']}:{p['values']['forget_rate']:.1%}" for p in curve["points"])
    assert f"full seed 0: forget rate by step  {steps}\n" in stdout
    assert f"curves: {run / 'attacks'}" in stdout


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a curves plot with no line to put in a legend
def test_evaluate_and_attack_in_process_with_a_role_the_detector_leaves_unjudged(tiny_pipeline_dir, tmp_path):
    study = write_study(tmp_path, tiny_pipeline_dir, "coin-forget", attacks=True)
    check_evaluate_output(clean_exit(runner.invoke(app, ["evaluate", study])).stdout, tmp_path / "run")
    check_attack_output(clean_exit(runner.invoke(app, ["attack", study])).stdout, tmp_path / "run")
    # the value attack prints (the first, the forget rate) unjudged too
    result = clean_exit(runner.invoke(app, ["attack", study, "--set", "evaluation.concept_rate.detector=coin-related"]))
    unjudged = "not measured (the metric cannot judge this role)"
    assert f"full seed 0: forget rate by step  0:{unjudged}  2:{unjudged}\n" in result.stdout
    # another model, under a label of its own: its own files, the original's stay
    original = (tmp_path / "run" / "eval" / "original.json").read_text()
    result = clean_exit(runner.invoke(app, ["evaluate", study, "--model", str(tiny_pipeline_dir), "--label", "other"]))
    assert f"results: {tmp_path / 'run' / 'eval' / 'other.json'}" in result.stdout
    assert (tmp_path / "run" / "eval" / "original.json").read_text() == original
    clean_exit(runner.invoke(app, ["attack", study, "--model", str(tiny_pipeline_dir), "--label", "other"]))
    assert (tmp_path / "run" / "attacks" / "other" / "full-seed0" / "curve.json").is_file()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(console_script() + list(args), capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_through_the_console_script_with_a_role_the_detector_leaves_unjudged(tiny_pipeline_dir, tmp_path):
    """NudeNet judges the forget role only: related and unrelated have no rate, and say so."""
    pytest.importorskip("nudenet")
    study = write_study(tmp_path, tiny_pipeline_dir, "nudenet")
    done = run_script("evaluate", study)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr  # stderr: progress bars
    check_evaluate_output(done.stdout, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "eval" / "original.json").read_text())
    assert results["details"]["concept_rate"]["detector"] == "nudenet"
    bad = run_script("evaluate", study, "--set", "evaluation.steps=0")
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: ") and "evaluation.steps" in bad.stderr


def test_attack_through_the_console_script_with_a_role_the_detector_leaves_unjudged(tiny_pipeline_dir, tmp_path):
    pytest.importorskip("nudenet")
    done = run_script("attack", write_study(tmp_path, tiny_pipeline_dir, "nudenet", attacks=True))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr  # stderr: progress bars
    check_attack_output(done.stdout, tmp_path / "run")


def test_unlearn_fresh_discards_checkpoints_and_keeps_a_finished_model(tiny_pipeline_dir, tmp_path):
    study = write_study(tmp_path, tiny_pipeline_dir, "coin")
    settings = ["--seed", "0", "--no-meta", "--set", "method.steps=2", "--set", "method.batch_size=1",
                "--set", "method.esd.x_t=noised"]
    clean_exit(runner.invoke(app, ["unlearn", study, *settings]))
    folder = tmp_path / "run" / "unlearn" / "esd-seed0"
    weights = (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat()
    (folder / "checkpoints" / "step-000001").mkdir(parents=True)  # left by an interrupted run
    clean_exit(runner.invoke(app, ["unlearn", study, *settings, "--fresh"]))
    assert not (folder / "checkpoints").exists()
    kept = (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)  # not trained again
