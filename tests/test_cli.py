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
