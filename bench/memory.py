"""Peak memory and seconds per step of unlearning at full model size on this
machine: the real SD-1.4 UNet architecture (diffusers' own class, random
weights, 860M parameters) or SDXL's (2.6B), ESD (ESD-u on SD-1.4, ESD-x on
SDXL) with and without first-order meta, each memory option on and off. One
subprocess per variant; the peak is the process's peak resident set
(ru_maxrss) on a CPU, or torch.cuda.max_memory_allocated on a GPU.

    .venv/bin/python bench/memory.py                    # every variant (about 40 minutes on 2 cores)
    .venv/bin/python bench/memory.py --variants esd,esd+meta --steps 1
    .venv/bin/python bench/memory.py --arch sdxl --latent 64 --variants "esd adafactor+ckpt,esd+meta adafactor+ckpt"

x_t is forget latents noised to a random t (ESD's partial sampling adds
no-grad forward passes, time but no peak memory). The text encoders have the
model's widths and 77 tokens but one layer; the VAE is tiny (neither trains).
`--latent` sets the latents' side (SD-1.4 trains at 64, SDXL at 128): where a
whole step at full resolution does not fit or takes too long, the static state
is measured at full size and the activations at a smaller side ("by parts").
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
    # the sharpness penalty acts at every step (cap 0): its finite-difference passes are in the peak
    "esd+meta adafactor+ckpt sharpness": (True, ["method.optimizer=adafactor", "method.gradient_checkpointing=true",
                                                 "meta.sharpness_cap=0"]),
    "esd ckpt": (False, ["method.gradient_checkpointing=true"]),
    "esd+meta ckpt": (True, ["method.gradient_checkpointing=true"]),
    # AdamW, checkpointing and the frozen teacher in bfloat16: configs/sd14-nudity.yaml's choice
    "esd ckpt+bf16 teacher": (False, ["method.gradient_checkpointing=true", "method.frozen_dtype=bfloat16"]),
    "esd+meta ckpt+bf16 teacher": (True, ["method.gradient_checkpointing=true", "method.frozen_dtype=bfloat16"]),
    # + the frozen teacher in bfloat16, cast up layer by layer
    "esd adafactor+ckpt+bf16 teacher": (False, ["method.optimizer=adafactor", "method.gradient_checkpointing=true",
                                               "method.frozen_dtype=bfloat16"]),
    "esd+meta adafactor+ckpt+bf16 teacher": (True, ["method.optimizer=adafactor",
                                                    "method.gradient_checkpointing=true",
                                                    "method.frozen_dtype=bfloat16"]),
    # + bf16 autocast (float32 master weights)
    "esd ckpt+bf16 teacher+autocast": (False, ["method.gradient_checkpointing=true", "method.frozen_dtype=bfloat16",
                                              "model.mixed_precision=bf16"]),
    "esd+meta ckpt+bf16 teacher+autocast": (True, ["method.gradient_checkpointing=true",
                                                   "method.frozen_dtype=bfloat16", "model.mixed_precision=bf16"]),
    # + fp16 autocast and its loss scaler: configs/sd14-nudity.yaml as it runs (a GPU's; a CPU has no fp16 gain)
    "esd ckpt+bf16 teacher+fp16": (False, ["method.gradient_checkpointing=true", "method.frozen_dtype=bfloat16",
                                          "model.mixed_precision=fp16"]),
    "esd+meta ckpt+bf16 teacher+fp16": (True, ["method.gradient_checkpointing=true", "method.frozen_dtype=bfloat16",
                                               "model.mixed_precision=fp16"]),
}
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
PROMPTS = {"forget": ["a photo of a nude person"], "related": ["a photo of a person"],
           "unrelated": ["a photo of a dog"]}
WORDS = ["a", "photo", "of", "nude", "person", "dog"]
ESD_PARAMS = {"sd14": "noxattn", "sdxl": "xattn"}  # ESD-u on SD-1.4 (the paper's nudity setting), ESD-x on SDXL


def build(device: str, arch: str, latent: int):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from metaunlearn import DiffusionModel
    from metaunlearn.data import ConceptData, RoleData
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline, build_sdxl_pipeline

    text = TinyPipelineConfig(image_size=64, text_width=768, text_layers=1, text_heads=12, max_length=77)
    if arch == "sdxl":  # SDXL's encoder widths (768 + 1280 = 2048), pooled 1280, time ids of 256
        text.text_heads = 8  # divides both widths
        small = build_sdxl_pipeline(text, WORDS, seed=0, time_embed_dim=256, width_2=1280)
        torch.manual_seed(0)
        pipe = StableDiffusionXLPipeline(
            vae=small.vae, text_encoder=small.text_encoder, text_encoder_2=small.text_encoder_2,
            tokenizer=small.tokenizer, tokenizer_2=small.tokenizer_2, unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=small.scheduler, force_zeros_for_empty_prompt=True)
    else:
        small = build_pipeline(text, WORDS, seed=0)
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
                                       unet=UNet2DConditionModel(**SD14_UNET), scheduler=small.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    model = DiffusionModel(pipe, device=device)
    roles = [RoleData(name, torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(i)),
                      torch.zeros(4, dtype=torch.long), prompts, model.encode_prompts(prompts).to("cpu"),
                      [f"random:{i}:{j}" for j in range(4)]) for i, (name, prompts) in enumerate(PROMPTS.items())]
    return model, ConceptData(*roles, split="train")


def run_child(name: str, steps: int, threads: int, arch: str, latent: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from metaunlearn.config import StudyConfig
    from metaunlearn.engine import make_accelerator
    from metaunlearn.methods import make_method
    from metaunlearn.unlearn import training_engine

    meta, sets = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = StudyConfig.from_dict({
        "model": {"source": "bench"}, "concepts": {r: {"prompts": p} for r, p in PROMPTS.items()},
        "method": {"name": "esd", "params": ESD_PARAMS[arch], "lr": 1e-5, "batch_size": 1, "esd": {"x_t": "noised"}},
        "meta": {"enabled": meta, "inner_steps": 1, "low_rank": 0.0}}, sets)
    model, data = build(device, arch, latent)
    engine = training_engine(config, model, data, make_method(config.method, ""),
                             make_accelerator(config.model.model_copy(update={"device": device})), 0)
    trainable = engine.params
    # before any step: the weights, the frozen copies, the meta objective's buffers (its restore
    # buffer is made at its first step), the data: the static part of the peak when measured by parts
    setup = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(steps):
        begin = time.perf_counter()
        engine.step(i)
        seconds.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": name, "arch": arch, "latent": latent, "device": device, "setup_gib": setup, "peak_gib": peak,
            "seconds": seconds,
            "trainable": sum(p.numel() for p in trainable.values()),
            "unet": sum(p.numel() for p in model.unet.parameters())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch", choices=sorted(ESD_PARAMS), default="sd14")
    p.add_argument("--latent", type=int, default=0, help="latent side (default: the model's, 64 or 128)")
    p.add_argument("--out", default="bench/out/memory.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.latent = args.latent or (128 if args.arch == "sdxl" else 64)
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.threads, args.arch, args.latent)))
        return
    rows = []
    for name in [v.strip() for v in args.variants.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--threads",
                               str(args.threads), "--arch", args.arch, "--latent", str(args.latent)],
                              capture_output=True, text=True)
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
