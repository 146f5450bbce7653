"""`metaunlearn select STUDY GRID`: which of a study's unlearned models to release.

A meta model's resistance depends on its training seed far more than on the
attack's draw (bench/RESULTS.md: between models a std of 12 window points,
between attack seeds on one model 3). A publisher can turn that spread into
resistance: train several seeds, attack each with a selection grid, release
the one that relearns slowest. The rule:

1. a model may not win by being broken, before or by the attacks: it is out
   when another model is at least as good, within `tolerance`, on every rate
   it is judged on and better by more than `tolerance` on one. The rates:
   before any attack (step 0 of its curves) the grid's key (the forget rate)
   and related and unrelated accuracy, and its collateral, the unrelated
   accuracy the attacks cost it (mean over its attacks: a self-destruct that
   spills onto unrelated concepts wins windows by wrecking the model);
2. of the others, the least relearned: the lowest mean relearning window (the
   highest, for a key that falls as the concept returns, such as FID) over the grid's
   relearning attackers (each attacker weighs the same, averaged over its
   attack seeds); ties go to the least collateral, then to the first in the
   study's seed order.

The choice must then be judged on attacks it never saw: a selection grid
should share no attacker and no seed with the durability grid it is reported
on (configs/grids/digits-select.yaml against digits.yaml; `durability` notes
a grid a selection was made on). Attacks are ordinary, cached attack stages
(attacks/<model>/<grid>.<attacker>-seed<s>/).
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from .config import StudyConfig
from .durability import QUALITY, GridConfig, attack_cost, attack_grid, failure_line, mean_at, relearning_key
from .errors import ConfigError
from .layout import RunLayout, atomic_dir, unlearned_models, write_json, write_text
from .metrics import durability
from .model_card import CARD
from .worlds import world_for

TOLERANCE = 0.05  # rates a model may trail another by and still be chosen
COLLATERAL = "collateral"  # unrelated accuracy lost in the attacks: the self-destruct must stay on the concept


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _declared(models: dict) -> dict[str, dict]:
    """key -> its value declaration, as the curves carry them."""
    return {s.get("key"): s for by in models.values() for cs in by.values() for c in cs for s in c.get("specs", [])}


def _rates(models: dict, keys: tuple[str, ...]) -> dict[str, bool]:
    """The keys that are rates (a tolerance in points means something for them), each with whether higher
    is better, as the curves' own value declarations say (without any: the forget rate lower, others higher)."""
    specs = _declared(models)
    return {k: specs.get(k, {}).get("higher_is_better", k != durability.FORGET_RATE) for k in keys
            if specs.get(k, {}).get("fraction", True)}


def _dominates(a: dict, b: dict, better: dict[str, bool], tolerance: float) -> list[str]:
    """The rates on which model a is better than b by more than `tolerance`, when it is at least as good
    within `tolerance` on every measured rate; else []. With tolerance 0 this is Pareto dominance; with more,
    two models close on all rates dominate neither."""
    gains = {k: (a[k] - b[k]) * (1 if up else -1) for k, up in better.items() if None not in (a[k], b[k])}
    slack = tolerance + 1e-9  # rates are shares of samples: 1.0 - 0.95 is 0.05000000000000004, not "more"
    if not gains or min(gains.values()) < -slack:
        return []
    return [k for k, g in gains.items() if g > slack]


def rank(models: dict[str, dict[str, list[dict]]], key: str, until: int, tolerance: float = TOLERANCE,
         collateral: bool = True) -> dict:
    """models: label -> relearning attacker -> its curves on that model (one per attack seed). Per model
    its window under each attacker, their mean, before-attack rates, collateral and whether it may be
    chosen; and the chosen label (None when no model was attacked by every attacker as often as the others).
    `collateral`: whether the unrelated accuracy the attacks cost counts among the rates that rule a model out
    (on the digits it trades against the window: bench/RESULTS.md)."""
    attackers = list(dict.fromkeys(a for by in models.values() for a in by))
    full = {a: max(len(by.get(a, [])) for by in models.values()) for a in attackers}  # attack seeds each
    rows = {}
    for label, by_attacker in models.items():
        curves = [c for cs in by_attacker.values() for c in cs]
        windows = {a: _mean(durability.window(c, key, until) for c in by_attacker.get(a, [])) for a in full}
        before = {k: (mean_at(curves, k, 0) or {}).get("mean") for k in (key, *QUALITY)}
        # each attacker weighs the same, however many attack seeds it has (as in the window)
        lost = _mean(attack_cost(cs, "unrelated_accuracy") for cs in by_attacker.values())
        short = [a for a, n in full.items() if len(by_attacker.get(a, [])) < n or windows[a] is None]
        rows[label] = {"windows": windows, "window": None if short else _mean(windows.values()), "before": before,
                       "collateral": lost, "eligible": not short and bool(full),
                       "why": f"not measured under every attack: {', '.join(short)}" if short else None}
    # the rates a model is judged on besides its window: before any attack, and unrelated accuracy lost in them
    better = {**_rates(models, (key, *QUALITY)), **({COLLATERAL: False} if collateral else {})}
    measured = {label: r for label, r in rows.items() if r["eligible"]}
    judged = {label: {**r["before"], COLLATERAL: r["collateral"]} for label, r in measured.items()}

    def beaten_by(label: str, slack: float) -> dict[str, list[str]]:
        return {o: by for o in measured if o != label and (by := _dominates(judged[o], judged[label], better, slack))}

    slack = tolerance if not measured or any(not beaten_by(m, tolerance) for m in measured) else 0.0  # a cycle
    for label, row in measured.items():
        if beaten := beaten_by(label, slack):
            row.update(eligible=False, why="worse before or in the attacks than " + ", ".join(
                f"{o} ({', '.join(by)})" for o, by in beaten.items()))
    # the lowest window, of a key that rises as the concept comes back (the highest of a distance, FID)
    sign = 1 if durability.rises_with_concept(list(_declared(models).values()), key) else -1
    eligible = [(sign * r["window"], math.inf if r["collateral"] is None else r["collateral"], i, label)
                for i, (label, r) in enumerate(rows.items()) if r["eligible"]]
    # the tolerance the gate used: 0 (plain Pareto) when a tolerance would have ruled out every model
    # whether any quality rate ruled on the models at all (not with a detector that judges the forget role only)
    quality = any(r["before"].get(k) is not None for r in rows.values() for k in QUALITY) or \
        (collateral and any(r["collateral"] is not None for r in rows.values()))
    return {"key": key, "rate": _declared(models).get(key, {}).get("fraction", True), "tolerance": slack,
            "collateral": collateral, "models": rows, "quality_judged": quality,
            "chosen": min(eligible)[3] if eligible else None}


def run_select(config: StudyConfig, grid: GridConfig, variant: str = "meta", tolerance: float = TOLERANCE,
               to: Path | None = None, progress: bool = True, log=print, collateral: bool = True) -> dict:
    """Unlearn what is missing, attack each seed's `variant` model with the selection grid's relearning
    attackers, write selection-<variant>-<grid>.json/.md into the run folder, copy the chosen model to
    `to` (when given and every attack ran) and return the selection."""
    from . import stages

    if variant not in config.variants:
        raise ConfigError(f"variant '{variant}' is not one of the study's variants ({', '.join(config.variants)})")
    if len(config.seeds) < 2:
        raise ConfigError(f"selecting a model needs several unlearning seeds; the study has {config.seeds} "
                          "(e.g. --set 'seeds=[0, 1, 2, 3, 4]')")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be from 0 to 1 (a share of the rates), got {tolerance}")
    _check_release_folder(to)  # before the attacks
    world = world_for(config.model)
    relearning = [(spec, a) for spec, a in zip(grid.attackers, grid.attacks(world)) if a.data == "forget"]
    if not relearning:
        raise ConfigError(f"grid '{grid.name}' has no relearning attacker (data: forget) to choose by")
    # honest finetunes and the original model choose nothing: not run
    grid = grid.model_copy(update={"attackers": [spec for spec, _ in relearning], "original": False})
    attacks = [a for _, a in relearning]  # each evaluates step 0 (GridConfig.attacks): the rule compares them there
    config = config.model_copy(update={"variants": [variant]})
    stages.preflight(config, attacks=attacks)
    metrics = stages.evaluator(config)
    key = relearning_key(grid, [v.key for v in metrics.values])
    failed: list[dict] = []
    curves = attack_grid(config, grid, progress, log, failed=failed, metrics=metrics)
    models = {m.label: {a.name[len(grid.name) + 1:]: [c for c in curves[a.name].get(variant, [])
                                                     if c.get("model") == m.label] for a in attacks}
              for m in unlearned_models(config)}
    selection = {**rank(models, key, grid.window_until, tolerance, collateral), "grid": grid.name, "variant": variant,
                 "failed": failed}
    runs = RunLayout.of(config)
    chosen = selection["chosen"]
    selection["model"] = str(runs.model(chosen)) if chosen else None
    name = f"selection-{variant}-{grid.name}"
    write_json(runs.file(f"{name}.json"), selection)
    write_text(runs.file(f"{name}.md"), table(selection))
    if chosen and to is not None and not failed:  # a release from an incomplete selection is none
        _check_release_folder(to)  # again: atomic_dir replaces whatever appeared there during the attacks
        with atomic_dir(to) as tmp:  # all or nothing: a copy cut short leaves no folder that looks like a model
            shutil.copytree(runs.model(chosen), tmp, dirs_exist_ok=True)
            write_json(tmp / "selection.json", selection)
            card = tmp / CARD  # the model card says how the model was chosen, beside what it is
            if card.is_file():
                write_text(card, card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + card_section(selection))
    return selection


def _check_release_folder(to: Path | None) -> None:
    if to is not None and to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ConfigError(f"'{to}' exists and is not {'empty' if to.is_dir() else 'a folder'}; choose a new folder")


def table(selection: dict) -> str:
    """The selection as Markdown: one row per model, the chosen one marked."""
    models = selection["models"]
    attackers = list(next(iter(models.values()))["windows"]) if models else []

    pct = durability.shown

    def window(v):  # the key's values: a rate in %, a distance (FID) as it is
        return durability.shown(v, selection.get("rate", True))

    lines = ["| model | " + " | ".join(attackers) + " | mean window | before: key / related / unrelated | "
             "unrelated lost in the attacks | chosen |", "|" + "---|" * (len(attackers) + 5)]
    for label, r in models.items():
        b = r["before"]
        mark = "**chosen**" if label == selection["chosen"] else (r["why"] or "")
        lines.append(f"| {label} | " + " | ".join(window(r["windows"][a]) for a in attackers) +
                     f" | {window(r['window'])} | {window(b[selection['key']])} / {pct(b.get('related_accuracy'))} / "
                     f"{pct(b.get('unrelated_accuracy'))} | {pct(r['collateral'])} | {mark} |")
    for f in selection.get("failed", []):
        lines.append(f"\n{failure_line(f)}")
    if models and selection.get("quality_judged") is False:
        lines.append("\nnote: no related or unrelated accuracy was measured (the concept detector judges the "
                     "forget prompts only): models were ruled out on the key before any attack alone, so one an "
                     "attack wrecked is not ruled out; check the released model's quality by other means")
    lines.append(f"\nkey: {selection['key']}; chosen: "
                 + (selection["chosen"] or "none (no model was measured under every attack)"))
    return "\n".join(lines) + "\n"


def card_section(selection: dict) -> str:
    """What a released model's card says of its selection."""
    return (f"## How this model was chosen\n\n`metaunlearn select` chose it among {len(selection['models'])} "
            f"unlearned models of the study (variant '{selection['variant']}', one per unlearning seed), each "
            f"attacked by the relearning attackers of the selection grid '{selection['grid']}'. A model was ruled "
            f"out when another was as good, within the tolerance, on every rate below"
            f"{'' if selection.get('collateral', True) else ' (before the attacks)'} and better by more than "
            f"{100 * selection['tolerance']:g} points on one; of the rest, the one least relearned was chosen: the "
            f"lowest mean {selection['key']} over the evaluated attack steps of its window (the highest for a key "
            "that falls as the concept returns, such as FID). Rates in %; "
            "judge the model on attacks this choice never saw.\n\n" + table(selection))
