"""The training loop shared by every loss-based unlearning method (and, with
`method: none`, by a meta-only stage).

Per step: the method's loss terms + a preservation term (denoising loss on
related + unrelated data, so erasing one concept does not damage the others)
+ extra objectives such as the meta objective; AdamW with clipping and an lr
schedule through accelerate. Every step draws its randomness from a generator
seeded by (seed, step), so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import StudyConfig, dump_config
from .data import ConceptData, RoleData
from .errors import MetaunlearnError
from .methods import StepContext, make_method
from .model import DiffusionModel
from .params import make_trainable
from .runfiles import JsonlLog, atomic_write_json, read_json, save_model_atomic

# An extra objective gets the step context and returns named values: tensors are
# loss terms added to the loss, plain floats are logged only.
Objective = Callable[[StepContext], dict[str, "torch.Tensor | float"]]


class TrainingError(MetaunlearnError):
    """A run that cannot go on (e.g. a NaN loss); its last good checkpoint is kept."""


NOTHING_TO_TRAIN = "nothing to train: method 'none' needs the meta objective (meta.enabled: true)"


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + process)


def make_accelerator(config: StudyConfig):
    from accelerate import Accelerator

    device = config.model.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))  # a single-process run on a chosen GPU
    return Accelerator(mixed_precision=config.model.mixed_precision, cpu=cpu)


def preservation_data(data: ConceptData) -> RoleData | None:
    parts = [r for r in (data.related, data.unrelated) if r is not None and len(r)]
    return RoleData.concat(parts, role="benign") if parts else None


def unlearn(config: StudyConfig, model: DiffusionModel, data: ConceptData, out_dir: Path, seed: int,
            objectives: dict[str, Objective] | None = None, fingerprint: str = "",
            progress: bool = True) -> Path:
    """Train into `out_dir` (checkpoints/, log.jsonl, config.yaml, run.json) and
    return `out_dir/model`, a folder stock diffusers loads. Resumes from the last
    checkpoint of an interrupted run with the same fingerprint; returns at once
    when a finished run with the same fingerprint is there."""
    out_dir = Path(out_dir)
    cfg = config.method
    if cfg.name == "none" and not objectives and not config.meta.enabled:  # else preservation alone would train and pass for a result
        raise TrainingError(NOTHING_TO_TRAIN)
    fingerprint = fingerprint or f"{config.fingerprint('model', 'concepts', 'data', 'method', 'meta')}-{seed}"
    status = read_json(out_dir / "run.json")
    if status.get("fingerprint") == fingerprint and status.get("status") == "done":
        return out_dir / "model"
    ckpt_dir = out_dir / "checkpoints"
    if status.get("fingerprint") not in (None, fingerprint):
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)  # checkpoints of other inputs would resume the wrong run
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, out_dir / "config.yaml")
    atomic_write_json(out_dir / "run.json", {"fingerprint": fingerprint, "seed": seed, "status": "running"})

    accelerator = make_accelerator(config)
    model.to(accelerator.device)
    trainable = make_trainable(model.unet, cfg.params)
    method = make_method(cfg, config.concepts.guide)
    method.setup(model, trainable, data)
    objectives = dict(objectives or {})
    if config.meta.enabled:
        from .meta import make_meta

        objectives["meta"] = make_meta(config.meta, model, trainable, data, method, cfg.batch_size)
    benign = preservation_data(data) if cfg.preservation_weight > 0 else None
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    start = 0
    checkpoint = latest_checkpoint(ckpt_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["params"][name])
        optimizer.load_state_dict(state["training_state"]["optimizer"])
        scheduler.load_state_dict(state["training_state"]["scheduler"])
        method.load_state_dict(state["extra"])
        start = state["step"]
    log = JsonlLog(out_dir / "log.jsonl", keep_until_step=start)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"unlearn ({cfg.name})",
               disable=not progress or not accelerator.is_main_process, leave=False)
    last_good = checkpoint.name if checkpoint else "none (the run had not checkpointed yet)"
    for step in bar:
        begin = time.perf_counter()
        ctx = StepContext(step, step_generator(seed, step, accelerator.process_index), cfg.batch_size)
        model.unet.train()
        with accelerator.autocast():
            terms = dict(method.loss(ctx))
            if benign is not None:
                latents, cond = benign.sample(cfg.batch_size, ctx.generator)
                terms["preserve"] = cfg.preservation_weight * model.denoising_loss(latents, cond,
                                                                                   generator=ctx.generator)
            logs: dict[str, float] = {}
            for objective in objectives.values():
                for key, value in objective(ctx).items():
                    (terms if torch.is_tensor(value) else logs)[key] = value
        if not terms:
            raise TrainingError(NOTHING_TO_TRAIN)
        total = sum(terms.values())
        if not math.isfinite(total.item()):
            raise TrainingError(f"the loss became {total.item()} at step {step + 1} ({_fmt(terms)}); last good "
                                f"checkpoint: {last_good}; lower method.lr or raise method.grad_clip's strictness")
        accelerator.backward(total)
        if accelerator.num_processes > 1:  # the UNet is not DDP-wrapped (functional calls): average by hand
            for param in trainable.values():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, "mean")
        grad_norm = (accelerator.clip_grad_norm_(trainable.values(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.tensor(float("nan")))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step()
        model.unet.eval()

        done = step + 1
        if accelerator.is_main_process:
            if done % cfg.log_every == 0 or done == cfg.steps:
                log.write({"step": done, "loss": total.item(), **{k: v.item() for k, v in terms.items()}, **logs,
                           "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                           "seconds": round(time.perf_counter() - begin, 4)})
            bar.set_postfix(loss=f"{total.item():.4f}", refresh=False)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                last_good = save_checkpoint(ckpt_dir, done, trainable, training_state, method.state_dict()).name
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for param in trainable.values():
            param.requires_grad_(False)
        save_model_atomic(model, out_dir / "model")
        atomic_write_json(out_dir / "run.json", {"fingerprint": fingerprint, "seed": seed, "status": "done",
                                                 "steps": cfg.steps})
    return out_dir / "model"


def _fmt(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
