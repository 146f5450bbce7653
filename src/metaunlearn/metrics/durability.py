"""Durability numbers of relearning curves: how fast an attack brings a value
back, per curve, over seeds, and relative to a reference model.

For a curve of value v (the forget rate by default) at evaluated attack steps:
- window: the mean of v over the evaluated steps after 0 (the measure
  bench/RESULTS.md has used since issue 5, over steps 10, 25, 50, 100);
- auc: the area under v over [0, last step], trapezoidal, divided by the last
  step: the time-averaged value over the attack;
- steps_to: the first evaluated step at which v reaches a level (50%), None
  when it never does within the attack ("not within N steps");
- spread: with several unlearned models (seeds) and attack seeds, how much the
  window varies between models and between attacks on one model.
"""

from __future__ import annotations

import statistics

NOT_MEASURED = "–"  # steps to a level of a value that was never measured, or is no rate
FORGET_RATE = "forget_rate"  # the concept_rate metric's forget-role value: what relearning brings back
WINDOW_UNTIL = 100  # the window's last step: steps 10, 25, 50, 100 in the studies of bench/RESULTS.md


def _series(curve: dict, key: str, until: int | None = None) -> list[tuple[int, float]]:
    return [(p["step"], p["values"][key]) for p in curve["points"]
            if p["values"].get(key) is not None and (until is None or p["step"] <= until)]


def value_at(curve: dict, key: str, step: int | None) -> float | None:
    """`key` at attack step `step`: 0 is before the attack, None the last evaluated step. None when that step
    was not evaluated (an `eval_at` without 0 has no before) or the value not measured."""
    points = [p for p in curve["points"] if step is None or p["step"] == step]
    return points[-1]["values"].get(key) if points else None


def window(curve: dict, key: str = FORGET_RATE, until: int | None = None) -> float | None:
    after = [v for s, v in _series(curve, key, until) if s > 0]
    return statistics.mean(after) if after else None


def auc(curve: dict, key: str = FORGET_RATE, until: int | None = None) -> float | None:
    series = _series(curve, key, until)
    if len(series) < 2:
        return None
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(series, series[1:]))
    return area / (series[-1][0] - series[0][0])


def steps_to(curve: dict, level: float = 0.5, key: str = FORGET_RATE) -> int | str | None:
    """The first evaluated step at which `key` reaches `level`; None: not within the attack; NOT_MEASURED: no
    step has a value (a detector that judges none of the prompts), which must not read as "never relearned"."""
    series = _series(curve, key)
    return next((s for s, v in series if v >= level), None) if series else NOT_MEASURED


def shown(x: float | None, rate: bool = True) -> str:
    """A value as the tables print it: a rate in %, a distance (FID) as it is, '–' when not measured."""
    return NOT_MEASURED if x is None else f"{100 * x:.1f}" if rate else f"{x:.4g}"


def rises_with_concept(specs: list[dict], key: str) -> bool:
    """Whether forget-role value `key` rises as the concept comes back (a rate, a CLIP score) or falls (a distance
    to the concept's images, FID): the opposite of what its declaration among `specs` (Value.as_dict) calls
    better. Undeclared: it rises, as the forget rate does."""
    return not next((s.get("higher_is_better", False) for s in specs if s.get("key") == key), False)


def summary(curves: list[dict], key: str = FORGET_RATE, until: int | None = None, rate: bool = True,
            rises: bool = True) -> dict:
    """Mean and std over curves (seeds) of the window (up to step `until`) and the
    auc (the whole attack), and each curve's steps to 50% (when `key` is a rate). `rises`: whether `key`
    rises as the concept comes back (else the best model of `spread` is the one with the highest window)."""
    def stat(values):
        values = [v for v in values if v is not None]
        return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "n": len(values)} \
            if values else None

    return {"window": stat([window(c, key, until) for c in curves]), "auc": stat([auc(c, key) for c in curves]),
            # "50% relearned" is a rate that rises as the concept returns (not an accuracy of another role)
            "steps_to_50": [steps_to(c, 0.5, key) if rate and rises else NOT_MEASURED for c in curves],
            "last_step": max((c["points"][-1]["step"] for c in curves if c["points"]), default=None),
            "spread": spread(curves, key, until, rises)}


def spread(curves: list[dict], key: str = FORGET_RATE, until: int | None = None, rises: bool = True) -> dict | None:
    """Each unlearned model's mean window over its attack seeds, the std of those means (between models:
    what the unlearning run's own draws decide) and the mean std over one model's attack seeds (what the
    attack's draws decide; None with one attack per model). None for fewer than two models.

    With two or more attack seeds per model, also what releasing the best of the models would give: the
    model with the lowest window (the highest, for a key that falls as the concept returns) under the lowest
    attack seed every model has, judged on the others only (held out, so the choice does not flatter its own number)."""
    by_model: dict[str, list[tuple[int, float]]] = {}
    for c in curves:
        w = window(c, key, until)
        if w is not None:
            by_model.setdefault(c.get("model", ""), []).append((c.get("seed", 0), w))
    if len(by_model) < 2:
        return None
    runs = {m: dict(sorted(ws)) for m, ws in by_model.items()}
    means = {m: statistics.mean(ws.values()) for m, ws in runs.items()}
    within = [statistics.pstdev(ws.values()) for ws in runs.values() if len(ws) > 1]
    out = {"by_model": means, "between_models": statistics.pstdev(means.values()),
           "within_model": statistics.mean(within) if within else None, "best_of": None}
    # chosen on one attack seed every model has (a failed attack must not have them judged on different
    # seeds), judged on its other seeds
    common = set.intersection(*(set(ws) for ws in runs.values()))
    if common and all(len(ws) > 1 for ws in runs.values()):
        on = min(common)
        best = (min if rises else max)(runs, key=lambda m: runs[m][on])
        out["best_of"] = {"models": len(runs), "chosen": best, "chosen_on": runs[best][on], "chosen_seed": on,
                          "held_out": statistics.mean(w for s, w in runs[best].items() if s != on)}
    return out


def ratio(model: dict | None, reference: dict | None) -> float | None:
    """model / reference of two summaries' mean windows (None when the reference is 0 or missing)."""
    if not model or not reference or not model["window"] or not reference["window"]:
        return None
    ref = reference["window"]["mean"]
    return model["window"]["mean"] / ref if ref > 0 else None
