"""Relearning and self-destruct curves (matplotlib, headless)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np


MAX_WIDTH_PX = 1180  # the report is read in a 1280-pixel window
PANELS_PER_ROW = 3  # concept rates in the first row, utility values (FID per role, ...) below


def by_model(curve: dict) -> str:
    return curve["model"]


def by_attack(curve: dict) -> str:
    return curve["attack"]["name"]


def _specs(curves: list[dict], specs: list[dict] | None) -> list[dict]:
    return specs if specs is not None else next((c["specs"] for c in curves if c.get("specs")), [])


def curve_bands(curves: list[dict], key: Callable[[dict], str] = by_model,
                specs: list[dict] | None = None) -> dict[str, dict]:
    """Group curves (by model label unless `key` says otherwise): steps, and per
    metric value the mean, std and count over seeds at each step."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for curve in curves:
        groups[key(curve)].append(curve)
    bands = {}
    for label, members in groups.items():
        steps = sorted({p["step"] for c in members for p in c["points"]})
        band = {"steps": steps, "seeds": len(members)}
        for spec in _specs(curves, specs):
            key = spec["key"]
            values = [[next((p["values"][key] for p in c["points"]
                             if p["step"] == s and p["values"].get(key) is not None), np.nan)
                       for s in steps] for c in members]
            arr = np.array(values, dtype=float)
            with warnings.catch_warnings():  # a value no curve has (a role the study lacks) stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                band[key] = {"mean": np.nanmean(arr, 0).tolist(), "std": np.nanstd(arr, 0).tolist()}
        bands[label] = band
    return bands


def plot_curves(curves: list[dict], path: str | Path, specs: list[dict] | None = None, title: str = "",
                key: Callable[[dict], str] = by_model) -> Path:
    """One panel per metric value (as the curves declare them unless `specs` are
    given), one line per group (mean over seeds, ±std band)."""
    specs = _specs(curves, specs)
    bands = curve_bands(curves, key, specs)
    fig, axes = _panels(len(specs), height=3.4, sharex=True)
    for ax, spec in zip(axes, specs):
        better = "higher" if spec.get("higher_is_better", True) else "lower"
        _draw_panel(ax, bands, spec, f"{spec['label']} ({better} is better)")
    return _save(fig, axes, title, path)


def plot_grid(curves: dict[str, dict[str, list[dict]]], key: str, path: str | Path, grid: str,
              title: str = "") -> Path:
    """A durability grid at a glance: one panel per attacker (attacker -> variant -> curves, as
    durability.attack_grid returns them for the grid named `grid`), one line per variant (base, meta,
    original; one colour each in every panel) of the value `key`."""
    every = [c for by_variant in curves.values() for group in by_variant.values() for c in group]
    spec = next((s for s in _specs(every, None) if s["key"] == key), {"key": key, "label": key})
    variants = list(dict.fromkeys(v for by_variant in curves.values() for v in by_variant))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}  # a variant missing from a panel shifts no colour
    fig, axes = _panels(len(curves), height=3.2)
    for ax, (attacker, by_variant) in zip(axes, curves.items()):
        bands = {variant: curve_bands(group, key=lambda _, v=variant: v, specs=[spec])[variant]
                 for variant, group in by_variant.items() if group}
        _draw_panel(ax, bands, spec, attacker.removeprefix(f"{grid}."), colors)  # "<grid>.<attacker>"
    return _save(fig, axes, title or f"{spec['label']} under grid '{grid}'", path)


def _panels(n: int, height: float, sharex: bool = False):
    """A figure of n panels, PANELS_PER_ROW to a row; the row's unused panels hidden."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(PANELS_PER_ROW, max(1, n))
    fig, axes = plt.subplots(max(1, -(-n // cols)), cols, figsize=(4.2 * cols, height * max(1, -(-n // cols))),
                             sharex=sharex, squeeze=False)
    axes = list(axes.reshape(-1))
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _draw_panel(ax, bands: dict[str, dict], spec: dict, title: str, colors: dict[str, str] | None = None) -> None:
    """One line per group (mean over seeds, ±std band) of one metric value; `colors` fixes a group's colour."""
    for label, band in bands.items():
        mean, std = np.array(band[spec["key"]]["mean"]), np.array(band[spec["key"]]["std"])
        if np.all(np.isnan(mean)):
            continue
        line, = ax.plot(band["steps"], mean, marker="o", ms=3, label=f"{label} (n={band['seeds']})",
                        color=(colors or {}).get(label))
        if band["seeds"] > 1:
            ax.fill_between(band["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("attack step")
    if spec.get("fraction", True):
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def _save(fig, axes, title: str, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    drawn = [ax for ax in axes if ax.get_lines()]  # the first value may have no line (a role not judged)
    if drawn:
        drawn[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=min(110, MAX_WIDTH_PX / fig.get_figwidth()))  # fits the report's column
    plt.close(fig)
    return path


GRID_PER_PROMPT, GRID_PAD, GRID_MIN_SIDE = 4, 2, 96  # the sample grids' layout (report_figures cuts them)


def grid_scale(side: int) -> int:
    """Tiny images (the digits world's 32 px) are upscaled to about GRID_MIN_SIDE; SD's are not."""
    return max(1, GRID_MIN_SIDE // side)


def save_samples(images, samples_per_prompt: int, path: str | Path) -> Path:
    """A grid of evaluation samples (prompt-major order, as the evaluator returns
    them): one row per prompt, its first GRID_PER_PROMPT samples, upscaled."""
    from .images import grid, save_png

    k = min(GRID_PER_PROMPT, samples_per_prompt)
    rows = images.reshape(-1, samples_per_prompt, *images.shape[1:])[:, :k].reshape(-1, *images.shape[1:])
    return save_png(grid(rows.float().cpu(), nrow=k, pad=GRID_PAD, scale=grid_scale(images.shape[-1])), path)
