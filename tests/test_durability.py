"""The durability protocol: numbers of a relearning curve, a grid of attackers
validated on its own, run on a tiny study from the command line, and attackers
that bring data of their own."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from metaunlearn.cli import app
from metaunlearn.config import ModelConfig
from metaunlearn.durability import GridConfig, load_grid, table
from metaunlearn.errors import ConfigError
from metaunlearn.metrics import durability
from metaunlearn.worlds import world_for

from test_study import tiny_study


def curve(*points: tuple[int, float]) -> dict:
    return {"points": [{"step": s, "values": {"forget_rate": v}} for s, v in points]}


def test_window_auc_and_steps_to_half():
    c = curve((0, 0.0), (10, 0.2), (25, 0.6), (50, 0.8), (100, 1.0), (200, 1.0))
    assert durability.window(c) == pytest.approx((0.2 + 0.6 + 0.8 + 1.0 + 1.0) / 5)
    assert durability.window(c, until=100) == pytest.approx((0.2 + 0.6 + 0.8 + 1.0) / 4)
    area = 10 * 0.1 + 15 * 0.4 + 25 * 0.7 + 50 * 0.9 + 100 * 1.0
    assert durability.auc(c) == pytest.approx(area / 200)
    assert durability.steps_to(c) == 25 and durability.steps_to(c, 0.9) == 100
    assert durability.steps_to(curve((0, 0.0), (10, 0.4))) is None  # not within the attack
    # before the attack is step 0, not the first evaluated step: an eval_at without 0 has no before
    late = curve((10, 0.3), (100, 0.9))
    assert durability.value_at(late, "forget_rate", 0) is None and durability.value_at(late, "forget_rate", None) == 0.9
    assert durability.value_at(c, "forget_rate", 25) == 0.6
    s = durability.summary([c, curve((0, 0.0), (10, 0.0), (25, 0.0), (50, 0.0), (100, 0.4))], until=100)
    assert s["window"]["n"] == 2 and s["window"]["mean"] == pytest.approx((0.65 + 0.1) / 2)
    assert s["steps_to_50"] == [25, None] and s["last_step"] == 200
    assert durability.ratio(s, durability.summary([c], until=100)) == pytest.approx(0.375 / 0.65)
    assert durability.ratio(s, durability.summary([curve((0, 0.0), (10, 0.0))])) is None  # base never relearns
    assert s["spread"] is None  # curves of no named model: one model
    # two models, two attack seeds each: how much is the model's, how much the attack's
    runs = [dict(curve((0, 0.0), (10, w)), model=m, seed=s)
            for m, s, w in (("a", 1, 0.4), ("a", 0, 0.2), ("b", 0, 0.6), ("b", 1, 0.6))]
    spread = durability.summary(runs)["spread"]
    assert spread["by_model"] == pytest.approx({"a": 0.3, "b": 0.6})
    assert spread["between_models"] == pytest.approx(0.15) and spread["within_model"] == pytest.approx(0.05)
    # releasing the best: chosen on attack seed 0 (a: 0.2), judged on the held-out seed 1 (0.4), not on 0.2
    assert spread["best_of"] == {"models": 2, "chosen": "a", "chosen_on": pytest.approx(0.2), "chosen_seed": 0,
                                 "held_out": pytest.approx(0.4)}
    # a's attack under seed 0 failed: both are chosen on seed 1, the lowest they share (a's 0.4 against b's
    # 0.3, not a's seed 1 against b's seed 0), and judged on seed 2
    failed = [dict(curve((0, 0.0), (10, w)), model=m, seed=s)
              for m, s, w in (("a", 1, 0.4), ("a", 2, 0.1), ("b", 0, 0.9), ("b", 1, 0.3), ("b", 2, 0.5))]
    assert durability.spread(failed)["best_of"] == {"models": 2, "chosen": "b", "chosen_on": pytest.approx(0.3),
                                                    "chosen_seed": 1, "held_out": pytest.approx(0.7)}
    apart = [dict(curve((0, 0.0), (10, 0.1)), model=m, seed=s) for m, s in (("a", 0), ("a", 1), ("b", 2), ("b", 3))]
    assert durability.spread(apart)["best_of"] is None  # no attack seed in common: no fair choice
    one = durability.spread(runs[1:3])  # one attack per model
    assert one["within_model"] is None and one["best_of"] is None
    # never measured (a detector that judged no prompt) is not "never relearned"; nor is a value that is no rate
    assert durability.steps_to(curve((0, None), (10, None))) == durability.NOT_MEASURED
    assert durability.summary([c], rate=False)["steps_to_50"] == [durability.NOT_MEASURED]


def test_a_grid_is_validated_on_its_own(tmp_path):
    good = {"name": "g", "reference": "a", "defaults": {"steps": 4, "eval_at": [0, 4]},
            "attackers": [{"name": "a"}, {"name": "b", "kind": "lora", "lora": {"rank": 2}}]}
    attacks = GridConfig.model_validate(good).attacks()
    assert [a.name for a in attacks] == ["g.a", "g.b"] and attacks[1].options().rank == 2
    path = tmp_path / "grid.yaml"
    for bad, message in (({**good, "reference": "c"}, "reference 'c' is not one of the attackers (a, b)"),
                         ({**good, "attackers": [{"name": "a", "stesp": 3}]}, "grid attackers.0: unknown key 'stesp'"),
                         ({**good, "name": "a b"}, "name: 'a b' is not a valid name"),
                         ({**good, "attackers": [{"name": "a"}, {"name": "a", "lr": 1e-3}]},
                          "attacker names must be unique; repeated: a"),
                         ({**good, "attackers": [{"name": "a"}, {"lr": 1e-3}]},
                          "every attacker needs a name as text (attacker 1 has None)"),
                         ({**good, "attackers": [{"name": "a"}, {"name": 5}]},
                          "every attacker needs a name as text (attacker 1 has 5)"),
                         ({**good, "attackers": [{"name": "a", "data": {"classes": ["two"]}}]},
                          "grid attackers.0.data.classes needs a built-in world"),
                         ({**good, "attackers": [{"name": "a"}, {"name": "b", "eval_at": [2, 4]}]},
                          "must evaluate at step 0 (the model before the attack): add 0 to the eval_at of g.b"),
                         ({**good, "attackers": [{"name": "a"}, {"name": "b", "eval_at": [0, 2, 4]}]},
                          "grid attackers.1: evaluates steps [2, 4] within the window, the reference a [4]"),
                         ({**good, "window_until": 3},
                          "the reference a evaluates no step within the window (0, 3]")):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_grid(path).attacks()
    # nested sections of the defaults merged key by key, not replaced by an attacker's own
    nested = {**good, "defaults": {**good["defaults"], "kind": "lora", "lora": {"rank": 16, "alpha": 16}},
              "attackers": [{"name": "a"}, {"name": "b", "lora": {"targets": ["to_q"]}}]}
    lora = GridConfig.model_validate(nested).attacks()[1].options()
    assert (lora.rank, lora.alpha, lora.targets) == (16, 16, ["to_q"])
    # but one concept's description replaced whole: its prompts and an attacker's own classes never mix
    concept = {**good, "defaults": {**good["defaults"], "data": {"prompts": ["a cat"]}},
               "attackers": [{"name": "a"}, {"name": "b", "data": {"classes": ["two"]}}]}
    world = world_for(ModelConfig(source="digits"))
    data = GridConfig.model_validate(concept).attacks(world)[1].data
    assert data.classes == ["two"] and not data.prompts
    path.write_text("name: g\nreference: a\nattackers:\n  - name: a\n    lr: 1.0e-4\n    lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="the key 'lr' appears twice"):
        load_grid(path)
    # an attacker's own classes, checked and normalised by the study's world as a study's own attacks are
    world = world_for(ModelConfig(source="digits"))
    classes = {**good, "attackers": [{"name": "a", "data": {"classes": ["2"]}}]}
    assert GridConfig.model_validate(classes).attacks(world)[0].data.classes == ["two"]
    with pytest.raises(ConfigError, match=re.escape("grid attackers.0.data.classes")):
        GridConfig.model_validate({**good, "attackers": [{"name": "a", "data": {"classes": ["twoo"]}}]}).attacks(world)


def test_the_durability_command_on_a_tiny_study(tiny_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_pipeline_dir, run, seeds=[0], attacks=[])))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "reference": "full", "defaults": {"steps": 2, "batch_size": 2, "eval_at": [0, 1, 2]},
        "attackers": [{"name": "full", "lr": 1e-3},
                      {"name": "own", "kind": "lora", "lr": 1e-3, "lora": {"rank": 2},
                       "data": {"prompts": ["a cat"]}}]}))  # a concept of the attacker's own
    result = CliRunner().invoke(app, ["durability", str(study), str(grid)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "durability-g.json").read_text())
    assert [r["attacker"] for r in summary["rows"]] == ["full", "own"]
    relearn, own = summary["rows"]
    for row in summary["rows"]:
        assert set(row["variants"]) == {"base", "meta"} and row["variants"]["meta"]["steps_to_50"]
        assert row["after"]["base"]["related_accuracy"] is not None
        assert set(row["cost"]["meta"]) == {"related_accuracy", "unrelated_accuracy"}
    assert not relearn["benign"] and relearn["strength"] in (1.0, None)  # the reference is the unit of strength
    assert own["benign"] and own["ratio"] is None  # an honest finetune: its cost counts, not a ratio
    extra = summary["benign_extra_cost"]["related_accuracy"]
    assert extra == pytest.approx(own["cost"]["meta"]["related_accuracy"] - own["cost"]["base"]["related_accuracy"])
    assert "| full |" in (run / "durability-g.md").read_text() and "worst" in result.output
    from PIL import Image

    with Image.open(run / "durability-g.png") as figure:  # one panel per attacker, side by side
        assert figure.width > 1.5 * figure.height
    own = json.loads((run / "data/attack-roles/attacks.g.own.data.json").read_text())
    assert own["items"] == 2  # images_per_prompt of the study, in the attack split
    assert (run / "attacks/esd-meta-seed0/g.own-seed0/curve.json").is_file()
    again = CliRunner().invoke(app, ["durability", str(study), str(grid)])  # everything cached
    assert again.exit_code == 0 and json.loads((run / "durability-g.json").read_text()) == summary


def test_the_summary_keeps_destructive_and_benign_attackers_out_of_the_worst_case():
    from metaunlearn.durability import summarise

    grid = GridConfig.model_validate({
        "name": "g.v2", "reference": "ref", "defaults": {"steps": 100, "eval_at": [0, 10, 100]},
        "attackers": [{"name": "ref"}, {"name": "strong"}, {"name": "wrecker"},
                      {"name": "honest", "data": "unrelated"}]})

    def run(forget: list[float], unrelated: list[float]) -> list[dict]:
        return [{"points": [{"step": s, "values": {"forget_rate": f, "related_accuracy": 0.9, "unrelated_accuracy": u}}
                            for s, f, u in zip((0, 10, 100), forget, unrelated)]}]

    keep = [1.0, 1.0, 1.0]
    curves = {"g.v2.ref": {"base": run([0, 0.6, 1.0], keep), "meta": run([0, 0.2, 0.4], keep)},
              "g.v2.strong": {"base": run([0, 0.9, 1.0], keep), "meta": run([0, 0.5, 0.9], keep)},
              "g.v2.wrecker": {"base": run([0, 0.5, 0.5], [1.0, 0.3, 0.2]), "meta": run([0, 0.5, 0.5], keep)},
              "g.v2.honest": {"base": run([0, 0, 0], keep), "meta": run([0, 0, 0], [1.0, 0.95, 0.9])}}
    summary = summarise(grid, curves, "forget_rate")
    rows = {r["attacker"]: r for r in summary["rows"]}
    assert rows["ref"]["ratio"] == pytest.approx(0.3 / 0.8) and rows["ref"]["strength"] == pytest.approx(1.0)
    assert rows["ref"]["settings"]["name"] == "g.v2.ref" and rows["ref"]["settings"]["steps"] == 100
    assert rows["strong"]["strength"] == pytest.approx(0.95 / 0.8) and rows["wrecker"]["destructive"]
    assert rows["honest"]["benign"] and rows["honest"]["ratio"] is None
    assert summary["worst_up_to_default"] == {"attacker": "ref", "ratio": pytest.approx(0.375)}
    assert summary["worst_stronger"]["attacker"] == "strong" and summary["worst"]["attacker"] == "strong"
    assert summary["benign_extra_cost"]["unrelated_accuracy"] == pytest.approx(0.1)
    assert "by unlearned model" not in table(summary)  # one model per variant: no spread to show
    # a base the attacker never brings the concept back to, a meta model it does: worst, whatever the ratios
    weak = dict(curves, **{"g.v2.strong": {"base": run([0, 0, 0], keep), "meta": run([0, 0.1, 0.2], keep)}})
    worse = summarise(grid, weak, "forget_rate")
    assert worse["worst_up_to_default"] == {"attacker": "strong", "ratio": None, "only_meta_relearns": True}
    assert worse["worst"]["attacker"] == "strong" and "strong (meta relearns, the base does not)" in table(worse)
    # the base's attack on seed 2 failed: meta/base on seeds 0 and 1 only, not every meta seed against two bases
    def seeded(variant, seed, forget):
        return [dict(c, model=f"esd{'-meta' * (variant == 'meta')}-seed{seed}", seed=seed) for c in run(forget, keep)]

    gap = dict(curves, **{"g.v2.ref": {"base": seeded("base", 0, [0, 0.6, 1.0]) + seeded("base", 1, [0, 0.6, 1.0]),
                                       "meta": seeded("meta", 0, [0, 0.2, 0.4]) + seeded("meta", 1, [0, 0.2, 0.4])
                                       + seeded("meta", 2, [0, 1.0, 1.0])}})
    row = summarise(grid, gap, "forget_rate")["rows"][0]
    assert row["unpaired"] == 1 and row["ratio"] == pytest.approx(0.3 / 0.8)
    # a meta attack that failed leaves the attacker's strength on every base curve, as the reference's
    lost = dict(gap, **{"g.v2.strong": {"base": seeded("base", 0, [0, 0.6, 1.0]) + seeded("base", 1, [0, 1.0, 1.0]),
                                        "meta": seeded("meta", 0, [0, 0.2, 0.4])}})
    rows = {r["attacker"]: r for r in summarise(grid, lost, "forget_rate")["rows"]}
    assert rows["strong"]["strength"] == pytest.approx(0.9 / 0.8)  # not 0.8 / 0.8 over seed 0's base alone
    assert rows["strong"]["variants"]["base"]["window"]["mean"] == pytest.approx(0.8)
    from metaunlearn.durability import paired_grid

    shown = paired_grid(lost)  # the figure's curves: the pairs the table's numbers are over
    assert len(shown["g.v2.strong"]["base"]) == len(shown["g.v2.strong"]["meta"]) == 1
    assert "note: ref: 1 curve(s) left out" in table(summarise(grid, gap, "forget_rate"))
    both_zero = dict(curves, **{"g.v2.strong": {"base": run([0, 0, 0], keep), "meta": run([0, 0, 0], keep)}})
    assert summarise(grid, both_zero, "forget_rate")["worst"]["attacker"] == "ref"  # neither relearns: no case
    # two unlearned models of the meta variant, two attack seeds each, under the reference attacker
    curves["g.v2.ref"]["meta"] = [dict(c, model=m, seed=s) for m, s, f in (("m0", 0, 0.2), ("m0", 1, 0.4),
                                                                           ("m1", 0, 0.6), ("m1", 1, 0.6))
                                  for c in run([0, f, f], keep)]
    assert ("meta window under ref by unlearned model: m0 30.0, m1 60.0 (std between models 15.0; between attack "
            "seeds on one model 5.0); the best of 2 on attack seed 0, m0 (20.0), under the other attack "
            "seeds: 40.0") in table(summarise(grid, curves, "forget_rate"))
    # an attacker with classes of its own (the shipped grid's new concept) is summarised with the study's world
    own = GridConfig.model_validate({**grid.model_dump(), "attackers": [
        {"name": "ref"}, {"name": "honest", "data": {"classes": ["two"]}}]})
    honest = {"base": run([0, 0, 0], keep), "meta": run([0, 0, 0], keep)}
    rows = summarise(own, {"g.v2.ref": curves["g.v2.strong"], "g.v2.honest": honest}, "forget_rate",
                     world=world_for(ModelConfig(source="digits")))["rows"]
    assert rows[1]["benign"] and rows[1]["settings"]["data"]["classes"] == ["two"]


def test_a_distance_is_summarised_without_steps_to_half_and_shown_as_it_is():
    from metaunlearn.durability import summarise

    grid = GridConfig.model_validate({"name": "g", "reference": "ref", "attackers": [{"name": "ref"}],
                                      "defaults": {"steps": 100, "eval_at": [0, 10, 100]}})
    fid = lambda values: [{"points": [{"step": s, "values": {"fid_forget": v}}  # noqa: E731
                                      for s, v in zip((0, 10, 100), values)]}]
    curves = {"g.ref": {"base": fid([40.0, 12.5, 0.4]), "meta": fid([40.0, 30.0, 20.0])}}
    summary = summarise(grid, curves, "fid_forget", rate=False)
    meta = summary["rows"][0]["variants"]["meta"]
    assert summary["rate"] is False and meta["steps_to_50"] == [durability.NOT_MEASURED]
    assert meta["window"]["mean"] == pytest.approx(25.0) and "| 6.45 | 25 |" in table(summary)
    # read as a value that rises with the concept (the default), meta/base is meta's window over base's; FID
    # falls as the concept returns, and oriented (base's over meta's) below 1 still means "resists"
    assert summary["rises"] is True and summary["rows"][0]["ratio"] == pytest.approx(25.0 / 6.45, rel=1e-2)
    falls = summarise(grid, curves, "fid_forget", rate=False, rises=False)
    assert falls["rows"][0]["ratio"] == pytest.approx(6.45 / 25.0, rel=1e-2) and falls["rows"][0]["strength"] == 1.0
    assert "base/meta (the key falls as the concept returns)" in table(falls)
    # a second attacker that brings FID down further on the base is the stronger one; the best of two models
    # under the first attack seed is the one furthest from the concept (the highest window)
    two = GridConfig.model_validate({**grid.model_dump(), "attackers": [{"name": "ref"}, {"name": "hard"}]})
    hard = {"base": fid([40.0, 2.0, 0.1]), "meta": fid([40.0, 10.0, 5.0])}
    rows = summarise(two, {**curves, "g.hard": hard}, "fid_forget", rate=False, rises=False)["rows"]
    assert rows[1]["strength"] == pytest.approx(6.45 / 1.05, rel=1e-2) and rows[1]["strength"] > 1
    models = [dict(c, model=m, seed=s) for m, values in (("near", [40.0, 2.0, 1.0]), ("far", [40.0, 30.0, 20.0]))
              for s in (0, 1) for c in fid(values)]
    assert durability.spread(models, "fid_forget", rises=False)["best_of"]["chosen"] == "far"
    assert durability.spread(models, "fid_forget")["best_of"]["chosen"] == "near"
    # a rate: steps to 50% counted, windows in percent
    assert summarise(grid, curves, "fid_forget")["rows"][0]["variants"]["base"]["steps_to_50"] == [0]


def test_the_measured_value_is_the_forget_rate_unless_the_grid_names_a_real_one():
    from metaunlearn.durability import relearning_key
    from metaunlearn.errors import ConfigError
    from metaunlearn.report import forget_rate_first

    grid = {"name": "g", "reference": "a", "attackers": [{"name": "a"}]}
    keys = ["fid_forget", "forget_rate", "related_accuracy"]
    assert relearning_key(GridConfig.model_validate(grid), keys) == "forget_rate"  # not a first FID
    assert relearning_key(GridConfig.model_validate(grid), ["clip_score_forget"]) == "clip_score_forget"
    assert relearning_key(GridConfig.model_validate({**grid, "key": "related_accuracy"}), keys) == "related_accuracy"
    with pytest.raises(ConfigError, match="grid key 'forget-rate' is not a value of the study's metrics"):
        relearning_key(GridConfig.model_validate({**grid, "key": "forget-rate"}), keys)
    specs = [{"key": k} for k in keys]
    assert [s["key"] for s in forget_rate_first(specs)] == ["forget_rate", "fid_forget", "related_accuracy"]


def test_an_attacker_that_diverges_is_reported_and_the_grid_still_summarised(tiny_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_pipeline_dir, run, seeds=[0], variants=["base"], attacks=[])))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "reference": "full", "defaults": {"steps": 2, "batch_size": 2, "eval_at": [0, 2]},
        "attackers": [{"name": "full", "lr": 1e-3},
                      {"name": "wreck", "optimizer": "sgd", "lr": 1e4, "momentum": 0.9}]}))
    result = CliRunner().invoke(app, ["durability", str(study), str(grid)])
    assert result.exit_code == 1, result.output
    summary = json.loads((run / "durability-g.json").read_text())
    assert [(f["attacker"], f["variant"], f["seed"]) for f in summary["failed"]] == [("wreck", "base", 0)]
    assert "diverged" in summary["failed"][0]["error"] and "failed: wreck on esd-seed0 (attack seed 0)" in result.output
    assert "worst: " in result.output and "(over the attacks that ran: 1 failed, listed below)" in result.output
    assert summary["rows"][0]["variants"]["base"]["window"] is not None  # the others were measured


def test_the_grid_figure_has_a_panel_per_attacker_and_a_mean_line_per_variant(tmp_path, monkeypatch):
    from metaunlearn import plots

    def curve(rates):
        return {"specs": [{"key": "forget_rate", "label": "forget rate", "higher_is_better": False}],
                "points": [{"step": s, "values": {"forget_rate": r}} for s, r in zip((0, 10, 25), rates)]}

    curves = {"g.v2.full": {"base": [curve([0, .6, .8]), curve([0, .4, 1])], "meta": [curve([0, 0, .2])]},
              "g.v2.lora": {"meta": [curve([0, .1, .1])]}}  # an attack that failed on every base model
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, axes, title, path: seen.update(axes=axes, title=title))
    plots.plot_grid(curves, "forget_rate", tmp_path / "grid.png", "g.v2")  # a grid name may hold a dot
    assert [ax.get_title() for ax in seen["axes"]] == ["full", "lora"]
    assert seen["title"] == "forget rate under grid 'g.v2'"
    lines = {ax.get_title(): {line.get_label(): (list(line.get_ydata()), line.get_color()) for line in ax.get_lines()}
             for ax in seen["axes"]}
    assert lines["full"] == {"base (n=2)": (pytest.approx([0, .5, .9]), "C0"),
                             "meta (n=1)": (pytest.approx([0, 0, .2]), "C1")}
    assert lines["lora"] == {"meta (n=1)": (pytest.approx([0, .1, .1]), "C1")}  # meta's colour everywhere
