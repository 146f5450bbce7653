"""Resistance of meta-unlearning variants against a grid of attackers, on the
digits world: the base method once (its own run folder), each variant's meta
model in a folder of its own, every model attacked by every attacker of the
grid; per variant the grid's durability summary against the shared base, the
before-attack quality, and a figure of every attacker's curves
(<out>/<variant>-<grid>.png). Stages are cached, so a re-run only adds what is new.

    python bench/resist.py --study bench/resist_digits.yaml --grid configs/grids/digits-dev.yaml \\
        --seeds 0 --variant default: --variant keep:meta.unrelated_kept=1.0
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from metaunlearn.config import load_config
from metaunlearn.durability import attack_grid, failure_line, load_grid, paired_grid, summarise, table
from metaunlearn.plots import plot_grid
from metaunlearn.worlds import world_for


def before(curves: dict, variant: str, reference: str) -> dict:
    """Mean values at step 0 of the reference attacker's curves: the model before any attack."""
    points = [p["values"] for c in curves[reference].get(variant, []) for p in c["points"] if p["step"] == 0]
    return {k: sum(p[k] for p in points) / len(points) for k in points[0]} if points else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--grid", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:key=value,key=value (meta overrides of this variant)")
    parser.add_argument("--set", action="append", default=[], help="override for every model, base included")
    parser.add_argument("--out", default="bench/out/resist")
    args = parser.parse_args()
    grid, seeds = load_grid(args.grid), f"seeds=[{', '.join(map(str, args.seeds))}]"
    base_config = load_config(args.study, args.set + [seeds, "variants=[base]", f"output.dir={args.out}/base"])
    base_failed: list[dict] = []  # an attack that diverges is reported, and the rest of the grid still runs
    base = attack_grid(base_config, grid, progress=False, log=lambda _: None, failed=base_failed)
    results = {}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        overrides = [s for s in re.split(r",(?![^\[]*\])", sets) if s]  # commas inside [..] stay
        config = load_config(args.study, args.set + overrides + [seeds, "variants=[meta]",
                                                                 f"output.dir={args.out}/{name}"])
        failed = list(base_failed)
        meta = attack_grid(config, grid, progress=False, log=lambda _: None, failed=failed)
        curves = {a: {**base[a], **meta[a]} for a in base}
        summary = {**summarise(grid, curves, key="forget_rate", world=world_for(config.model)), "failed": failed}
        for f in failed:
            print(failure_line(f), flush=True)
        ref = f"{grid.name}.{grid.reference}"
        summary.update(overrides=overrides, before={"base": before(curves, "base", ref),
                                                    "meta": before(curves, "meta", ref)})
        results[name] = summary
        plot_grid(paired_grid(curves), "forget_rate", Path(args.out) / f"{name}-{grid.name}.png", grid.name,
                  title=f"forget rate under grid '{grid.name}': base vs {name}")
        b, m = summary["before"]["base"], summary["before"]["meta"]
        print(f"## {name} ({', '.join(overrides) or 'defaults'})\n\nbefore any attack (F / R / U): base "
              f"{100 * b['forget_rate']:.1f} / {100 * b['related_accuracy']:.1f} / {100 * b['unrelated_accuracy']:.1f}"
              f", meta {100 * m['forget_rate']:.1f} / {100 * m['related_accuracy']:.1f} / "
              f"{100 * m['unrelated_accuracy']:.1f}\n\n{table(summary)}", flush=True)
    out = Path(args.out) / f"summary-{grid.name}.json"
    earlier = json.loads(out.read_text()) if out.is_file() else {}  # variants of earlier runs stay
    out.write_text(json.dumps({**earlier, **results}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
