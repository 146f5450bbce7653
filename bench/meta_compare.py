"""Compare meta-unlearning settings against the base method under relearning
attacks, on the digits world: unlearn each variant for each seed, attack it,
and summarise the forget rate over attack steps and the related accuracy after
the attack. Stages are cached in the run folder, so re-runs only add what is new.

    python bench/meta_compare.py --study configs/digits-eight.yaml --seeds 0 1 2 \
        --variant base: --variant fo:meta.enabled=true,meta.mode=first_order
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from metaunlearn.config import load_config
from metaunlearn.stages import run_attacks, run_unlearn

WINDOW = (10, 25, 50, 100)


def summarise(curves: list[dict]) -> dict:
    """Per attack: mean forget rate over WINDOW steps and related accuracy at the last step, over seeds."""
    out = {}
    for name in sorted({c["attack"]["name"] for c in curves}):
        members = [c for c in curves if c["attack"]["name"] == name]
        window = [statistics.mean(p["forget_rate"] for p in c["points"] if p["step"] in WINDOW) for c in members]
        related_end = [c["points"][-1]["related_accuracy"] for c in members]
        related_start = [c["points"][0]["related_accuracy"] for c in members]
        out[name] = {"forget_window_mean": statistics.mean(window),
                     "forget_window_std": statistics.pstdev(window) if len(window) > 1 else 0.0,
                     "related_drop_mean": statistics.mean(s - e for s, e in zip(related_start, related_end)),
                     "related_drop_std": statistics.pstdev([s - e for s, e in zip(related_start, related_end)])
                     if len(members) > 1 else 0.0,
                     "forget_before": statistics.mean(c["points"][0]["forget_rate"] for c in members),
                     "related_before": statistics.mean(related_start),
                     "unrelated_before": statistics.mean(c["points"][0]["unrelated_accuracy"] for c in members),
                     "seeds": len(members)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:key=value,key=value (overrides for this variant)")
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    parser.add_argument("--out", default="bench/out/meta_compare")
    args = parser.parse_args()
    results = {}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        overrides = [s for s in re.split(r",(?![^\[]*\])", sets) if s] + args.set  # commas inside [..] stay
        curves = []
        for seed in args.seeds:
            config = load_config(args.study, overrides + [f"output.dir={args.out}/{name}", f"seeds=[{seed}]"])
            model_dir = run_unlearn(config, seed, progress=False)
            curves += run_attacks(config, model_dir, progress=False)
        results[name] = {"overrides": overrides, "attacks": summarise(curves)}
        print(name, json.dumps(results[name]["attacks"], indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
