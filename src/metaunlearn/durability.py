"""`metaunlearn durability STUDY GRID`: every unlearned model of a study against
a grid of attackers that its own config never names (and the meta objective
never simulates), with each attacker's curves, the meta/base ratio of its
relearning window, the worst case over the grid, and steps to 50% relearned.

A grid is its own YAML file (configs/grids/): attacker settings as in a
study's `attacks:` list, `defaults` shared by all, and `reference`, the
attacker of the study's default strength. An attacker's strength is how fast
it relearns the base model: the base's window under it over the base's window
under the reference, so "up to the default strength" means what it did, not
what its lr looks like. For a key that falls as the concept returns (FID to the
concept's images) both ratios are taken the other way round (base over meta,
reference over base), so below 1 still means "resists" and "weaker". An
attacker that costs the base more than 20 points of unrelated accuracy
destroys the model rather than relearning the concept (its forget rate then
measures what a detector makes of wrecked images): it is listed, marked, and
left out of the worst cases. Attacks are ordinary attack stages
(attacks/<model>/<grid>.<attacker>-seed<s>/), cached and resumable like a study's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import NAME_PATTERN, AttackConfig, RoleConfig, StudyConfig, read_yaml
from .errors import ConfigError, MetaunlearnError
from .layout import RunLayout, attack_seeds, unlearned_models, write_json, write_text
from .metrics import durability
from .registry import Options
from .schema_paths import describe_error
from .worlds import world_for

QUALITY = ("related_accuracy", "unrelated_accuracy")
DESTRUCTIVE = 0.2  # an attack that costs the base model more unrelated accuracy than this destroys it

class GridConfig(Options):
    name: str = Field(pattern=NAME_PATTERN, description="The grid's name: its attacks' folder prefix.")
    defaults: dict[str, Any] = Field({}, description="Settings every attacker has unless it says otherwise.")
    attackers: list[dict[str, Any]] = Field(min_length=1, description="Attackers, as entries of `attacks:`.")
    reference: str = Field(description="The attacker of the study's default strength.")
    original: bool = Field(False, description="Also attack the original model (first seed): destructive or not.")
    key: Optional[str] = Field(None, description=(
        "The value whose return is measured (default: the forget rate when the study measures it, else the first)."))
    window_until: int = Field(100, gt=0, description=(
        "The relearning window is the mean over evaluated steps in (0, window_until]; AUC and steps to 50% "
        "use the whole attack."))

    @model_validator(mode="after")
    def _reference_is_listed(self) -> GridConfig:
        names = [a.get("name") for a in self.attackers]
        if not all(isinstance(n, str) and n for n in names):
            first = [isinstance(n, str) and bool(n) for n in names].index(False)
            raise ValueError(f"every attacker needs a name as text (attacker {first} has {names[first]!r})")
        repeated = sorted({str(n) for n in names if names.count(n) > 1})
        if repeated:  # one folder per attacker name: two would overwrite each other's curves
            raise ValueError(f"attacker names must be unique; repeated: {', '.join(repeated)}")
        if self.reference not in names:
            raise ValueError(f"reference '{self.reference}' is not one of the attackers ({', '.join(map(str, names))})")
        return self

    def attacks(self, world=None) -> list[AttackConfig]:
        """The attackers as attacks; with the study's built-in `world`, an attacker's own classes checked
        and normalised by it, as a study's own attacks are."""
        out = []
        for i, spec in enumerate(self.attackers):
            data = {**merged(self.defaults, spec), "name": f"{self.name}.{spec.get('name')}"}
            try:
                attack = AttackConfig.model_validate(data)
            except ValidationError as err:
                raise ConfigError(f"grid attackers.{i}: {describe_error(err.errors()[0], AttackConfig)}") from None
            if isinstance(attack.data, RoleConfig) and attack.data.classes:
                if world is None:
                    raise ConfigError(f"grid attackers.{i}.data.classes needs a built-in world as model.source")
                try:
                    attack.data.classes = world.normalise_classes(attack.data.classes)
                except ValueError as err:
                    raise ConfigError(f"grid attackers.{i}.data.classes {err}") from None
            out.append(attack)
        self._comparable(out)
        return out

    def _comparable(self, attacks: list[AttackConfig]) -> None:
        """Every attacker is measured at step 0 (its cost; whether it destroys the base) and, when it relearns,
        at the reference's steps within the window: a strength or a worst case over other steps means nothing."""
        def steps(a: AttackConfig) -> list[int]:
            return [s for s in a.eval_at if 0 < s <= self.window_until]

        reference = next((a for a in attacks if a.name == f"{self.name}.{self.reference}"), None)
        if reference is not None and not steps(reference):
            raise ConfigError(f"the reference {self.reference} evaluates no step within the window (0, "
                              f"{self.window_until}]: every window would be empty; add such a step to its eval_at "
                              "or raise window_until")
        for i, attack in enumerate(attacks):
            if 0 not in attack.eval_at:
                raise ConfigError(f"grid attackers.{i}: attackers must evaluate at step 0 (the model before the "
                                  f"attack): add 0 to the eval_at of {attack.name}")
            if reference is not None and attack.data == "forget" and steps(attack) != steps(reference):
                raise ConfigError(f"grid attackers.{i}: evaluates steps {steps(attack)} within the window, the "
                                  f"reference {self.reference} {steps(reference)}; give them the same eval_at")


def load_grid(path: str | Path) -> GridConfig:
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
        return GridConfig.model_validate(data)
    except OSError as err:
        raise ConfigError(f"cannot read grid file '{path}': {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not a valid YAML grid: {str(err).splitlines()[0]}") from None
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe_error(err.errors()[0], GridConfig)}") from None


def run_grid(config: StudyConfig, grid: GridConfig, progress: bool = True, log=print) -> dict:
    """Unlearn what is missing, attack every unlearned model with every attacker of
    the grid, write durability-<grid>.json/.md into the run folder and return the summary."""
    from . import stages
    from .plots import plot_grid

    stages.preflight(config, attacks=grid.attacks(world_for(config.model)))  # the grid's, not the study's
    metrics = stages.evaluator(config)
    key = relearning_key(grid, [v.key for v in metrics.values])  # checked before any attack
    specs = [v.as_dict() for v in metrics.values]
    rate = next(s["fraction"] for s in specs if s["key"] == key)
    rises = durability.rises_with_concept(specs, key)
    failed: list[dict] = []
    curves = attack_grid(config, grid, progress, log, failed=failed, metrics=metrics)
    runs = RunLayout.of(config)
    # a model chosen on this very grid (`metaunlearn select`) is not judged on held-out attacks here
    chosen_here = [f.name for f in (runs.file(f"selection-{v}-{grid.name}.json") for v in ("base", "meta"))
                   if f.is_file()]
    summary = {**summarise(grid, curves, key=key, world=world_for(config.model), rate=rate, rises=rises),
               "failed": failed,
               "selected_on_this_grid": chosen_here}
    write_json(runs.file(f"durability-{grid.name}.json"), summary)
    write_text(runs.file(f"durability-{grid.name}.md"), table(summary))
    plot_grid(paired_grid(curves), key, runs.file(f"durability-{grid.name}.png"), grid.name)  # as the table
    return summary


def relearning_key(grid: GridConfig, keys: list[str]) -> str:
    """The value whose return the grid measures: the grid's `key`, which must be one of the study's
    metric values (a misspelt one would read as 'never relearned'), else the forget rate when the
    study measures it (not a first metric that is a distance), else the first value."""
    if grid.key is not None:
        if grid.key not in keys:
            raise ConfigError(f"grid key '{grid.key}' is not a value of the study's metrics ({', '.join(keys)})")
        return grid.key
    return durability.FORGET_RATE if durability.FORGET_RATE in keys else keys[0]


def attack_grid(config: StudyConfig, grid: GridConfig, progress: bool = True, log=print,
                failed: list[dict] | None = None, metrics=None) -> dict:
    """attacker name -> variant ('base', 'meta', 'original') -> its curves (one per seed). With a `failed`
    list, an attack that fails (one that diverges) is recorded there and the grid goes on; without, it raises."""
    from . import stages

    attacks = grid.attacks(world_for(config.model))
    data = stages.attack_split(config, attacks, progress)
    metrics = metrics or stages.evaluator(config)  # the study's metrics: loaded once (detectors, features)
    curves: dict[str, dict[str, list[dict]]] = {a.name: {} for a in attacks}
    runs = RunLayout.of(config)
    targets = [(m.variant, m.config, m.seed, runs.model(m.label), m.label) for m in unlearned_models(config)]
    if grid.original:
        targets.append(("original", config, None, None, "original"))
    for variant, vcfg, seed, model_dir, label in targets:
        if seed is not None:
            stages.run_unlearn(vcfg, seed, progress=progress)
        for attack in attacks:
            for s in attack_seeds(config, attack, seed):
                log(f"durability {grid.name}: {attack.name} seed {s} on {model_dir or 'the original'}")
                try:
                    curve = stages.run_one_attack(vcfg, attack, s, model_dir, data=data, metrics=metrics,
                                                  progress=progress)
                except MetaunlearnError as err:
                    if failed is None:
                        raise
                    failed.append({"attacker": attack.name[len(grid.name) + 1:], "variant": variant, "model": label,
                                   "seed": s, "error": str(err)})
                    log(f"durability {grid.name}: {attack.name} seed {s} failed: {err}")
                    continue
                curves[attack.name].setdefault(variant, []).append(curve)
    return curves


def mean_at(curves: list[dict], key: str, step: int | None) -> dict | None:
    """Mean over curves of `key` at attack step `step` (0: before the attack; None: the last evaluated)."""
    values = [v for v in (durability.value_at(c, key, step) for c in curves) if v is not None]
    return {"mean": sum(values) / len(values), "n": len(values)} if values else None


def attack_cost(curves: list[dict], key: str) -> float | None:
    """How much an attack lowers `key`: before minus after, mean over curves."""
    before, after = mean_at(curves, key, 0), mean_at(curves, key, None)
    return before["mean"] - after["mean"] if before and after else None


def failure_line(f: dict) -> str:
    """A failed attack as one line: the attacker, the model it attacked and its attack seed."""
    on = f.get("model") or f"{f['variant']} seed"  # records written before they named the model
    return f"failed: {f['attacker']} on {on} (attack seed {f['seed']}): {f['error']}"


ONLY_META = "meta relearns, the base does not"  # a ratio over a base window of 0


def paired(by_variant: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], int]:
    """The base's and the meta variant's curves on the (unlearning seed, attack seed) pairs both have, and how
    many curves were left out: after a failed attack, meta/base must not compare the meta models of every seed
    with the base models of the others (the models differ far more between seeds than attacks do)."""
    def key(curve: dict):
        found = re.search(r"-seed(\d+)$", curve.get("model") or "")
        return (int(found.group(1)), curve.get("seed")) if found else None

    if not {"base", "meta"} <= by_variant.keys():
        return by_variant, 0
    keys = {v: {key(c) for c in by_variant[v]} for v in ("base", "meta")}
    if None in keys["base"] | keys["meta"]:  # curves that do not name their unlearning seed: nothing to pair on
        return by_variant, 0
    common = keys["base"] & keys["meta"]
    out = {v: [c for c in curves if key(c) in common] if v in ("base", "meta") else curves
           for v, curves in by_variant.items()}
    return out, sum(len(by_variant[v]) - len(out[v]) for v in ("base", "meta"))


def paired_grid(curves: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, list[dict]]]:
    """Every attacker's curves paired (`paired`): what the summary's numbers are over, for its figure."""
    return {attacker: paired(by_variant)[0] for attacker, by_variant in curves.items()}


def merged(defaults: dict, spec: dict) -> dict:
    """An attacker's settings over the grid's defaults, an attack kind's option section merged key by key
    (defaults `lora: {rank: 16}` and an attacker's `lora: {targets: [...]}` give both); anything else, `data`
    (one concept's description) among it, replaced whole."""
    from .registry import ATTACKS

    out = dict(defaults)
    for key, value in spec.items():
        section = key in ATTACKS.names() and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if section else value
    return out


def summarise(grid: GridConfig, curves: dict, key: str, world=None, rate: bool = True, rises: bool = True) -> dict:
    """Per attacker: each variant's durability over its curves, meta/base, the accuracies after the
    attack; and the worst cases over the grid, up to the reference's strength and beyond it. `world`:
    the study's built-in world, which a grid attacker's own classes need (GridConfig.attacks); `rate`:
    whether `key` is a share in [0, 1] (steps to 50% mean nothing for a distance such as FID); `rises`:
    whether `key` rises as the concept comes back. For one that falls (FID to the concept's images) the
    ratio and the strength are base/meta and reference/base, so below 1 still means "resists" and "weaker"."""
    def relative(a: dict | None, b: dict | None) -> float | None:  # a's window over b's, oriented
        return durability.ratio(a, b) if rises else durability.ratio(b, a)

    # per attacker, over every base curve (whichever the meta variant lacks): its strength, and whether it
    # wrecks the base; the rows' own numbers are over the seeds both variants have
    rows, whole = [], {}
    for attack in grid.attacks(world):
        by_variant, unpaired = paired(curves[attack.name])
        base_curves = curves[attack.name].get("base")
        summaries = {v: durability.summary(c, key, grid.window_until, rate, rises) for v, c in by_variant.items()}
        benign = attack.data != "forget"  # an honest finetune: what it costs, not how fast it relearns
        name = attack.name[len(grid.name) + 1:]  # the grid's name may hold dots too
        rows.append({"attacker": name, "settings": attack.model_dump(mode="json"),
                     "benign": benign, "variants": summaries,
                     "ratio": None if benign else relative(summaries.get("meta"), summaries.get("base")),
                     "after": {v: {k: mean_at(c, k, None) for k in QUALITY} for v, c in by_variant.items()},
                     "cost": {v: {k: attack_cost(c, k) for k in QUALITY} for v, c in by_variant.items()},
                     "unpaired": unpaired})
        if base_curves:
            whole[name] = (durability.summary(base_curves, key, grid.window_until, rate, rises),
                           attack_cost(base_curves, "unrelated_accuracy"))
    for row in rows:  # an attack that wrecks the base is no measure of relearning: kept apart
        base_cost = whole.get(row["attacker"], (None, None))[1]
        row["destructive"] = base_cost is not None and base_cost > DESTRUCTIVE
    reference = whole.get(grid.reference, (None, None))[0]
    for row in rows:
        row["strength"] = relative(whole.get(row["attacker"], (None, None))[0], reference)
    for row in rows:  # the worst case of all, which no ratio expresses: the base never relearns, meta does
        base, meta = (row["variants"].get(v, {}).get("window") for v in ("base", "meta"))
        row["only_meta_relearns"] = bool(rises and not row["benign"] and base and meta
                                         and base["mean"] == 0 < meta["mean"])
    ratios = [r for r in rows if (r["ratio"] is not None or r["only_meta_relearns"]) and not r["destructive"]]
    up_to_default = [r for r in ratios if r["strength"] is not None and r["strength"] <= 1 + 1e-9]
    stronger = [r for r in ratios if r["strength"] is not None and r["strength"] > 1 + 1e-9]

    def worst(group: list[dict]) -> dict | None:
        unbounded = [r for r in group if r["only_meta_relearns"]]
        if unbounded:
            return {"attacker": unbounded[0]["attacker"], "ratio": None, "only_meta_relearns": True}
        top = max(group, key=lambda r: r["ratio"], default=None)
        return {"attacker": top["attacker"], "ratio": top["ratio"]} if top else None

    extra = {k: max((r["cost"]["meta"][k] - r["cost"]["base"][k] for r in rows if r["benign"] and
                     {"base", "meta"} <= r["cost"].keys() and None not in (r["cost"]["meta"][k], r["cost"]["base"][k])),
                    default=None) for k in QUALITY}
    return {"grid": grid.name, "key": key, "rate": rate, "rises": rises, "reference": grid.reference, "rows": rows,
            "worst": worst(ratios), "worst_up_to_default": worst(up_to_default), "worst_stronger": worst(stronger),
            "benign_extra_cost": extra}


def table(summary: dict) -> str:
    """The summary as Markdown: one row per attacker."""
    def pct(s, rate=True):
        return "–" if not s else durability.shown(s["mean"], rate) + (
            f" ± {durability.shown(s['std'], rate)}" if s.get("std") else "")

    def window(s):
        return pct(s, summary.get("rate", True))

    ratio = "meta/base" if summary.get("rises", True) else "base/meta (the key falls as the concept returns)"
    head = (f"| attacker | strength | base window | meta window | {ratio} | base steps to 50% | meta steps to 50% "
            "| unrelated after (base / meta) | related after (base / meta) |\n|" + "---|" * 9)
    lines = [head]
    for r in summary["rows"]:
        v, a = r["variants"], r["after"]
        last = max((s["last_step"] or 0 for s in v.values()), default=0)
        steps = {k: ", ".join(str(s) if s is not None else f">{last}" for s in v[k]["steps_to_50"]) if k in v else "–"
                 for k in ("base", "meta")}
        after = {k: " / ".join(pct(a.get(variant, {}).get(k)) for variant in ("base", "meta"))
                 for k in ("unrelated_accuracy", "related_accuracy")}
        mark = " (destroys the base)" if r.get("destructive") else ""
        lines.append(f"| {r['attacker']}{mark} | {_num(r['strength'])} | {window(v.get('base', {}).get('window'))} | "
                     f"{window(v.get('meta', {}).get('window'))} | "
                     f"{ONLY_META if r.get('only_meta_relearns') else _num(r['ratio'])} | {steps['base']} | "
                     f"{steps['meta']} | {after['unrelated_accuracy']} | {after['related_accuracy']} |")
    reference = next((r for r in summary["rows"] if r["attacker"] == summary["reference"]), None)
    for variant, s in (reference["variants"].items() if reference else []):
        if s.get("spread"):
            lines.append(f"\n{variant} window under {reference['attacker']} by unlearned model: "
                         f"{_spread(s['spread'], summary.get('rate', True))}")
    failed = summary.get("failed", [])
    gaps = f" (over the attacks that ran: {len(failed)} failed, listed below)" if failed else ""
    for name in ("worst_up_to_default", "worst_stronger", "worst"):
        w = summary[name]
        shown = "–" if not w else f"{w['attacker']} ({ONLY_META})" if w.get("only_meta_relearns") else \
            f"{w['attacker']} ({w['ratio']:.2f}x)"
        lines.append(f"\n{name.replace('_', ' ')}: {shown}{gaps}")
    for f in summary.get("failed", []):
        lines.append(f"\n{failure_line(f)}")
    for r in summary["rows"]:
        if r.get("unpaired"):
            lines.append(f"\nnote: {r['attacker']}: {r['unpaired']} curve(s) left out, whose seeds the other variant "
                         "has no curve of (its attack failed): base and meta are compared on the same seeds")
    for name in summary.get("selected_on_this_grid", []):
        lines.append(f"\nnote: {name} chose a model on this grid: its numbers here are not held out")
    extra = summary.get("benign_extra_cost") or {}
    if any(v is not None for v in extra.values()):
        lines.append("\nbenign finetuning, the most it costs the meta model beyond what it costs the base (points): "
                     + ", ".join(f"{k.split('_')[0]} {100 * v:+.1f}" for k, v in extra.items() if v is not None))
    return "\n".join(lines) + "\n"


def _spread(s: dict, rate: bool = True) -> str:
    def f(x: float) -> str:
        return durability.shown(x, rate)

    within, best = s["within_model"], s.get("best_of")
    text = (", ".join(f"{m} {f(w)}" for m, w in s["by_model"].items())
            + f" (std between models {f(s['between_models'])}; between attack seeds on one model "
            + (f"{f(within)})" if within is not None else "not measured: one attack per model)"))
    if best:
        on = f"attack seed {best['chosen_seed']}" if "chosen_seed" in best else "the lowest attack seed"
        text += (f"; the best of {best['models']} on {on}, {best['chosen']} "
                 f"({f(best['chosen_on'])}), under the other attack seeds: {f(best['held_out'])}")
    return text


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"
