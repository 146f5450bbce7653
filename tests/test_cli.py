"""The command line: help everywhere, one-line errors, the world command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from metaunlearn.cli import app

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
    assert again.exit_code == 1 and "not empty" in again.output and (out / "world.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["world", "mnist"], "unknown world 'mnist'"),
    (["world", "digits", "--preset", "huge"], "Invalid value"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


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


def test_evaluate_through_the_console_script_with_a_role_the_detector_leaves_unjudged(tiny_pipeline_dir, tmp_path):
    """NudeNet judges the forget role only: related and unrelated have no rate, and say so."""
    import subprocess
    import sys

    import yaml

    pytest.importorskip("nudenet")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_pipeline_dir), "device": "cpu"},
        "concepts": {"forget": {"prompts": ["a photo of the digit eight"]}, "related": {"prompts": ["a dog"]}},
        "evaluation": {"samples_per_prompt": 2, "steps": 2, "concept_rate": {"detector": "nudenet"}},
        "output": {"dir": str(tmp_path / "run")}}))
    script = [sys.executable, "-c", "from metaunlearn.cli import main; main()"]
    done = subprocess.run(script + ["evaluate", str(study)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "forget rate: 0.0%" in done.stdout
    assert "related accuracy: not measured" in done.stdout and "Traceback" not in done.stderr
    results = json.loads((tmp_path / "run" / "eval" / "original.json").read_text())
    assert results["values"]["related_accuracy"] is None and results["details"]["concept_rate"]["detector"] == "nudenet"
    bad = subprocess.run(script + ["evaluate", str(study), "--set", "evaluation.steps=0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
