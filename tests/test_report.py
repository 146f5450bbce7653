"""The report of a tiny study: every section, a self-contained HTML file,
Markdown that links existing files, numbers in results.json, and clear errors
for a folder that holds no results."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from typer.testing import CliRunner

from metaunlearn.cli import app
from metaunlearn.config import StudyConfig
from metaunlearn.study import run_study

from helpers import clean_exit, one_line_error
from test_study import FULL, tiny_study

runner = CliRunner()
ROWS = ["original", "ESD-u / unlearn", "ESD-u / meta"]


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    study = tiny_study(tiny_pipeline_dir, run, attacks=[FULL])
    study["evaluation"]["concept_rate"]["detector"] = "coin"  # rates that differ between seeds: stds that are not 0
    outcome = run_study(StudyConfig.from_dict(study), progress=False)
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
    # the at-a-glance figure, curves, a grid per model, before/after grids per model
    assert len(images) == 1 + 1 + 3 + 3 * 2
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "(missing)" not in page


def test_the_markdown_report_links_files_of_the_run_folder(run_dir):
    text = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "report/curves-full.png" in links and "eval/esd-meta-seed0.png" in links
    assert "attacks/esd-seed0/full-seed0/samples-step4.png" in links
    assert all((run_dir / link).is_file() for link in links)
    assert "| ESD-u / meta |" in text


def population(values: list[float]) -> dict:
    """mean and population std, by hand."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": pytest.approx(mean), "std": pytest.approx(std),
            "n": len(values), "values": values}


# the models of each row, with the seed each is attacked with
MODELS = {"original": [("original", 0)], "ESD-u / unlearn": [("esd-seed0", 0), ("esd-seed1", 1)],
          "ESD-u / meta": [("esd-meta-seed0", 0), ("esd-meta-seed1", 1)]}


def test_results_json_holds_the_tables_over_seeds(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    keys = ["forget_rate", "related_accuracy", "unrelated_accuracy"]
    assert [v["key"] for v in results["values"]] == keys
    table = results["attacks"]["full"]
    assert table["steps"] == [2, 4] and list(table["rows"]) == ROWS == list(MODELS)
    stds = 0
    for name, row in table["rows"].items():
        # every cell: mean and std over the files of the row's models (the original is attacked with seed 0)
        evals = [json.loads((run_dir / "eval" / f"{label}.json").read_text()) for label, _ in MODELS[name]]
        curves = [json.loads((run_dir / "attacks" / label / f"full-seed{seed}" / "curve.json").read_text())
                  for label, seed in MODELS[name]]
        assert row["curves"] == len(curves)
        for key in keys:
            cells = row["values"][key]
            assert set(cells) == {"before", "2", "4"}
            assert cells["before"] == population([e["values"][key] for e in evals])
            assert results["before_attack"][name][key] == cells["before"]
            for step in (2, 4):
                assert cells[str(step)] == population([p["values"][key] for c in curves for p in c["points"]
                                                       if p["step"] == step])
            stds += sum(cells[c]["std"] > 0 for c in cells)
        durability = row["durability"]  # over the same curves
        assert durability["window"]["n"] == len(curves) and len(durability["steps_to_50"]) == len(curves)
        assert durability["window"]["mean"] == pytest.approx((row["values"]["forget_rate"]["2"]["mean"] +
                                                              row["values"]["forget_rate"]["4"]["mean"]) / 2)
    assert stds > 0  # the detector makes seeds differ, so the stds above are checked, not all 0

    # unlearning time per row from each run's timing.json, and the meta/base ratio of their means
    seconds = {name: [json.loads((run_dir / "unlearn" / label / "timing.json").read_text())["seconds"]
                      for label, _ in models] for name, models in MODELS.items() if name != "original"}
    cost = results["cost"]
    for name, values in seconds.items():
        assert cost["unlearn_s"][name] == population(values)
    assert cost["meta_overhead"] == pytest.approx(
        (sum(seconds["ESD-u / meta"]) / 2) / (sum(seconds["ESD-u / unlearn"]) / 2))
    assert set(results["environment"]["versions"]) >= {"torch", "diffusers", "transformers", "accelerate", "peft"}
    assert results["failures"] == [] and results["incomplete"] == [] and results["seeds"] == [0, 1]


def test_the_report_command_needs_only_the_run_folder(run_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir, moved)
    for name in ("report.html", "report.md", "results.json"):
        (moved / name).unlink()
    result = clean_exit(runner.invoke(app, ["report", str(moved)]))
    assert "report.html" in result.output and (moved / "report.md").is_file()
    numbers = json.loads((moved / "results.json").read_text())
    assert numbers == json.loads((run_dir / "results.json").read_text())


def test_report_on_a_folder_without_results_is_one_clear_line(run_dir, tmp_path):
    assert "study.yaml" in one_line_error(runner.invoke(app, ["report", str(tmp_path)]))
    shutil.copy(run_dir / "study.yaml", tmp_path / "study.yaml")
    assert "no results yet" in one_line_error(runner.invoke(app, ["report", str(tmp_path)]))


def png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


def test_the_report_reads_at_a_glance(run_dir):
    import base64

    page = (run_dir / "report.html").read_text()
    # the summary (a sentence and one table) comes before any folded section
    first_table, first_fold = page.index("<table>"), page.index("<details")
    assert first_table < first_fold
    summary = page[first_table:page.index("</table>")]
    for column in ("forget rate before", "window, full", "related before", "related after full",
                   "unrelated before", "unlearning (s)", *ROWS):
        assert column in summary, column
    results = json.loads((run_dir / "results.json").read_text())
    window = results["attacks"]["full"]["rows"]["ESD-u / meta"]["durability"]["window"]
    assert f"{100 * window['mean']:.1f} ± {100 * window['std']:.1f}" in summary
    assert "<details open><summary><h2>Before any attack</h2></summary>" in page
    assert "<details><summary><h2>Attack full</h2></summary>" in page
    assert page.count("<details") == page.count("</details>")
    # nothing wider than the page: every embedded image fits a 1280-pixel window
    widths = [png_width(base64.b64decode(src.split(",", 1)[1]))
              for src in re.findall(r'<img [^>]*src="([^"]*)"', page)]
    assert max(widths) <= 1200, widths


def test_the_sample_figure_puts_models_side_by_side_before_and_after(run_dir):
    from PIL import Image

    from metaunlearn.report_figures import grid_cells

    figure = Image.open(run_dir / "report" / "samples-at-a-glance.png").convert("RGB")
    prompts = json.loads((run_dir / "eval" / "original.json").read_text())["prompts"]
    assert figure.width <= 1200 and figure.height > 40 + 20 * len(prompts)
    # the first sample of the first prompt of the original, before the attack, is where the layout puts it
    cell = grid_cells(run_dir / "eval" / "original.png", len(prompts), 2)[0][0]
    from metaunlearn.report_figures import HEADER, LABEL_WIDTH, thumb_size

    thumb = thumb_size(3, 2)  # three models, two samples each
    shown = figure.crop((LABEL_WIDTH, HEADER, LABEL_WIDTH + thumb, HEADER + thumb))
    expected = cell.resize((thumb, thumb), Image.NEAREST if thumb >= cell.width else Image.LANCZOS)
    assert list(shown.getdata()) == list(expected.getdata())


def test_the_report_fits_a_browser_window(run_dir):
    """In a real headless browser when one is installed: no horizontal scrolling at 1280 px, and the
    summary table on the first screen (1280 x 800)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        try:
            browser = p.chromium.launch()
        except Exception as err:  # playwright without its browser download
            pytest.skip(f"no headless browser: {err}")
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto((run_dir / "report.html").as_uri())
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        assert page.evaluate("document.querySelector('table').getBoundingClientRect().bottom") <= 800
        browser.close()


def test_results_of_a_model_retrained_since_are_not_its_numbers(run_dir, tmp_path):
    """A retrained model keeps its label: an evaluation or a curve measured on the earlier weights (a run
    stopped after the new unlearning, before its evaluation) must not pass for the new model's."""
    from metaunlearn.config import load_config
    from metaunlearn.report import RunFolder, study_rows

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    config = load_config(moved / "study.yaml", [f"output.dir={moved}"])
    folder = RunFolder(moved, config)
    row = next(r for r in study_rows(config) if r.name == "ESD-u / unlearn")
    label = row.models[0][0]
    assert folder.evaluation(label) and any(c["model"] == label for c in folder.curves(row, config.attacks[0]))
    assert folder.evaluation(label)["prompt_files"] == {}  # recorded for a report made elsewhere: none here
    status = moved / "unlearn" / label / "run.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "fingerprint": "retrained-0"}))
    assert folder.evaluation(label) == {}
    assert all(c["model"] != label for c in folder.curves(row, config.attacks[0]))
    assert folder.evaluation("original")  # the original is the original


def test_a_sample_grid_of_another_shape_leaves_the_figure_out_not_the_report(run_dir, tmp_path):
    from PIL import Image

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    Image.new("RGB", (5, 7)).save(moved / "eval" / "esd-seed0.png")  # e.g. made with other samples per prompt
    (moved / "report" / "samples-at-a-glance.png").unlink()
    clean_exit(runner.invoke(app, ["report", str(moved)]))
    assert (moved / "report.html").is_file() and not (moved / "report" / "samples-at-a-glance.png").exists()


@pytest.mark.parametrize("change", ["evaluation.samples_per_prompt=3", "data.images_per_prompt=3"])
def test_curves_of_other_evaluation_or_data_settings_are_not_its_numbers(run_dir, tmp_path, change):
    """A curve records the evaluation and data settings it was measured with: after a change of them (and
    an attack that failed or has not run again), the old curve must not pass for the new settings' numbers,
    the original's included, nor its sample grids."""
    import yaml

    from metaunlearn.config import load_config
    from metaunlearn.report import RunFolder, study_rows, write_report

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    config = load_config(moved / "study.yaml", [f"output.dir={moved}"])
    rows, attack = study_rows(config), config.attacks[0]
    assert all(RunFolder(moved, config).curves(row, attack) for row in rows)
    assert "samples-step" in (moved / "report.md").read_text()
    changed = load_config(moved / "study.yaml", [f"output.dir={moved}", change])
    folder = RunFolder(moved, changed)
    assert not any(folder.curves(row, attack) for row in rows)
    label, seed = rows[1].models[0]
    assert folder.curve(label, attack, seed) == {}
    if change.startswith("data."):  # the evaluations still count (they do not depend on the data): a report
        (moved / "study.yaml").write_text(yaml.safe_dump(changed.model_dump(mode="json")))
        write_report(moved)
        assert "samples-step" not in (moved / "report.md").read_text()  # the attacks' grids: the old curves'


def test_timings_keep_only_the_stages_of_the_study(run_dir, tmp_path):
    from metaunlearn.config import load_config
    from metaunlearn.study import Book

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    timings = json.loads((moved / "timings.json").read_text())
    (moved / "timings.json").write_text(json.dumps({**timings, "unlearn/esd-seed7": 12.0}))  # a seed since removed
    config = load_config(moved / "study.yaml", [f"output.dir={moved}"])
    book = Book(config, list(timings))
    assert book.timings == timings
