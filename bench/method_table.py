"""The paper's base-vs-meta table, one row per base method, from bench/resist.py
outputs: before-attack quality and the relearning window (mean ± std over
seeds) of the base and its meta model against each attacker of one grid.

    python bench/method_table.py --grid lrs ESD-u=bench/out/resist:default \
        SDD=bench/out/closed/sdd:default UCE=bench/out/closed/uce:anchor RECE=bench/out/closed/rece:anchor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def window(entry: dict | None) -> str:
    w = (entry or {}).get("window")
    if not w:  # no curve of this variant (its attacks failed, or the other variant's did)
        return "–"
    return f"{pct(w['mean'])} ± {pct(w['std'])}" if w.get("n", 1) > 1 else pct(w["mean"])


def quality(before: dict) -> str:
    return " / ".join(pct(before.get(k)) for k in ("forget_rate", "related_accuracy", "unrelated_accuracy"))


def table(rows: list[tuple[str, dict]]) -> str:
    attackers = [r["attacker"] for r in rows[0][1]["rows"] if not r["benign"]]
    head = ["method", "before F / R / U (base)", "before F / R / U (meta)"]
    for name in attackers:
        head += [f"{name} base", f"{name} meta", "meta/base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, summary in rows:
        cells = [label, quality(summary["before"]["base"]), quality(summary["before"]["meta"])]
        by_name = {r["attacker"]: r for r in summary["rows"]}
        for name in attackers:
            row = by_name[name]
            ratio = row["ratio"]
            shown = "meta relearns, the base does not" if row.get("only_meta_relearns") else \
                "–" if ratio is None else f"{ratio:.2f}"
            cells += [window(row["variants"].get("base")), window(row["variants"].get("meta")), shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="the grid's name (summary-GRID.json)")
    parser.add_argument("rows", nargs="+", help="LABEL=OUT_DIR:VARIANT")
    args = parser.parse_args()
    rows = []
    for spec in args.rows:
        label, _, rest = spec.partition("=")
        folder, _, variant = rest.rpartition(":")
        summaries = json.loads((Path(folder) / f"summary-{args.grid}.json").read_text())
        if variant not in summaries:
            parser.error(f"{folder}: no variant '{variant}' (has: {', '.join(summaries)})")
        rows.append((label, summaries[variant]))
    print(table(rows))


if __name__ == "__main__":
    main()
