"""`metaunlearn report RUN_DIR`: report.html, report.md and results.json from
the files a study left in its run folder, and nothing else (the folder can be
moved or copied and reported elsewhere).

The tables follow the paper's (the first metric value, the forget rate by
default, before the attack and at each attack step, per method x variant) with
mean ± std over seeds, which the paper does not give, and show every other
value the study's metrics declared (results carry their declarations), so a
new metric needs no change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import StudyConfig, load_config
from .prompt_files import recorded_digests
from .errors import MetaunlearnError
from .layout import (
    CURVE,
    ENVIRONMENT,
    FAILURES,
    ORIGINAL,
    STUDY_FILE,
    TIMINGS,
    RunLayout,
    attack_seeds,
    model_identity,
    read_json,
    unlearned_models,
    write_json,
    write_text,
)
from .metrics import durability
from .model_card import attack_text
from .metrics.durability import FORGET_RATE, WINDOW_UNTIL


@dataclass
class Img:
    path: str  # relative to the run folder
    alt: str


@dataclass
class Row:
    name: str
    variant: str  # 'original', 'base' or 'meta'
    models: list[tuple[str, int | None]]  # (model label, unlearning seed; None for the original)


def method_title(config: StudyConfig) -> str:
    """The method's own title for its settings ('ESD-u'), else its registered name."""
    from .registry import METHODS

    if config.method.name in METHODS:
        return METHODS.get(config.method.name).impl.title(config.method)
    return config.method.name


def study_rows(config: StudyConfig) -> list[Row]:
    rows = [Row(ORIGINAL, ORIGINAL, [(ORIGINAL, None)])]
    for variant in config.variants:
        name = f"{method_title(config)} / {'unlearn' if variant == 'base' else 'meta'}"
        rows.append(Row(name, variant, [(m.label, m.seed) for m in unlearned_models(config) if m.variant == variant]))
    return rows


def stat(values: list) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values), "values": values}


def fmt(s: dict | None, spec: dict | None = None) -> str:
    """mean ± std over seeds: in percent for fractions, else 3 significant digits."""
    if s is None:
        return "–"
    scale, form = (100, ".1f") if spec is None or spec.get("fraction", True) else (1, ".3g")
    mean, std = scale * s["mean"], scale * s["std"]
    return f"{mean:{form}} ± {std:{form}}" if s["n"] > 1 else f"{mean:{form}}"


def secs(s: dict | None) -> str:
    return "–" if s is None else f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["n"] > 1 else "")


class RunFolder:
    """What a run folder holds for its study, keeping only results made with its current settings."""

    def __init__(self, run_dir: Path, config: StudyConfig):
        from .metrics.evaluate import attack_settings_key, settings_key

        self.dir, self.config, self.layout = run_dir, config, RunLayout(run_dir)
        recorded = {}  # prompt files by the digests the run recorded: a report from another directory matches
        for result in sorted((run_dir / "eval").glob("*.json")):
            recorded.update(read_json(result).get("prompt_files") or {})
        with recorded_digests(recorded):
            self._settings, self._attack_settings = settings_key(config), attack_settings_key(config)

    def evaluation(self, label: str) -> dict:
        r = read_json(self.layout.eval(label))
        return r if r.get("settings_key") == self._settings and self.of_current_model(r, label) else {}

    def curves(self, row: Row, attack) -> list[dict]:
        found = [self.curve(label, attack, s)
                 for label, seed in row.models for s in attack_seeds(self.config, attack, seed)]
        return [c for c in found if c]

    def curve(self, label: str, attack, seed: int) -> dict:
        """The curve of `attack` with `seed` on `label`, when made with the current settings (the attack's,
        the evaluation's and the data's; curves written before the settings were recorded pass) on the
        weights the label holds now; else {}."""
        c = read_json(self.layout.attack(label, attack.name, seed) / CURVE)
        current = attack.made_curve(c) and \
            c.get("settings_key", self._attack_settings) == self._attack_settings
        return c if current and self.of_current_model(c, label) else {}

    def of_current_model(self, result: dict, label: str) -> bool:
        """Measured on the weights the label's folder holds now: a model retrained since (other settings)
        keeps its label, so an evaluation or a curve of the earlier one must not pass for its numbers.
        Results written before the identity was recorded pass."""
        return self.layout.released(label) and self.same_weights(result, label)

    def same_weights(self, result: dict, label: str) -> bool:
        """Made from the weights the label's run made last (whether or not released now): the original's
        always, and results written before the identity was recorded."""
        if label == ORIGINAL or "model_identity" not in result:
            return True
        return result["model_identity"] == model_identity(self.layout.model(label))

    def specs(self, rows: list[Row]) -> list[dict]:
        """The metric values the study reports, as its results declare them; the forget rate first
        when measured: the value whose return the durability numbers and the summary are about (a
        first metric that is a distance, FID or CLIP score, would pass for it)."""
        for row in rows:
            for label, _ in row.models:
                if self.evaluation(label).get("specs"):
                    return forget_rate_first(self.evaluation(label)["specs"])
            for attack in self.config.attacks:
                for curve in self.curves(row, attack):
                    if curve.get("specs"):
                        return forget_rate_first(curve["specs"])
        return []

    def image(self, path: Path, alt: str) -> Img | None:
        return Img(path.relative_to(self.dir).as_posix(), alt) if path.is_file() else None


def forget_rate_first(specs: list[dict]) -> list[dict]:
    return sorted(specs, key=lambda spec: spec["key"] != FORGET_RATE)  # stable: the rest keep their order


def at_step(curves: list[dict], step: int, key: str) -> dict | None:
    return stat([p["values"].get(key) for c in curves for p in c["points"] if p["step"] == step])


def collect(folder: RunFolder, rows: list[Row]) -> dict:
    """The numbers of every table, machine-readable: per row and metric value,
    mean/std over seeds before any attack and at every evaluated attack step."""
    config, specs = folder.config, folder.specs(rows)
    keys = [s["key"] for s in specs]
    rate = bool(specs) and specs[0].get("fraction", True)  # steps to 50% of a distance (FID, CLIP score): none
    rises = not keys or durability.rises_with_concept(specs, keys[0])
    before = {row.name: {k: stat([folder.evaluation(label).get("values", {}).get(k) for label, _ in row.models])
                         for k in keys} for row in rows}
    attacks = {}
    for attack in config.attacks:
        steps = [s for s in attack.eval_at if s]
        table = {}
        for row in rows:
            curves = folder.curves(row, attack)
            table[row.name] = {
                "values": {k: {"before": before[row.name][k], **{str(s): at_step(curves, s, k) for s in steps}}
                           for k in keys},
                "durability": durability.summary(curves, keys[0], WINDOW_UNTIL, rate, rises)
                if keys and curves else None,
                "per_curve": [{"model": c["model"], "seed": c["seed"], "auc": durability.auc(c, keys[0]),
                               "steps_to_50": durability.steps_to(c, 0.5, keys[0]) if rate else durability.NOT_MEASURED}
                              for c in curves] if keys else [],
                "curves": len(curves), "seconds": stat([c.get("seconds") for c in curves])}
        attacks[attack.name] = {"steps": steps, "last_step": steps[-1] if steps else None, "rows": table}
    unlearn_s = {row.name: stat([read_json(folder.layout.unlearn(label) / "timing.json").get("seconds")
                                 for label, seed in row.models if seed is not None]) for row in rows[1:]}
    by_variant = {row.variant: unlearn_s[row.name] for row in rows[1:]}
    base, meta = by_variant.get("base"), by_variant.get("meta")
    return {"study": config.name, "seeds": config.seeds, "variants": config.variants,
            "units": "metric values as declared in 'values' (fractions in [0, 1] where 'fraction'); "
                     "mean and std (population) over seeds",
            "values": specs, "conventions": conventions(folder, rows), "before_attack": before, "attacks": attacks,
            # the report stage's own time is not known while it writes, so it is left out
            "cost": {"stages_s": {k: v for k, v in read_json(folder.dir / TIMINGS).items() if k != "report"},
                     "unlearn_s": unlearn_s,
                     "meta_overhead": meta["mean"] / base["mean"] if base and meta and base["mean"] else None},
            "failures": [{k: f.get(k) for k in ("stage", "error")} for f in _failures(folder.dir)],
            "incomplete": incomplete(folder, rows, attacks),
            "environment": read_json(folder.dir / ENVIRONMENT)}


def conventions(folder: RunFolder, rows: list[Row]) -> dict:
    """How the numbers were made, from the first evaluation found: sampling settings, seeds,
    prompt sources and every metric's own conventions (detector thresholds and classes, the
    CLIP model, FID features and references)."""
    ev = next((e for r in rows for label, _ in r.models if (e := folder.evaluation(label))), {})
    if not ev:
        return {}
    config, roles = folder.config, {}
    for role, prompts in _by_role(ev.get("prompts", [])).items():
        given = config.evaluation.prompts.get(role)
        source = (f"file {given}" if isinstance(given, str) else "evaluation.prompts list") if given else \
            f"concepts.{role} (the prompts unlearning used)"
        roles[role] = {"prompts": len(prompts), "source": source}
    return {"sampling": ev.get("settings", {}), "roles": roles,
            "metrics": {name: d["conventions"] for name, d in ev.get("details", {}).items() if d.get("conventions")}}


def _by_role(prompts: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for role, prompt in prompts:
        out.setdefault(role, []).append(prompt)
    return out


def incomplete(folder: RunFolder, rows: list[Row], attacks: dict) -> list[str]:
    """What the study asks for and the folder does not hold yet (interrupted, blocked or failed):
    a report of a half-finished run says so instead of passing for a whole one. `attacks`: the
    collected tables, whose curve counts say what was found."""
    missing = [f"evaluation of {label}" for row in rows for label, _ in row.models if not folder.evaluation(label)]
    for attack in folder.config.attacks:
        for row in rows:
            expected = sum(len(attack_seeds(folder.config, attack, seed)) for _, seed in row.models)
            found = attacks[attack.name]["rows"][row.name]["curves"]
            if found < expected:
                missing.append(f"attack {attack.name} on {row.name}: {found} of {expected} runs")
    return missing


def _failures(run_dir: Path) -> list[dict]:
    import json

    try:
        found = json.loads((run_dir / FAILURES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []


def build(folder: RunFolder, rows: list[Row], results: dict) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, image, code) for both renderers."""
    from .plots import plot_curves

    config, doc, specs = folder.config, [], results["values"]
    primary = specs[0] if specs else None
    label_of = {label: row.name for row in rows for label, _ in row.models}
    readings = "; ".join(f"{s['label']}: {'higher' if s['higher_is_better'] else 'lower'} is better" for s in specs)
    from .report_layout import samples_figure, summary_blocks

    doc += [("h1", f"metaunlearn study '{config.name}'")]
    doc += summary_blocks(folder, rows, results) + samples_figure(folder, rows, results)
    doc += [("h2", "Before any attack"),
            ("p", (f"Method {method_title(config)}; variants {', '.join(config.variants)}; seeds {config.seeds}. "
                   f"Mean ± std over seeds; shares in percent ({readings}). After a relearning attack a "
                   "meta-unlearned model's related quality is meant to fall (its self-destruct).")),
            ("table", ["model"] + [s["label"] for s in specs],
             [[r.name] + [fmt(results["before_attack"][r.name][s["key"]], s) for s in specs] for r in rows])]
    doc += conventions_blocks(results["conventions"])
    for attack in config.attacks:
        res = results["attacks"][attack.name]
        doc += [("h2", f"Attack {attack.name}"), ("p", attack_text(attack))]
        if primary is not None:
            columns = ["before"] + [str(s) for s in res["steps"]]
            doc += [("p", f"{primary['label'].capitalize()} before and at each attack step:"),
                    ("table", ["model", "before"] + [f"step {s}" for s in res["steps"]],
                     [[name] + [fmt(e["values"][primary["key"]][c], primary) for c in columns]
                      for name, e in res["rows"].items()])]
            doc += [("p", f"How fast it comes back: the window is the mean {primary['label']} over the evaluated "
                          f"steps up to {WINDOW_UNTIL}, the AUC its time average over the whole attack, and the "
                          "first evaluated step at which it reaches 50% (per seed; '>N': not within the attack)."),
                    ("table", ["model", "window", "AUC", "steps to 50%"],
                     [[name, fmt(d["window"], primary), fmt(d["auc"], primary),
                       ", ".join(str(s) if s is not None else f">{d['last_step']}" for s in d["steps_to_50"])]
                      for name, e in res["rows"].items() if (d := e["durability"])])]
        others = [s for s in specs[1:] if s.get("group", "concept") != "utility"]
        utility = [s for s in specs[1:] if s.get("group") == "utility"]
        for chosen, text in ((others, "The other values"), (utility, "Utility (lower FID/KID: closer to the "
                                                                      "reference; CLIP score: prompt alignment)")):
            if chosen and res["last_step"] is not None:
                last = str(res["last_step"])
                doc += [("p", f"{text} before the attack and after it (step {last}):"),
                        ("table", ["model"] + [f"{s['label']} {w}" for s in chosen for w in ("before", "after")],
                         [[name] + [fmt(e["values"][s["key"]][w], s) for s in chosen for w in ("before", last)]
                          for name, e in res["rows"].items()])]
        curves = [c for row in rows for c in folder.curves(row, attack)]
        if curves and specs:
            path = plot_curves(curves, folder.dir / "report" / f"curves-{attack.name}.png", specs,
                               title=f"{attack.name}: every value over the attack",
                               key=lambda c: label_of.get(c["model"], c["model"]))
            doc.append(("img", folder.image(path, f"curves of {attack.name}")))
    prompts = next((folder.evaluation(label).get("prompts") for r in rows for label, _ in r.models
                    if folder.evaluation(label).get("prompts")), [])
    doc += [("h2", "Samples"),
            ("p", "Each grid has one row per evaluation prompt, in this order: " +
             "; ".join(f"{role}: {p}" for role, p in prompts) +
             ". Columns: the first samples of each prompt, with the same seeds for every model (first seed shown).")]
    first = [(row.name, *row.models[0]) for row in rows if row.models]
    # grids of the current settings and weights only (those the numbers are of), as in the figure above
    doc.append(("table", ["model", "samples before any attack"],
                [[name, folder.image(folder.layout.eval_grid(label), f"{name} samples")
                  if folder.evaluation(label) else None] for name, label, _ in first]))
    for attack in config.attacks:
        ends = sorted({attack.eval_at[0], attack.eval_at[-1]})
        doc += [("h3", f"Attack {attack.name}"),
                ("table", ["model"] + [f"step {s}" for s in ends],
                 [[name] + [folder.image(folder.layout.attack(label, attack.name, attack_seeds(config, attack, seed)[0])
                                         / f"samples-step{s}.png", f"{name} step {s}")
                            if folder.curve(label, attack, attack_seeds(config, attack, seed)[0]) else None
                            for s in ends]
                  for name, label, seed in first])]
    cost = results["cost"]
    overhead = f"{cost['meta_overhead']:.2f}x" if cost["meta_overhead"] else "–"
    doc += [("h2", "Cost"),
            ("p", f"Meta overhead (meta unlearning time / base unlearning time): {overhead}."),
            ("table", ["model", "unlearning (s)"] + [f"{a.name} (s)" for a in config.attacks],
             [[r.name, secs(cost["unlearn_s"].get(r.name))] +
              [secs(results["attacks"][a.name]["rows"][r.name]["seconds"]) for a in config.attacks] for r in rows]),
            ("p", f"Wall time per stage (s), total {sum(cost['stages_s'].values()):.1f} s:"),
            ("table", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in cost["stages_s"].items()])]
    env = results["environment"]
    doc += [("h2", "Reproduce"),
            ("p", "metaunlearn run study.yaml (the resolved config below, saved in the run folder)."),
            ("table", ["item", "value"], [[k, str(v)] for k, v in {**env.get("versions", {}),
                                                         **{k: v for k, v in env.items() if k != "versions"}}.items()]),
            ("pre", (folder.dir / STUDY_FILE).read_text(encoding="utf-8"))]
    failures, missing = results["failures"], results["incomplete"]
    doc += [("h2", "Failures"),
            ("table", ["stage", "error"], [[f["stage"], f["error"]] for f in failures]) if failures else
            ("p", "None." if not missing else "None recorded.")]
    if missing:
        doc += [("p", "Incomplete: the study is not finished (interrupted, or stages blocked by a failure); "
                      f"missing: {'; '.join(missing)}. Run `metaunlearn run` on the study again to finish it.")]
    return doc


def conventions_blocks(conv: dict) -> list[tuple]:
    """The report's statement of how every number was made (README, 'Evaluation')."""
    if not conv:
        return []
    sampling = conv["sampling"]
    rows = [["samples per prompt", str(sampling.get("samples_per_prompt"))],
            ["sampler", f"{sampling.get('sampler', 'DDIM')}, {sampling.get('steps')} steps, guidance "
                        f"{sampling.get('guidance_scale')}"],
            ["seeds", f"{sampling.get('seeds', '')}; a prompt's first seed is its file's evaluation_seed, else "
                      f"{sampling.get('seed_offset')} + 1000 x its position"]]
    rows += [[f"{role} prompts", f"{r['prompts']} from {r['source']}"] for role, r in conv["roles"].items()]
    rows += [[f"metric {name}", "; ".join(f"{k}: {v}" for k, v in c.items())] for name, c in conv["metrics"].items()]
    return [("h2", "Evaluation conventions"), ("table", ["item", "value"], rows)]


def write_report(run_dir: str | Path) -> Path:
    """Write report.html, report.md and results.json into `run_dir`; returns report.html."""
    from .report_html import to_html, to_markdown

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetaunlearnError(f"'{run_dir}' is not a folder; give the run folder of a study (output.dir)")
    if not (run_dir / STUDY_FILE).is_file():
        raise MetaunlearnError(f"'{run_dir}' has no {STUDY_FILE}: not the run folder of a study; "
                               "make one with `metaunlearn run STUDY.yaml`")
    config = load_config(run_dir / STUDY_FILE)
    folder, rows = RunFolder(run_dir, config), study_rows(config)
    results = collect(folder, rows)
    has_eval = any(s for r in results["before_attack"].values() for s in r.values())
    if not has_eval and not any(e["curves"] for a in results["attacks"].values() for e in a["rows"].values()):
        raise MetaunlearnError(f"'{run_dir}' has no results yet (no evaluations, no attack curves); "
                               "run or resume the study with `metaunlearn run` first")
    from .report_layout import collapsible

    doc = collapsible(build(folder, rows, results))
    write_json(run_dir / "results.json", results)
    from .model_card import write_model_cards

    write_model_cards(run_dir, config, results)  # every released model's README.md, with these numbers
    write_text(run_dir / "report.md", to_markdown(doc))
    return write_text(run_dir / "report.html", to_html(doc, run_dir, f"metaunlearn: {config.name}"))
