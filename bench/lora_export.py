"""The erasure as a LoRA (issue 16): unlearn a concept (the study's base method, cached in the run
folder), export the UNet difference as LoRAs of several ranks with `metaunlearn.export`, load each
onto the original model (load_lora_weights, then fuse_lora) and evaluate it with the study's
metrics next to the original and the full unlearned model.

    python bench/lora_export.py --config configs/digits-eight.yaml --ranks 1 2 4 8 16 --energy 0.9 1.0

Rows: every --ranks entry, the energy rule at each --energy (1.0: all a LoRA can carry), and the
first energy with --bias (biases carried; such a LoRA cannot be fused when a layer it changes has no
bias, so it is evaluated unfused). Writes OUT/table.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-eight.yaml")
    parser.add_argument("--out", default="bench/out/lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--energy", type=float, nargs="*", default=[0.9, 1.0],
                        help="energy-rule rows (1.0: all a LoRA can carry); the first also gets a --bias row")
    parser.add_argument("--no-bias-row", action="store_true", help="skip the --bias variant")
    parser.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    args = parser.parse_args()

    from peft.tuners.lora import LoraLayer

    from metaunlearn.config import load_config
    from metaunlearn.export import export_lora
    from metaunlearn.stages import evaluator, load_model, original_source, run_unlearn

    out = Path(args.out)
    cfg = load_config(args.config, [f"output.dir={out}", *args.set])
    start = time.perf_counter()
    model_dir = run_unlearn(cfg, args.seed, progress=False)
    print(f"unlearned model: {model_dir} ({time.perf_counter() - start:.0f} s, cached runs: 0)")
    ev = evaluator(cfg)
    rows = []

    def evaluate(label: str, model, **extra) -> None:
        t = time.perf_counter()
        results, _ = ev.evaluate(model, progress=False, original=label == "original")
        values = results["values"]
        rows.append({"label": label, **extra, **{k: values.get(k) for k in
                     ("forget_rate", "related_accuracy", "unrelated_accuracy", "fid_forget")},
                     "eval_s": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)

    evaluate("original", load_model(cfg))
    unlearned = load_model(cfg, model_dir)
    evaluate("unlearned (full)", unlearned,
             adapter_mb=round(sum(p.numel() * 4 for p in unlearned.unet.parameters()) / 2 ** 20, 3))
    specs = [(f"rank {r}", {"rank": r}) for r in args.ranks] + [(f"energy {e}", {"energy": e}) for e in args.energy]
    if args.energy and not args.no_bias_row:
        specs.append((f"energy {args.energy[0]} + biases", {"energy": args.energy[0], "bias": True}))
    for label, options in specs:
        folder = out / "exports" / label.replace(" + biases", "-bias").replace(" ", "-")
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        report = export_lora(model_dir, original_source(cfg), folder, **options)
        export_s = time.perf_counter() - t
        model = load_model(cfg)
        model.pipe.load_lora_weights(folder)
        # every exported layer must have come back as a LoRA layer (a loader that drops some says nothing)
        loaded = sum(isinstance(m, LoraLayer) for m in model.unet.modules())
        if report["fusable"]:
            model.pipe.fuse_lora()
            model.pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
        evaluate(label, model, rank=report["rank"], captured=report["captured_share"],
                 not_representable=report["not_representable_share"], adapter_mb=report["adapter_mb"],
                 fused=report["fusable"], layers=report["layers"], loaded_layers=loaded,
                 export_s=round(export_s, 1))
    (out / "table.json").write_text(json.dumps({"config": args.config, "seed": args.seed, "rows": rows,
                                                "threads": torch.get_num_threads()}, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| model | rank | captured % | adapter MB | forget rate % | related % | unrelated % | forget FID |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = "–" if r.get("fid_forget") is None else f"{r['fid_forget']:.1f}"
        mb = "–" if r.get("adapter_mb") is None else f"{r['adapter_mb']:.2f}"
        rates = " | ".join(pct(r[k]) for k in ("forget_rate", "related_accuracy", "unrelated_accuracy"))
        lines.append(f"| {r['label']} | {r.get('rank', '–')} | {pct(r.get('captured'))} | {mb} | {rates} | {fid} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
