"""The report at a glance: a summary (one sentence, one table) and a
side-by-side sample figure at the top, every detailed section below it
collapsible (HTML <details>; Markdown keeps the headings)."""

from __future__ import annotations

from .report_figures import compare_figure, rows_to_show

OPEN_SECTIONS = ("Before any attack",)  # shown unfolded; the others start folded


def _pct(stat: dict | None) -> str:
    from .report import fmt

    return fmt(stat)


def summary_blocks(folder, rows, results: dict) -> list[tuple]:
    """One sentence and one table: forget rate before any attack, the relearning window under each
    relearning attack, related and unrelated quality before and after the first one, unlearning time."""
    from .report import method_title, secs

    config, specs = folder.config, results["values"]
    keys = {s["key"] for s in specs}
    if "forget_rate" not in keys:
        return []
    relearn = [a for a in config.attacks if a.data == "forget"]
    first = relearn[0] if relearn else None
    last = str(results["attacks"][first.name]["last_step"]) if first else None
    headers = ["model", "forget rate before"] + [f"window, {a.name}" for a in relearn]
    table = []
    for row in rows:
        before = results["before_attack"][row.name]
        line = [row.name, _pct(before.get("forget_rate"))]
        line += [_pct((results["attacks"][a.name]["rows"][row.name]["durability"] or {}).get("window"))
                 for a in relearn]
        for key in ("related_accuracy", "unrelated_accuracy"):
            if key in keys:
                after = results["attacks"][first.name]["rows"][row.name]["values"][key].get(last) if first else None
                line += [_pct(before.get(key))] + ([_pct(after)] if first else [])
        line.append(secs(results["cost"]["unlearn_s"].get(row.name)) if row.name in results["cost"]["unlearn_s"]
                    else "–")
        table.append(line)
    for key, label in (("related_accuracy", "related"), ("unrelated_accuracy", "unrelated")):
        if key in keys:
            headers += [f"{label} before"] + ([f"{label} after {first.name}"] if first else [])
    headers.append("unlearning (s)")
    forget = config.concepts.forget
    concept = ", ".join(forget.classes or forget.prompts[:3] or [forget.prompt_file or forget.images or "?"])
    text = f"{method_title(config)} erased '{concept}' from {config.model.source} ({', '.join(config.variants)}, " \
           f"seeds {config.seeds})."
    windows = {r.variant: (results["attacks"][first.name]["rows"][r.name]["durability"] or {}).get("window")
               for r in rows} if first else {}
    if windows.get("base") and windows.get("meta") and windows["base"]["mean"] > 0:
        ratio = windows["meta"]["mean"] / windows["base"]["mean"]
        text += (f" Under {first.name} ({first.kind}, lr {first.lr:g}, {first.steps} steps) the meta model relearns "
                 f"{ratio:.2f}x as much as the base model over the first 100 steps (window "
                 f"{_pct(windows['meta'])} against {_pct(windows['base'])}).")
    return [("p", text), ("table", headers, table),
            ("p", "Window: the mean forget rate over the evaluated attack steps up to 100 (lower: more resistant). "
                  "Shares in percent, mean ± std over seeds; details below.")]


def samples_figure(folder, rows, results: dict) -> list[tuple]:
    """Prompts as rows, each model's samples before and after the first attack side by side."""
    from .layout import attack_seeds

    config = folder.config
    prompts = next((folder.evaluation(label).get("prompts") for r in rows for label, _ in r.models
                    if folder.evaluation(label).get("prompts")), [])
    if not prompts:
        return []
    attack = next((a for a in config.attacks if a.data == "forget"), config.attacks[0] if config.attacks else None)
    columns = []
    for row in rows:
        if not row.models:
            continue
        label, seed = row.models[0]
        # grids of the current settings and weights only: a stale one (other prompts or samples, an earlier
        # model of the label) has another shape, or shows what the numbers do not
        before = folder.layout.eval_grid(label) if folder.evaluation(label) else None
        after = None
        if attack is not None:
            first = attack_seeds(config, attack, seed)[0]
            if folder.curve(label, attack, first):
                after = folder.layout.attack(label, attack.name, first) / f"samples-step{attack.eval_at[-1]}.png"
        columns.append((row.name, before, after))
    after_label = f"after {attack.eval_at[-1]} steps" if attack else "after"
    try:
        path = compare_figure(columns, [p for _, p in prompts], rows_to_show(prompts),
                              config.evaluation.samples_per_prompt, folder.dir / "report" / "samples-at-a-glance.png",
                              after_label)
    except ValueError:  # a grid of another shape after all: the figure is left out, never the report
        return []
    if path is None:
        return []
    what = f"before any attack and after {attack.name}" if attack else "before any attack"
    return [("img", folder.image(path, f"samples {what}")),
            ("p", f"Samples {what} (first seed; the same noise for every model; up to 3 prompts per role). "
                  "Every grid is under 'Samples'.")]


def collapsible(doc: list[tuple]) -> list[tuple]:
    """Every h2 section becomes a ('details', title, open) ... ('end',) group."""
    out, inside = [], False
    for block in doc:
        if block[0] == "h2":
            if inside:
                out.append(("end",))
            out.append(("details", block[1], block[1] in OPEN_SECTIONS))
            inside = True
        else:
            out.append(block)
    return out + ([("end",)] if inside else [])
