"""The report of a tiny study: every section, a self-contained HTML file,
Markdown that links existing files, numbers in results.json, and clear errors
for a folder that holds no results."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from metaunlearn.cli import app
from metaunlearn.config import StudyConfig
from metaunlearn.study import run_study

from test_study import FULL, tiny_study

runner = CliRunner()
ROWS = ["original", "ESD-u / unlearn", "ESD-u / meta"]


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    outcome = run_study(StudyConfig.from_dict(tiny_study(tiny_pipeline_dir, run, attacks=[FULL])), progress=False)
    assert outcome.failures == []
    return run


def test_the_html_report_has_every_section_and_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    for section in ("Before any attack", "Attack full", "Forget rate before and at each attack step",
                    "The other values before the attack and after it", "related accuracy after",
                    "How fast it comes back", "steps to 50%", "Samples", "Cost", "Meta overhead", "Wall time per stage",
                    "Reproduce", "diffusers", "platform", "cpus", "variants:", "Failures", *ROWS):
        assert section in page, section
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(images) == 1 + 3 + 3 * 2  # curves, a grid per model, before/after grids per model
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "(missing)" not in page


def test_the_markdown_report_links_files_of_the_run_folder(run_dir):
    text = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "report/curves-full.png" in links and "eval/esd-meta-seed0.png" in links
    assert "attacks/esd-seed0/full-seed0/samples-step4.png" in links
    assert all((run_dir / link).is_file() for link in links)
    assert "| ESD-u / meta |" in text


def test_results_json_holds_the_tables_over_seeds(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    table = results["attacks"]["full"]
    assert table["steps"] == [2, 4] and list(table["rows"]) == ROWS
    for name, row in table["rows"].items():
        assert set(row["values"]) == {"forget_rate", "related_accuracy", "unrelated_accuracy"}
        for key in ("before", "2", "4"):
            cell = row["values"]["forget_rate"][key]
            assert 0 <= cell["mean"] <= 1 and cell["std"] >= 0
        # two seeds per unlearned variant; the original is the reference, attacked with the first seed
        assert row["values"]["forget_rate"]["4"]["n"] == (1 if name == "original" else 2)
        assert set(row["values"]["related_accuracy"]) == {"before", "2", "4"}
    assert [v["key"] for v in results["values"]] == ["forget_rate", "related_accuracy", "unrelated_accuracy"]
    for row in table["rows"].values():  # the durability numbers of the curves the row has
        curves = row["curves"]
        assert row["durability"]["window"]["n"] == curves and len(row["durability"]["steps_to_50"]) == curves
        window = row["durability"]["window"]["mean"]
        assert window == pytest.approx((row["values"]["forget_rate"]["2"]["mean"] +
                                        row["values"]["forget_rate"]["4"]["mean"]) / 2)
    assert results["before_attack"]["ESD-u / meta"]["forget_rate"]["n"] == 2
    assert results["cost"]["meta_overhead"] > 0 and results["cost"]["unlearn_s"]["ESD-u / meta"]["n"] == 2
    assert set(results["environment"]["versions"]) >= {"torch", "diffusers", "transformers", "accelerate", "peft"}
    assert results["failures"] == [] and results["seeds"] == [0, 1]


def test_the_report_command_needs_only_the_run_folder(run_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir, moved)
    for name in ("report.html", "report.md", "results.json"):
        (moved / name).unlink()
    result = runner.invoke(app, ["report", str(moved)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and (moved / "report.md").is_file()
    numbers = json.loads((moved / "results.json").read_text())
    assert numbers == json.loads((run_dir / "results.json").read_text())


def test_report_on_a_folder_without_results_is_one_clear_line(run_dir, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "study.yaml" in result.output
    assert len(result.output.strip().splitlines()) == 1
    shutil.copy(run_dir / "study.yaml", tmp_path / "study.yaml")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no results yet" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
