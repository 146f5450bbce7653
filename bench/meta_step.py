"""Cost of one optimizer step: the base method, with the meta objective (first
and second order), and the reference code's computational pattern, on the same
model, data and batch size.

Variants (each run in its own subprocess, so peak memories do not mix):

    base       ESD-u (params noxattn) + preservation term: the training engine's step
    first      base + first-order meta (M=1, sgd)
    second     base + second-order meta (M=1, sgd)
    reference  the reference code's pattern at equal settings (see `reference_step`)

    python bench/meta_step.py --world digits --steps 20 --batch 8
    python bench/meta_step.py --world tiny --steps 2            # a quick check that it runs

Per variant: wall seconds per timed step (after --warmup untimed steps; every
variant draws the same per-step randomness, so the same ESD sampling depths),
and memory over the warmup and timed steps: on CPU the process's peak resident
set (VmHWM, reset after setup; ru_maxrss where it cannot be reset), on CUDA
torch.cuda.max_memory_allocated; "step MB" is that peak minus what the model,
optimizer and data held after setup (RSS or memory_allocated). Writes --out
(JSON) and prints a table; ratios are to the base step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("base", "first", "second", "reference")
WORDS = ["a", "photo", "of", "the", "digit", "eight", "three", "one", "nine", "dog", "cat"]
# The digits study the timings stand for (as in the project's ESD trials).
DIGITS_CONCEPTS = {
    "forget": {"classes": ["eight"], "prompts": ["a photo of the digit eight", "a handwritten 8", "the number eight"]},
    "related": {"classes": ["three", "nine"], "prompts": ["a photo of the digit three", "the number three",
                                                        "a photo of the digit nine", "the number nine"]},
    "unrelated": {"classes": ["one", "four", "seven"], "prompts": ["a photo of the digit one",
                                                                 "a photo of the digit four",
                                                                 "a photo of the digit seven"]},
}
TINY_PROMPTS = {"forget": ["a photo of the digit eight", "the digit eight"], "related": ["the digit three"],
                "unrelated": ["a dog", "a cat"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", choices=["digits", "tiny"], default="digits",
                   help="digits: the cached built-in digits world and its concept data (train split);\n"
                        "tiny: a random tiny pipeline with random latents (seconds; checks the script)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--batch", type=int, default=8, help="batch size of every loss term")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:n]")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--x-t", choices=["sample", "noised"], default="sample", help="ESD's x_t (the paper: sample)")
    p.add_argument("--ddim-steps", type=int, default=20, help="ESD partial-sampling DDIM steps")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help="study config override, e.g. --set meta.inner_steps=2 (repeatable); the meta\n"
                        "objective is otherwise the package's defaults")
    p.add_argument("--ref-inner", choices=["one", "epoch"], default="one",
                   help="reference pattern's simulated attack: one AdamW step on gradients summed over the\n"
                        "whole forget split (M=1), or one AdamW step per forget batch (what the reference\n"
                        "script literally does: an epoch)")
    p.add_argument("--tiny-items", type=int, default=32, help="tiny world: items per role")
    p.add_argument("--data-cache", default="bench/out/data", help="digits world: concept data cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/meta_step.json")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        p.error("--steps, --batch and --threads must be positive, --warmup non-negative")
    return args


# --------------------------------------------------------------------- setup
def study_config(args, mode: str = "first_order"):
    from metaunlearn.config import StudyConfig

    concepts = DIGITS_CONCEPTS if args.world == "digits" else {r: {"prompts": p} for r, p in TINY_PROMPTS.items()}
    return StudyConfig.from_dict({
        "name": "bench-meta-step", "model": {"source": "digits" if args.world == "digits" else "tiny"},
        "concepts": concepts,
        "method": {"name": "esd", "params": "noxattn", "lr": 1e-4, "batch_size": args.batch, "grad_clip": 1.0,
                   "preservation_weight": 1.0,
                   "esd": {"eta": 1.0, "x_t": args.x_t, "ddim_steps": args.ddim_steps, "sample_guidance": 3.0}},
        "meta": {"enabled": True, "mode": mode},  # the defaults: what a user gets
    }, args.sets)


def digits_world_dir() -> Path:
    """The cached digits world; never built here (a build takes minutes)."""
    from metaunlearn.config import ModelConfig
    from metaunlearn.worlds import world_for

    world = world_for(ModelConfig(source="digits"))
    if not world.is_built():
        sys.exit("error: the digits world is not built; build it once with `metaunlearn world digits`")
    return world.folder()


def load_world(args, device: str):
    """(model, concept data) of the chosen world."""
    import torch

    from metaunlearn import DiffusionModel
    from metaunlearn.data import ConceptData, RoleData, prepare_concept_data

    if args.world == "digits":
        model = DiffusionModel.load(digits_world_dir(), device=device)
        data = prepare_concept_data(study_config(args), model, "train", Path(args.data_cache), progress=False,
                                    log=lambda msg: print(msg, file=sys.stderr))
        return model, data
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline

    model = DiffusionModel(build_pipeline(TinyPipelineConfig(), WORDS, seed=0), device=device)
    roles = []
    for i, (name, prompts) in enumerate(TINY_PROMPTS.items()):
        g, n = torch.Generator().manual_seed(i), args.tiny_items
        roles.append(RoleData(name, torch.randn(n, *model.latent_shape, generator=g), torch.arange(n) % len(prompts),
                              prompts, model.encode_prompts(prompts).to("cpu", torch.float32),
                              [f"random:{i}:{j}" for j in range(n)]))
    return model, ConceptData(*roles, split="train")


# --------------------------------------------------------------------- the steps
def base_terms(model, method, benign, cfg, ctx) -> dict:
    """The loss terms of a step before the meta objective (what unlearning adds up)."""
    from metaunlearn.unlearn import denoising_objective

    terms = dict(method.loss(ctx).losses)
    terms.update(denoising_objective(model, benign, "preserve", cfg.preservation_weight)(ctx).losses)
    return terms


def module_loss(model, unet, latents, cond, generator):
    """DiffusionModel.denoising_loss through another UNet module (the reference's deep copy)."""
    import torch.nn.functional as F

    latents = latents.to(model.device, model.dtype)
    noise = model.sample_noise(latents.shape, generator)
    t = model.sample_timesteps(len(latents), generator)
    pred = unet(model.add_noise(latents, noise, t), t, **cond.to(model.device, model.dtype).unet_kwargs()).sample
    return F.mse_loss(pred.float(), model.target(latents, noise, t).float())


def batches(role, size: int):
    """The whole split in order, batch by batch (the reference's DataLoader passes)."""
    import torch

    for start in range(0, len(role), size):
        yield role.batch(torch.arange(start, min(start + size, len(role))))


def reference_step(model, method, benign, data, trainable, optimizer, cfg, meta_cfg, ctx, ref_inner: str) -> float:
    """The reference code's computational pattern (PAPER.md, "The reference code"),
    at our settings (M=1, the same weights a..e, lr, clipping, batch size):

    - the student UNet never had its frozen weights' requires_grad turned off,
      so every backward computes and accumulates their gradients too (set once
      by the caller; the step's optimizer only zeroes the selected ones);
    - every step: a fresh deep copy of the UNet and two fresh AdamW optimizers on
      it (one over the selected weights, whose zero_grad separates the terms;
      one over all weights, which takes the simulated attacker step);
    - every term's gradient is a sum over the WHOLE data split, batch by batch:
      before the attack the unrelated and related splits at theta; the attack
      on the whole forget split; after it the forget, related and unrelated
      splits at theta' (the last even at weight e = 0, as the reference does);
    - the meta gradient is first order: gradients at theta' are added to theta's.

    Latents and prompt embeddings are precomputed (the reference also ran the
    VAE encoder and the text encoder on every batch): a lower bound on its cost.
    """
    import torch

    unet, lr, wd = model.unet, cfg.lr, cfg.weight_decay
    selected = set(trainable)
    unet.train()
    base = sum(base_terms(model, method, benign, cfg, ctx).values())  # kept, as the reference keeps its ESD loss

    task = copy.deepcopy(unet)
    task_selected = [p for n, p in task.named_parameters() if n in selected]
    task_opt = torch.optim.AdamW(task_selected, lr=lr, weight_decay=wd)
    task_opt_full = torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=wd)
    sums = [torch.zeros_like(p) for p in trainable.values()]

    def accumulate(role, sign: float, weight: float) -> None:
        for latents, cond in batches(role, cfg.batch_size):
            module_loss(model, task, latents, cond, ctx.generator).backward()
        for s, p in zip(sums, task_selected):
            s.add_(p.grad, alpha=sign * weight)
        task_opt.zero_grad()  # the selected weights only: the copy's other weights keep accumulating

    accumulate(data.unrelated, +1, meta_cfg.unrelated_before)
    accumulate(data.related, +1, meta_cfg.related_before)
    base.backward()
    for latents, cond in batches(data.forget, cfg.batch_size):  # the simulated attack on the copy
        module_loss(model, task, latents, cond, ctx.generator).backward()
        if ref_inner == "epoch":
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
            task_opt_full.step()
            task_opt_full.zero_grad()
    if ref_inner == "one":
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
        task_opt_full.step()
    task_opt_full.zero_grad()
    accumulate(data.forget, -1, meta_cfg.forget_after)
    accumulate(data.related, -1, meta_cfg.related_after)
    accumulate(data.unrelated, -1, meta_cfg.unrelated_after)

    for p, s in zip(trainable.values(), sums):
        p.grad.add_(s)
    torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the selected weights only, as in the reference
    method.after_step()
    unet.eval()
    task = task_opt = task_opt_full = None  # freed (a del would leave the closure above a dangling name)
    return base.item()


# --------------------------------------------------------------------- memory
def _hwm_kb() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _rss_kb() -> int | None:
    try:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def reset_cpu_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0), so the peak is that of the timed steps."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_peak_kb(reset: bool) -> tuple[int, str]:
    import resource

    hwm = _hwm_kb()
    if reset and hwm is not None:
        return hwm, "VmHWM, reset after setup"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (whole process)"


# --------------------------------------------------------------------- one variant
def run_variant(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from metaunlearn.engine import make_accelerator
    from metaunlearn.methods import make_method
    from metaunlearn.unlearn import preservation_data, training_engine

    variant = args.child
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    model, data = load_world(args, device)
    config = study_config(args, "second_order" if variant == "second" else "first_order")
    with_meta = variant in ("first", "second")
    config = config.model_copy(update={"meta": config.meta.model_copy(update={"enabled": with_meta})})
    cfg = config.method
    method = make_method(cfg, config.concepts.guide)
    # the training engine's own step (what `metaunlearn unlearn` runs), on the bench's device
    engine = training_engine(config, model, data, method,
                             make_accelerator(config.model.model_copy(update={"device": device})), args.seed)
    trainable, benign = engine.params, preservation_data(data)
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if variant == "reference":
        model.unet.requires_grad_(True)  # the reference never froze the untrained weights

    def step(i: int) -> float:
        if variant == "reference":
            ctx = engine.context(i)
            return reference_step(model, method, benign, data, trainable, optimizer, cfg, config.meta, ctx,
                                  args.ref_inner)
        return engine.step(i).loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Memory: the peak over the warmup and timed steps, and what it adds to the
    # model + optimizer + data resident after setup ("step MB").
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        setup_mb = torch.cuda.memory_allocated() / 2**20
    else:
        reset = reset_cpu_peak()
        setup_mb = (_rss_kb() or 0) / 1024
    for i in range(args.warmup):
        step(i)
    seconds, losses = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        sync()
        begin = time.perf_counter()
        losses.append(step(i))
        sync()
        seconds.append(time.perf_counter() - begin)
    if cuda:
        peak_mb, how = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    else:
        kb, how = cpu_peak_kb(reset)
        peak_mb = kb / 1024
    frozen_with_grad = sum(1 for n, p in model.unet.named_parameters() if n not in trainable and p.grad is not None)
    return {"variant": variant, "device": device, "seconds": seconds, "mean_s": statistics.mean(seconds),
            "median_s": statistics.median(seconds), "min_s": min(seconds), "peak_mb": peak_mb,
            "setup_mb": setup_mb, "extra_mb": max(0.0, peak_mb - setup_mb), "memory": how,
            "losses": losses, "frozen_params_with_grad": frozen_with_grad,
            "trainable_params": sum(p.numel() for p in trainable.values()),
            "unet_params": sum(p.numel() for p in model.unet.parameters()),
            "data": {r: len(getattr(data, r)) for r in ("forget", "related", "unrelated")}}


# --------------------------------------------------------------------- driver
def child_command(args, variant: str) -> list[str]:
    flags = ["--world", args.world, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
             str(args.batch), "--threads", str(args.threads), "--device", args.device, "--x-t", args.x_t,
             "--ddim-steps", str(args.ddim_steps), *[f"--set={x}" for x in args.sets], "--ref-inner", args.ref_inner,
             "--tiny-items", str(args.tiny_items), "--data-cache", args.data_cache, "--seed", str(args.seed),
             "--out", args.out, "--child", variant]
    return [sys.executable, str(Path(__file__).resolve()), *flags]


def machine(args) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results: dict[str, dict]) -> str:
    base = results.get("base")
    head = f"{'variant':<10} {'s/step':>9} {'median':>9} {'x base':>7} {'peak MB':>9} {'x base':>7} " \
           f"{'step MB':>9} {'x base':>7}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        def ratio(key):
            return f"{r[key] / base[key]:7.2f}" if base and base[key] > 0 else f"{'-':>7}"

        lines.append(f"{name:<10} {r['mean_s']:9.4f} {r['median_s']:9.4f} {ratio('mean_s')} {r['peak_mb']:9.1f} "
                     f"{ratio('peak_mb')} {r['extra_mb']:9.1f} {ratio('extra_mb')}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    if args.world == "digits":  # make the concept data once, outside the timed children
        import torch

        torch.set_num_threads(args.threads)
        load_world(args, "cpu")
    results = {}
    for variant in args.variants:
        print(f"[{variant}] {args.warmup} warmup + {args.steps} timed steps ...", file=sys.stderr, flush=True)
        proc = subprocess.run(child_command(args, variant), stdout=subprocess.PIPE, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            sys.exit(f"error: variant '{variant}' failed (exit code {proc.returncode})")
        results[variant] = json.loads(found[-1][len("RESULT "):])
    base = results.get("base")
    for r in results.values():
        r["ratio_time"] = r["mean_s"] / base["mean_s"] if base else None
        r["ratio_peak"] = r["peak_mb"] / base["peak_mb"] if base else None
        r["ratio_extra"] = r["extra_mb"] / base["extra_mb"] if base and base["extra_mb"] > 0 else None
    settings = {k: v for k, v in vars(args).items() if k not in ("child",)}
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(args), "settings": settings, "variants": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    first = next(iter(results.values()))
    print(f"world {args.world}: data {first['data']}, batch {args.batch}, device {first['device']}, "
          f"{args.threads} threads; UNet {first['unet_params']:,} params, {first['trainable_params']:,} trained; "
          f"memory: {first['memory']}")
    print(table(results))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
