"""Peak memory and seconds per step of unlearning at Stable Diffusion 1.4's
size on this machine: the real SD-1.4 UNet architecture (diffusers' own class,
random weights, 860M parameters) at 64x64 latents, batch 1, ESD-u with and
without first-order meta, each memory option on and off. One subprocess per
variant; the peak is the process's peak resident set (ru_maxrss) on a CPU, or
torch.cuda.max_memory_allocated on a GPU.

    .venv/bin/python bench/memory.py                    # every variant (about 25 minutes on 2 cores)
    .venv/bin/python bench/memory.py --variants esd,esd+meta --steps 1

x_t is forget latents noised to a random t (ESD's partial sampling adds
no-grad forward passes, time but no peak memory). The text encoder has SD's
width (768) and 77 tokens but one layer; the VAE is tiny (neither trains).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# name -> (meta, study overrides)
VARIANTS = {
    "esd": (False, []),
    "esd+meta functional": (True, ["meta.in_place=false"]),
    "esd+meta": (True, []),
    "esd adafactor": (False, ["method.optimizer=adafactor"]),
    "esd+meta adafactor": (True, ["method.optimizer=adafactor"]),
    "esd adafactor+ckpt": (False, ["method.optimizer=adafactor", "method.gradient_checkpointing=true"]),
    "esd+meta adafactor+ckpt": (True, ["method.optimizer=adafactor", "method.gradient_checkpointing=true"]),
}
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
PROMPTS = {"forget": ["a photo of a nude person"], "related": ["a photo of a person"],
           "unrelated": ["a photo of a dog"]}


def build(device: str):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from metaunlearn import DiffusionModel
    from metaunlearn.data import ConceptData, RoleData
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline

    small = build_pipeline(TinyPipelineConfig(image_size=64, text_width=768, text_layers=1, text_heads=12,
                                              max_length=77), ["a", "photo", "of", "nude", "person", "dog"], seed=0)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
                                   unet=UNet2DConditionModel(**SD14_UNET), scheduler=small.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    model = DiffusionModel(pipe, device=device)
    roles = [RoleData(name, torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(i)),
                      torch.zeros(4, dtype=torch.long), prompts, model.encode_prompts(prompts).to("cpu"),
                      [f"random:{i}:{j}" for j in range(4)]) for i, (name, prompts) in enumerate(PROMPTS.items())]
    return model, ConceptData(*roles, split="train")


def run_child(name: str, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from metaunlearn.config import StudyConfig
    from metaunlearn.engine import Engine, make_accelerator
    from metaunlearn.meta import make_meta
    from metaunlearn.methods import make_method, trained_params
    from metaunlearn.params import make_trainable
    from metaunlearn.unlearn import denoising_objective, preservation_data

    meta, sets = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = StudyConfig.from_dict({
        "model": {"source": "bench"}, "concepts": {r: {"prompts": p} for r, p in PROMPTS.items()},
        "method": {"name": "esd", "params": "noxattn", "lr": 1e-5, "batch_size": 1, "esd": {"x_t": "noised"}},
        "meta": {"enabled": meta, "inner_steps": 1, "low_rank": 0.0}}, sets)
    model, data = build(device)
    cfg = config.method
    trainable = make_trainable(model.unet, trained_params(cfg))
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    method = make_method(cfg, "")
    method.setup(model, trainable, data)
    objectives = {"method": method.loss,
                  "preserve": denoising_objective(model, preservation_data(data), "preserve", 1.0)}
    if meta:
        objectives["meta"] = make_meta(config.meta, model, trainable, data, method, cfg.batch_size)
    engine = Engine(model.unet, trainable, objectives, cfg, 0, make_accelerator(config.model.model_copy(
        update={"device": device})), stateful=(method,))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(steps):
        begin = time.perf_counter()
        engine.step(i)
        seconds.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": name, "device": device, "peak_gib": peak, "seconds": seconds,
            "trainable": sum(p.numel() for p in trainable.values()),
            "unet": sum(p.numel() for p in model.unet.parameters())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/out/memory.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.threads)))
        return
    rows = []
    for name in [v.strip() for v in args.variants.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--threads",
                               str(args.threads)], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]  # -9: killed, out of memory
            rows.append({"variant": name, "error": lines[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    base = next((r for r in rows if r["variant"] == "esd" and "peak_gib" in r), None)
    print("\n| variant | peak GiB | x esd | s/step | x esd |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
            continue
        s = r["seconds"][-1]
        ratio = (f"{r['peak_gib'] / base['peak_gib']:.2f}x", f"{s / base['seconds'][-1]:.2f}x") if base else \
            ("", "")
        print(f"| {r['variant']} | {r['peak_gib']:.2f} | {ratio[0]} | {s:.1f} | {ratio[1]} |")


if __name__ == "__main__":
    main()
