"""Does the meta objective's gradient survive fp16 mixed precision at full model size?

For each variant (ESD-u alone, and with each path of the meta objective), one engine step from the same
weights and the same draw runs twice: in float32 and under the engine's mixed precision (fp16 autocast
and its loss scaler, as configs/sd14-nudity.yaml runs). Gradient checkpointing is on, as in that config
(off for the functional path, which keeps its inner steps' graphs), and TF32 off. The gradient the
optimizer is about to apply (unscaled, unclipped) is compared: relative error and cosine to the float32
one, with ESD-u alone as the yardstick of what fp16 does to any gradient. fp16 tries that overflow (the
scaler backs off and skips the step) are counted and retried from the same weights; the loss terms and
meta logs must stay finite.

    python bench/fp16_meta.py --device cuda                 # SD-1.4's UNet (random weights), 32x32 latents
    .venv/bin/python bench/fp16_meta.py --small --precision bf16 --latent 8   # a CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import memory  # noqa: E402  the full-size builds

VARIANTS = {  # name -> (meta, overrides)
    "esd": (False, []),
    "esd+meta": (True, []),  # the defaults: in place, a sampled attacker family
    "esd+meta sgd+sharpness": (True, ["meta.inner_step=sgd", "meta.sharpness_cap=0", "meta.low_rank=0"]),
    "esd+meta adam+lora": (True, ["meta.inner_step=adam", "meta.low_rank=1"]),
    # the functional path keeps every inner step's graph: no gradient checkpointing
    "esd+meta functional": (True, ["meta.in_place=false", "meta.low_rank=0", "method.gradient_checkpointing=false"]),
}
MAX_TRIES = 40  # fp16 overflows before giving up: 65536 halves to 1 in 16


def one_step(model, data, meta: bool, sets: list[str], precision: str, device: str) -> dict:
    """Gradients (CPU float32) of one engine step at step index 0, and what the step logged."""
    import torch

    from metaunlearn.config import StudyConfig
    from metaunlearn.engine import make_accelerator
    from metaunlearn.methods import make_method
    from metaunlearn.unlearn import training_engine

    config = StudyConfig.from_dict({
        "model": {"source": "bench", "mixed_precision": precision},
        "concepts": {r: {"prompts": p} for r, p in memory.PROMPTS.items()},
        "method": {"name": "esd", "params": "noxattn", "lr": 1e-5, "batch_size": 1, "esd": {"x_t": "noised"},
                   "gradient_checkpointing": True, "frozen_dtype": "bfloat16",
                   "grad_clip": 0.0},  # unclipped: the gradients' own sizes are compared
        "meta": {"enabled": meta}}, sets)
    model.unet.disable_gradient_checkpointing()  # the model is shared by the variants; the engine turns it on
    engine = training_engine(config, model, data, make_method(config.method, ""),
                             make_accelerator(config.model.model_copy(update={"device": device})), 0)
    trainable = engine.params
    # the engine calls engine.optimizer.step() once the gradients are unscaled (fp16) and summed; accelerate
    # re-patches the inner optimizer's step at every step, so the capture wraps the engine's handle
    taken: dict = {}
    original_step = engine.optimizer.step
    scaler = getattr(engine.accelerator, "scaler", None)

    def capture(*args, **kwargs):
        taken["grads"] = [torch.zeros(p.shape) if p.grad is None else p.grad.detach().float().cpu()
                          for p in trainable.values()]
        before = scaler.get_scale() if scaler is not None else None
        out = original_step(*args, **kwargs)
        if scaler is not None and scaler.get_scale() < before:  # an overflow: the scaler skipped the step
            del taken["grads"]
        return out

    engine.optimizer.step = capture
    tries, scales, begin = 0, [], time.perf_counter()
    while "grads" not in taken and tries < MAX_TRIES:
        scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)
        record = engine.step(0)  # a skipped step leaves the weights as they were: the same step again
        tries += 1
    seconds = (time.perf_counter() - begin) / tries
    logs = {**record.terms, **record.logs}
    out = {"precision": precision, "tries": tries, "scales": scales, "grad_norm": record.grad_norm,
           "finite_logs": all(math.isfinite(v) for v in logs.values()), "logs": logs, "s_per_try": seconds,
           "grads": taken.get("grads")}
    return out


def compare(a: list, b: list) -> tuple[float, float]:
    err2 = dot = na = nb = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        err2 += ((x - y) ** 2).sum().item()
        dot += (x * y).sum().item()
        na += (x ** 2).sum().item()
        nb += (y ** 2).sum().item()
    return err2 ** 0.5 / max(na ** 0.5, 1e-300), dot / max((na * nb) ** 0.5, 1e-300)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--precision", default="fp16", help="the mixed precision compared with float32 (fp16, bf16)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--small", action="store_true", help="SD-1.4's layout at widths 32-64 (a quick CPU check)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/out/fp16_meta.json")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # float32 means float32: cuDNN's convolutions run TF32 by default, which would blur the yardstick
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.small:
        memory.SD14_UNET = {**memory.SD14_UNET, "block_out_channels": (32, 64, 64, 64)}
    model, data = memory.build(args.device, "sd14", args.latent)
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.unet.state_dict().items()}
    rows = []
    for name in [v.strip() for v in args.variants.split(",")]:
        meta, sets = VARIANTS[name]
        runs = {}
        for precision in ("no", args.precision):
            model.unet.load_state_dict(initial)
            try:
                runs[precision] = one_step(model, data, meta, sets, precision, args.device)
            except Exception as error:  # noqa: BLE001  a variant that fails is a result, not the end
                runs[precision] = {"error": f"{type(error).__name__}: {error}"[:300]}
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        ref, low = runs["no"], runs[args.precision]
        row = {"variant": name, "float32": {k: v for k, v in ref.items() if k != "grads"},
               args.precision: {k: v for k, v in low.items() if k != "grads"}}
        if ref.get("grads") is not None and low.get("grads") is not None:
            row["rel_err"], row["cosine"] = compare(ref["grads"], low["grads"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "latent": args.latent, "small": args.small, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n| variant | {args.precision} vs float32: rel. error | cosine | gradient norm, float32 / {args.precision} "
          f"| sharpness ratio r, float32 / {args.precision} | {args.precision} tries (overflows + 1) | finite logs |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        low = r[args.precision]
        if "rel_err" not in r:
            print(f"| {r['variant']} | failed: {(low.get('error') or r['float32'].get('error') or 'no step')[:90]} "
                  "| | | | | |")
            continue
        ratio = [x["logs"].get("meta/forget_grad_ratio", float("nan")) for x in (r["float32"], low)]
        print(f"| {r['variant']} | {r['rel_err']:.3g} | {r['cosine']:.4f} | {r['float32']['grad_norm']:.4g} / "
              f"{low['grad_norm']:.4g} | {ratio[0]:.3g} / {ratio[1]:.3g} | {low['tries']} | {low['finite_logs']} |")


if __name__ == "__main__":
    main()
