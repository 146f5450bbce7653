"""How accurate the sharpness penalty's finite-difference Hessian-vector product is at each precision.

The meta objective's sharpness term needs H v (v: the forget gradient's direction) and takes it as
(g(theta + eps v) - g(theta)) / eps with eps = fd_step x ||theta|| (meta.fd_step, 1e-4, relative to the
weights). Under bf16 autocast or TF32 the weights enter the matrix units rounded to 8 or 11 significant
bits, far coarser than a relative step of 1e-4, so the difference of two gradients may be rounding noise.
This script measures it: for each precision and step, the relative error ||Hv_fd - Hv|| / ||Hv|| and the
cosine to the reference, a central difference in float64 (its agreement with a float64 double backward is
printed for the small models).

    .venv/bin/python bench/fd_check.py                              # the digits world's UNet, CPU
    python bench/fd_check.py --model sd14 --latent 32 --device cuda # SD-1.4's architecture, random weights
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

PRECISIONS = {  # name -> (autocast dtype or None, TF32 in matmuls and convolutions)
    "fp32": (None, False),
    "tf32": (None, True),
    "bf16": ("bfloat16", False),
    "fp16": ("float16", False),
}
STEPS = (1e-5, 1e-4, 1e-3, 1e-2)


def build(args):
    """(unet, x_t, t, encoder kwargs, target) with everything on the device in float32."""
    import torch

    from metaunlearn import DiffusionModel

    if args.model == "digits":
        sys.path.insert(0, str(Path(__file__).parent))
        from meta_step import digits_world_dir

        model = DiffusionModel.load(digits_world_dir(), device=args.device)
    else:
        from memory import build as build_full

        model, _ = build_full(args.device, args.model, args.latent)
    gen = torch.Generator().manual_seed(0)
    side = model.latent_shape[1] if args.model == "digits" else args.latent
    shape = (args.batch, model.latent_shape[0], side, side)
    latents = torch.randn(shape, generator=gen).to(args.device)
    noise = torch.randn(shape, generator=gen).to(args.device)
    t = model.sample_timesteps(args.batch, gen)
    cond = model.encode_prompts(["a photo of a dog"] * args.batch).to(args.device, torch.float32)
    return model, model.add_noise(latents, noise, t), t, cond.unet_kwargs(), model.target(latents, noise, t)


def precision(device: str, name: str):
    import torch

    dtype, tf32 = PRECISIONS[name]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))


def gradient(unet, params, x_t, t, kwargs, target, ctx, create_graph=False):
    import torch
    import torch.nn.functional as F

    with ctx:
        pred = unet(x_t.to(params[0].dtype), t, **{k: _cast(v, params[0].dtype) for k, v in kwargs.items()}).sample
    loss = F.mse_loss(pred.float(), target.float()) if params[0].dtype != torch.float64 else \
        F.mse_loss(pred, target.double())
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def _cast(value, dtype):
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextlib.contextmanager
def shifted(params, v, eps):
    import torch

    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d.to(p.dtype), alpha=eps)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(d.to(p.dtype), alpha=eps)


def norm(tensors) -> float:
    return sum((x.detach().double() ** 2).sum().item() for x in tensors) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["digits", "sd14"], default="digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=32, help="latent side of the full-size models")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precisions", default="fp32,tf32,bf16,fp16")
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/out/fd_check.json")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    model, x_t, t, kwargs, target = build(args)
    unet = model.unet
    unet.set_attn_processor(__import__("diffusers.models.attention_processor",
                                       fromlist=["AttnProcessor"]).AttnProcessor())  # a double backward below
    params = [q for q in unet.parameters()]
    for q in params:
        q.requires_grad_(True)
    theta_norm = norm(params)

    # the reference, float64: H v by central differences (and, on small models, a double backward)
    unet.double()
    ref_ctx = contextlib.nullcontext()
    g64 = gradient(unet, params, x_t, t, kwargs, target, ref_ctx)
    g_norm = norm(g64)
    v = [g.div_(g_norm) for g in g64]  # a unit direction, the same for every precision
    eps = 1e-5 * theta_norm
    with shifted(params, v, eps):
        hv = list(gradient(unet, params, x_t, t, kwargs, target, ref_ctx))
    with shifted(params, v, -eps):
        for h, m in zip(hv, gradient(unet, params, x_t, t, kwargs, target, ref_ctx)):
            h.sub_(m).div_(2 * eps)
    check = None
    if args.model == "digits":
        g = gradient(unet, params, x_t, t, kwargs, target, ref_ctx, create_graph=True)
        exact = torch.autograd.grad(sum((a * b.detach()).sum() for a, b in zip(g, v)), params)
        check = norm([e - h for e, h in zip(exact, hv)]) / norm(exact)
        del g, exact
    unet.float()
    v = [d.float() for d in v]
    hv_norm = norm(hv)
    rows = []
    for name in args.precisions.split(","):
        ctx = precision(args.device, name)
        g0 = gradient(unet, params, x_t, t, kwargs, target, ctx)
        repeat = norm([a - b for a, b in zip(gradient(unet, params, x_t, t, kwargs, target, ctx), g0)]) / norm(g0)
        for step in map(float, args.steps.split(",")):
            eps = step * theta_norm
            with shifted(params, v, eps):
                g1 = gradient(unet, params, x_t, t, kwargs, target, ctx)
            # ||fd - hv||^2 and <fd, hv> tensor by tensor: no whole-model vector is ever built
            err2 = dot = fd2 = 0.0
            for a, b, h in zip(g1, g0, hv):
                fd = (a.double() - b.double()) / eps
                err2 += ((fd - h) ** 2).sum().item()
                dot += (fd * h).sum().item()
                fd2 += (fd ** 2).sum().item()
            del g1
            rows.append({"precision": name, "step": step, "rel_err": err2 ** 0.5 / hv_norm,
                         "cosine": dot / max(fd2 ** 0.5 * hv_norm, 1e-300), "repeat_diff": repeat})
            print(json.dumps(rows[-1]), flush=True)
        del g0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report = {"model": args.model, "device": str(torch.cuda.get_device_name() if "cuda" in args.device
                                                 else "cpu"), "torch": torch.__version__,
              "latent": list(x_t.shape), "params": sum(q.numel() for q in params), "theta_norm": theta_norm,
              "hv_norm": hv_norm, "reference_vs_double_backward": check, "rows": rows,
              "seconds": time.perf_counter() - begin}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{args.model} on {report['device']}, x_t {report['latent']}, {report['params'] / 1e6:.1f}M params; "
          f"reference: float64 central difference"
          + (f" (vs float64 double backward: {check:.1e})" if check is not None else ""))
    steps = sorted({r["step"] for r in rows})
    print("| precision | " + " | ".join(f"step {s:g}" for s in steps) + " | gradient repeat |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name in dict.fromkeys(r["precision"] for r in rows):
        cells = {r["step"]: r for r in rows if r["precision"] == name}
        print(f"| {name} | " + " | ".join(f"{cells[s]['rel_err']:.2g} (cos {cells[s]['cosine']:.3f})" for s in steps)
              + f" | {cells[steps[0]]['repeat_diff']:.1e} |")


if __name__ == "__main__":
    main()
