"""Choosing which seed's unlearned model to release: the rule on hand-made
curves, and the `select` command on a tiny study."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from metaunlearn.cli import app
from metaunlearn.selection import rank

from test_study import tiny_study


def curve(model: str, forget: list[float], related=1.0, unrelated=(1.0, 1.0)) -> dict:
    """A curve at steps 0, 10, 25, with the quality before (step 0) and after (the last step)."""
    steps = (0, 10, 25)[:len(forget)]
    values = [{"forget_rate": f, "related_accuracy": related, "unrelated_accuracy": unrelated[0]} for f in forget]
    values[-1]["unrelated_accuracy"] = unrelated[1]
    return {"model": model, "points": [{"step": s, "values": v} for s, v in zip(steps, values)]}


def test_the_lowest_window_among_models_as_good_as_the_best_before_any_attack():
    models = {
        "m0": {"a": [curve("m0", [0.0, 0.4, 0.6])], "b": [curve("m0", [0.0, 0.2, 0.4])] * 2},  # window 0.4
        "m1": {"a": [curve("m1", [0.0, 0.1, 0.3])], "b": [curve("m1", [0.0, 0.1, 0.1])] * 2},  # 0.15, broken
        "m2": {"a": [curve("m2", [0.0, 0.2, 0.4])], "b": [curve("m2", [0.0, 0.2, 0.4]),  # two attack seeds
                                                          curve("m2", [0.0, 0.4, 0.6])]},  # 0.3, then 0.4
    }
    for c in {id(c): c for cs in models["m1"].values() for c in cs}.values():
        c["points"][0]["values"]["related_accuracy"] = 0.8  # 20 points below the best before any attack
    out = rank(models, "forget_rate", until=100)
    rows = out["models"]
    assert rows["m0"]["windows"] == pytest.approx({"a": 0.5, "b": 0.3}) and rows["m0"]["window"] == pytest.approx(0.4)
    assert rows["m2"]["windows"]["b"] == pytest.approx(0.4)  # the mean over its attack seeds
    assert rows["m2"]["window"] == pytest.approx(0.35)
    assert rows["m1"]["why"] == "worse before or in the attacks than m0 (related_accuracy), m2 (related_accuracy)"
    assert out["chosen"] == "m2"  # m1 relearns slowest but was broken before any attack
    assert rank(models, "forget_rate", until=100, tolerance=0.25)["chosen"] == "m1"  # within a wide tolerance
    assert rank(models, "forget_rate", until=10)["models"]["m0"]["window"] == pytest.approx(0.3)  # steps <= 10


def test_a_model_is_out_only_when_another_is_as_good_on_every_rate_and_better_on_one():
    def model(label, forget_before, related, window):
        c = curve(label, [forget_before, window, window], related=related)
        return {"a": [c]}

    # leaks the concept before any attack: out, however slowly it relearns (the forget rate: lower is better)
    models = {"leaky": model("leaky", 0.2, 1.0, 0.0), "good": model("good", 0.0, 1.0, 0.5)}
    out = rank(models, "forget_rate", until=100)
    assert out["chosen"] == "good"
    assert out["models"]["leaky"]["why"] == "worse before or in the attacks than good (forget_rate)"
    # the slowest to relearn, by wrecking unrelated concepts in the attacks: out (the self-destruct must not spill)
    spill = {"a": [curve("spill", [0.0, 0.1, 0.1], unrelated=(1.0, 0.5))]}
    out = rank({"spill": spill, "good": model("good", 0.0, 1.0, 0.3)}, "forget_rate", until=100)
    assert out["chosen"] == "good" and out["models"]["spill"]["collateral"] == pytest.approx(0.5)
    spill_allowed = rank({"spill": spill, "good": model("good", 0.0, 1.0, 0.3)}, "forget_rate", 100, collateral=False)
    assert spill_allowed["chosen"] == "spill" and spill_allowed["collateral"] is False  # the publisher's call
    # exactly the tolerance apart, in a rate's float arithmetic (1.0 - 0.95 > 0.05): not "better by more"
    out = rank({"a": model("a", 0.0, 0.95, 0.2), "b": model("b", 0.0, 1.0, 0.4)}, "forget_rate", until=100)
    assert out["chosen"] == "a" and out["models"]["a"]["eligible"]
    # one better on forget, the other on related: neither is ruled out, the window decides
    models = {"a": model("a", 0.0, 0.90, 0.4), "b": model("b", 0.08, 0.99, 0.3)}
    out = rank(models, "forget_rate", until=100)
    assert all(r["eligible"] for r in out["models"].values()) and out["chosen"] == "b"
    # the curves' declarations say which way a value reads: a related value where lower is better
    for c in models["b"]["a"]:
        c["specs"] = [{"key": "related_accuracy", "higher_is_better": False, "fraction": True}]
    assert rank(models, "forget_rate", until=100)["models"]["a"]["eligible"] is True
    assert "than a (forget_rate, related_accuracy)" in rank(models, "forget_rate", until=100)["models"]["b"]["why"]


def test_a_key_that_falls_as_the_concept_returns_chooses_the_highest_window():
    """FID to the concept's images falls as the attack brings the concept back (its declaration: higher is
    better on the forget role): the model that stays furthest away is the one to release."""
    def fid(label, values):
        c = {"model": label, "points": [{"step": s, "values": {"fid_forget": v, "unrelated_accuracy": 1.0}}
                                         for s, v in zip((0, 10, 25), values)]}
        return {"a": [dict(c, specs=[{"key": "fid_forget", "higher_is_better": True, "fraction": False}])]}

    models = {"near": fid("near", [40.0, 5.0, 1.0]), "far": fid("far", [40.0, 30.0, 20.0])}
    assert rank(models, "fid_forget", until=100)["chosen"] == "far"


def test_ties_go_to_the_least_collateral_and_a_model_missing_an_attack_is_not_chosen():
    models = {"m0": {"a": [curve("m0", [0.0, 0.2], unrelated=(1.0, 0.6))]},
              "m1": {"a": [curve("m1", [0.0, 0.2], unrelated=(1.0, 0.9))]},
              "m2": {"a": []}}  # its attack failed
    out = rank(models, "forget_rate", until=100)
    assert out["models"]["m0"]["collateral"] == pytest.approx(0.4) and out["chosen"] == "m1"
    assert not out["models"]["m2"]["eligible"] and out["models"]["m2"]["window"] is None
    assert rank({"m2": {"a": []}}, "forget_rate", until=100)["chosen"] is None
    # collateral not measured ranks after measured collateral, not before it as 0 would
    del models["m1"]["a"][0]["points"][-1]["values"]["unrelated_accuracy"]
    assert rank(models, "forget_rate", until=100)["chosen"] == "m0"
    # fewer attack seeds than the others under one attacker: its window is not comparable
    models = {"m0": {"a": [curve("m0", [0.0, 0.2])], "b": [curve("m0", [0.0, 0.9]), curve("m0", [0.0, 0.9])]},
              "m1": {"a": [curve("m1", [0.0, 0.2])], "b": [curve("m1", [0.0, 0.1])]}}
    out = rank(models, "forget_rate", until=100)
    assert out["chosen"] == "m0" and out["models"]["m1"]["why"] == "not measured under every attack: b"


def test_the_select_command_on_a_tiny_study(tiny_pipeline_dir, tmp_path):
    run, study, grid = tmp_path / "run", tmp_path / "study.yaml", tmp_path / "grid.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_pipeline_dir, run, seeds=[0, 1], attacks=[])))
    grid.write_text(yaml.safe_dump({
        "name": "s", "reference": "full", "defaults": {"steps": 2, "batch_size": 2, "eval_at": [0, 1, 2]},
        "attackers": [{"name": "full", "lr": 1e-3, "seeds": [7]},
                      {"name": "honest", "lr": 1e-3, "data": "unrelated"}]}))  # benign: not chosen by
    out = tmp_path / "release"
    result = CliRunner().invoke(app, ["select", str(study), str(grid), "--to", str(out)])
    assert result.exit_code == 0, result.output
    selection = json.loads((run / "selection-meta-s.json").read_text())
    assert set(selection["models"]) == {"esd-meta-seed0", "esd-meta-seed1"}  # the meta variant only
    assert all(list(r["windows"]) == ["full"] for r in selection["models"].values())
    assert selection["chosen"] in selection["models"] and f"| {selection['chosen']} |" in result.output
    assert not (run / "unlearn/esd-seed0").exists()  # the base variant is never trained for a selection
    assert (run / f"attacks/{selection['chosen']}/s.full-seed7/curve.json").is_file()
    assert (out / "model_index.json").is_file() and json.loads((out / "selection.json").read_text()) == selection
    card = (out / "README.md").read_text()  # the unlearning run's card, and how the model was chosen
    assert card.startswith("---") and "## How this model was chosen" in card and "among 2 unlearned models" in card
    assert f"| {selection['chosen']} |" in card
    again = CliRunner().invoke(app, ["select", str(study), str(grid)])  # cached: the same choice
    assert again.exit_code == 0 and json.loads((run / "selection-meta-s.json").read_text()) == selection
    loose = CliRunner().invoke(app, ["select", str(study), str(grid), "--no-collateral"])
    assert loose.exit_code == 0 and json.loads((run / "selection-meta-s.json").read_text())["collateral"] is False
    late = tmp_path / "late.yaml"  # no evaluation before the attack: nothing to rule a broken model out by
    late.write_text(yaml.safe_dump({"name": "s", "reference": "full", "defaults": {"steps": 2, "eval_at": [1, 2]},
                                    "attackers": [{"name": "full", "lr": 1e-3}]}))
    bad = CliRunner().invoke(app, ["select", str(study), str(late)])
    assert bad.exit_code == 1 and "must evaluate at step 0" in bad.output and "add 0 to the eval_at of s.full" \
        in bad.output, bad.output
    for args, message in (([], "'" + str(out) + "' exists and is not empty"),
                          (["--variant", "meta", "--set", "seeds=[0]"], "needs several unlearning seeds"),
                          (["--set", "variants=[base]"], "variant 'meta' is not one of the study's variants"),
                          (["--tolerance", "2"], "tolerance must be from 0 to 1")):
        bad = CliRunner().invoke(app, ["select", str(study), str(grid), *args, *(["--to", str(out)] if not args
                                                                                 else [])])
        assert bad.exit_code == 1 and message in bad.output, bad.output
    # the grid a model was chosen on is no place to report it: durability on it says so
    report = CliRunner().invoke(app, ["durability", str(study), str(grid), "--set", "variants=[meta]"])
    assert report.exit_code == 0, report.output
    assert "note: selection-meta-s.json chose a model on this grid" in report.output


def test_a_selection_with_no_quality_measured_says_so_and_a_failure_names_its_model():
    """A detector that judges the forget prompts only (NudeNet) leaves related and unrelated accuracy None: the
    rule then rules on the forget rate alone, which the table must say; a failed attack names the model."""
    from metaunlearn.selection import table

    def forget_only(c: dict) -> dict:
        for p in c["points"]:
            p["values"].update(related_accuracy=None, unrelated_accuracy=None)
        return c

    models = {m: {"a": [forget_only(curve(m, [0.0, w, w]))]} for m, w in (("m0", 0.4), ("m1", 0.2))}
    out = rank(models, "forget_rate", until=100)
    assert out["quality_judged"] is False and out["chosen"] == "m1"
    failed = {"attacker": "a", "variant": "meta", "model": "esd-meta-seed2", "seed": 300, "error": "diverged"}
    text = table({**out, "failed": [failed]})
    assert "note: no related or unrelated accuracy was measured" in text
    assert "failed: a on esd-meta-seed2 (attack seed 300): diverged" in text
    assert rank({m: {"a": [curve(m, [0.0, 0.2, 0.2])]} for m in ("m0", "m1")}, "forget_rate",
                until=100)["quality_judged"] is True
