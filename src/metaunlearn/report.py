"""`metaunlearn report RUN_DIR`: report.html, report.md and results.json from
the files a study left in its run folder, and nothing else (the folder can be
moved or copied and reported elsewhere).

The tables follow the paper's (forget rate before the attack and at each
attack step, per method x variant) with mean ± std over seeds, which the paper
does not give. Rates are shares of samples, shown in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import StudyConfig, load_config
from .errors import MetaunlearnError
from .runfiles import atomic_write_json, atomic_write_text, read_json
from .study import ENVIRONMENT, FAILURES, STUDY_FILE, TIMINGS, attack_seeds, unlearned_models

METRICS = ("forget_rate", "related_accuracy", "unrelated_accuracy")


@dataclass
class Img:
    path: str  # relative to the run folder
    alt: str


@dataclass
class Row:
    name: str
    models: list[tuple[str, int | None]]  # (model label, unlearning seed; None for the original)


def method_title(config: StudyConfig) -> str:
    method = config.method
    if method.name == "esd":
        kind = {"noxattn": "u", "xattn": "x"}.get(method.params, method.params)
        return f"ESD-{kind}" + (f" (η={method.esd.eta:g})" if method.esd.eta != 1 else "")
    return {"sdd": "SDD", "none": "meta-only"}.get(method.name, method.name)


def study_rows(config: StudyConfig) -> list[Row]:
    rows = [Row("original", [("original", None)])]
    for variant in config.variants:
        name = f"{method_title(config)} / {'unlearn' if variant == 'base' else 'meta'}"
        rows.append(Row(name, [(label, seed) for v, label, seed, _ in unlearned_models(config) if v == variant]))
    return rows


def stat(values: list) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values), "values": values}


def pct(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["n"] > 1 else f"{100 * s['mean']:.1f}"


def secs(s: dict | None) -> str:
    return "–" if s is None else f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["n"] > 1 else "")


class RunFolder:
    """What a run folder holds for its study, keeping only results made with its current settings."""

    def __init__(self, run_dir: Path, config: StudyConfig):
        self.dir, self.config = run_dir, config
        ev = config.evaluation
        self._eval_settings = (ev.samples_per_prompt, ev.steps, ev.guidance_scale, ev.seed_offset)

    def released(self, label: str) -> bool:  # an unlearned model whose run finished
        return label == "original" or read_json(self.dir / "unlearn" / label / "run.json").get("status") == "done"

    def evaluation(self, label: str) -> dict:
        r = read_json(self.dir / "eval" / f"{label}.json")
        settings = tuple(r.get(k) for k in ("samples_per_prompt", "steps", "guidance_scale", "seed_offset"))
        return r if r and settings == self._eval_settings and self.released(label) else {}

    def curves(self, row: Row, attack) -> list[dict]:
        wanted = attack.model_dump(mode="json")
        found = [read_json(self.attack_dir(label, attack.name, s) / "curve.json")
                 for label, seed in row.models for s in attack_seeds(self.config, attack, seed)]
        return [c for c in found if c.get("attack") == wanted and self.released(c.get("model", ""))]

    def attack_dir(self, label: str, attack: str, seed: int) -> Path:
        return self.dir / "attacks" / label / f"{attack}-seed{seed}"

    def image(self, path: Path, alt: str) -> Img | None:
        return Img(path.relative_to(self.dir).as_posix(), alt) if path.is_file() else None


def at_step(curves: list[dict], step: int, key: str) -> dict | None:
    return stat([p.get(key) for c in curves for p in c["points"] if p["step"] == step])


def collect(folder: RunFolder, rows: list[Row]) -> dict:
    """The numbers of every table (fractions in [0, 1]), machine-readable."""
    config = folder.config
    before = {row.name: {k: stat([folder.evaluation(label).get(k) for label, _ in row.models]) for k in METRICS}
              for row in rows}
    attacks = {}
    for attack in config.attacks:
        last, table = attack.eval_at[-1] if attack.eval_at else None, {}
        for row in rows:
            curves = folder.curves(row, attack)
            entry = {"forget_rate": {"before": before[row.name]["forget_rate"],
                                     **{str(s): at_step(curves, s, "forget_rate") for s in attack.eval_at if s}}}
            for key in METRICS[1:]:
                entry[key] = {"before": before[row.name][key], "after": at_step(curves, last, key)}
            entry["curves"] = len(curves)
            entry["seconds"] = stat([c.get("seconds") for c in curves])
            table[row.name] = entry
        attacks[attack.name] = {"steps": [s for s in attack.eval_at if s], "last_step": last, "rows": table}
    unlearn_s = {row.name: stat([read_json(folder.dir / "unlearn" / label / "timing.json").get("seconds")
                                 for label, seed in row.models if seed is not None]) for row in rows[1:]}
    base = next((unlearn_s[r.name] for r in rows[1:] if r.name.endswith("/ unlearn")), None)
    meta = next((unlearn_s[r.name] for r in rows[1:] if r.name.endswith("/ meta")), None)
    env = read_json(folder.dir / ENVIRONMENT)
    return {"study": config.name, "seeds": config.seeds, "variants": config.variants,
            "units": "fractions of samples in [0, 1]; mean and std (population) over seeds",
            "before_attack": before, "attacks": attacks,
            # the report stage's own time is not known while it writes, so it is left out
            "cost": {"stages_s": {k: v for k, v in read_json(folder.dir / TIMINGS).items() if k != "report"},
                     "unlearn_s": unlearn_s,
                     "meta_overhead": meta["mean"] / base["mean"] if base and meta and base["mean"] else None},
            "failures": [{k: f.get(k) for k in ("stage", "error")} for f in read_json(folder.dir / FAILURES) or []],
            "environment": env}


def build(folder: RunFolder, rows: list[Row], results: dict) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, image, code) for both renderers."""
    from .evaluation.concept_rates import evaluation_roles
    from .plots import plot_curves

    config, doc = folder.config, []
    doc += [("h1", f"metaunlearn study '{config.name}'"),
            ("p", (f"Method {method_title(config)}; variants {', '.join(config.variants)}; seeds {config.seeds}. "
                   "Rates in percent, mean ± std over seeds (forget rate: lower is better; related and unrelated "
                   "accuracy: higher is better before the attack; after a relearning attack a meta-unlearned "
                   "model's related accuracy is meant to fall)."))]
    doc += [("h2", "Before any attack"),
            ("table", ["model", "forget rate", "related accuracy", "unrelated accuracy"],
             [[r.name] + [pct(results["before_attack"][r.name][k]) for k in METRICS] for r in rows])]
    for attack in config.attacks:
        res = results["attacks"][attack.name]
        doc += [("h2", f"Attack {attack.name}"),
                ("p", (f"{attack.kind} finetuning on {attack.data} data, lr {attack.lr:g}, {attack.steps} steps, "
                       f"batch {attack.batch_size}. Forget rate (%) before and at each attack step:")),
                ("table", ["model", "before"] + [f"step {s}" for s in res["steps"]],
                 [[name] + [pct(e["forget_rate"][k]) for k in ["before"] + [str(s) for s in res["steps"]]]
                  for name, e in res["rows"].items()]),
                ("p", f"Related and unrelated accuracy (%) before the attack and after it (step {res['last_step']}):"),
                ("table", ["model", "related before", "related after", "unrelated before", "unrelated after"],
                 [[name] + [pct(e[k][w]) for k in METRICS[1:] for w in ("before", "after")]
                  for name, e in res["rows"].items()])]
        label_of = {label: row.name for row in rows for label, _ in row.models}
        curves = [c for row in rows for c in folder.curves(row, attack)]
        if curves:
            path = plot_curves(curves, folder.dir / "report" / f"curves-{attack.name}.png",
                               title=f"{attack.name}: relearning (forget) and self-destruct (related, unrelated)",
                               key=lambda c: label_of.get(c["model"], c["model"]))
            doc.append(("img", folder.image(path, f"curves of {attack.name}")))
    prompts = [f"{role}: {p}" for role, ps in evaluation_roles(config).items() for p in ps]
    doc += [("h2", "Samples"),
            ("p", "Each grid has one row per evaluation prompt, in this order: " + "; ".join(prompts) +
             ". Columns: the first samples of each prompt, with the same seeds for every model (first seed shown).")]
    first = [(row.name, *row.models[0]) for row in rows if row.models]
    doc.append(("table", ["model", "samples before any attack"],
                [[name, folder.image(folder.dir / "eval" / f"{label}.png", f"{name} samples")]
                 for name, label, _ in first]))
    for attack in config.attacks:
        ends = sorted({attack.eval_at[0], attack.eval_at[-1]}) if attack.eval_at else []
        doc += [("h3", f"Attack {attack.name}"),
                ("table", ["model"] + [f"step {s}" for s in ends],
                 [[name] + [folder.image(folder.attack_dir(label, attack.name, attack_seeds(config, attack, seed)[0])
                                         / f"samples-step{s}.png", f"{name} step {s}") for s in ends]
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
    failures = results["failures"]
    doc += [("h2", "Failures"),
            ("table", ["stage", "error"], [[f["stage"], f["error"]] for f in failures]) if failures else
            ("p", "None.")]
    return doc


def write_report(run_dir: str | Path) -> Path:
    """Write report.html, report.md and results.json into `run_dir`; returns report.html."""
    from .report_html import to_html, to_markdown

    run_dir = Path(run_dir)
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
    doc = build(folder, rows, results)
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "report.md", to_markdown(doc))
    return atomic_write_text(run_dir / "report.html", to_html(doc, run_dir, f"metaunlearn: {config.name}"))
