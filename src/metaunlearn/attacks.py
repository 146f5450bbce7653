"""Relearning attacks: what an adversary runs on a released model.

Each attack finetunes the UNet with the plain denoising loss on the attacker's
held-out images (never seen by unlearning or the meta objective): of the
forget concept (relearning), or of unrelated concepts only (benign, the
paper's CLEAN setting). Full finetuning trains every UNet weight; LoRA trains a
peft adapter only. The model is evaluated in process at the requested steps,
instead of saving a full copy per step (3.4 GB each at SD scale), and the
attack writes its relearning curve (JSON + PNG) to its folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import AttackConfig, StudyConfig
from .data import ConceptData, RoleData
from .errors import MetaunlearnError
from .evaluation.concept_rates import evaluate_concepts, evaluation_roles, forget_concepts
from .evaluation.detectors import Detector
from .model import DiffusionModel
from .params import make_trainable
from .plots import plot_curves, save_samples
from .runfiles import atomic_write_json, read_json
from .train import make_accelerator, step_generator

ATTACK_SEED_SPACE = 1_000_000  # attack randomness never replays an unlearning run's


def attacker_data(data: ConceptData, attack: AttackConfig) -> RoleData:
    """The attacker's images: the `attack` split of the forget role, or for a
    benign finetune that of the unrelated role (clean data)."""
    if data.split != "attack":
        raise MetaunlearnError(f"attacks use the held-out 'attack' split, got '{data.split}'")
    role = data.forget if attack.data == "forget" else data.unrelated
    if role is None or len(role) == 0:
        which = "concepts.forget" if attack.data == "forget" else "concepts.unrelated"
        raise MetaunlearnError(f"attack '{attack.name}' needs {which} data in the attack split, and there is none")
    return role


def _trainable(model: DiffusionModel, attack: AttackConfig) -> dict[str, torch.nn.Parameter]:
    if attack.kind == "full":
        return make_trainable(model.unet, "full")
    from peft import LoraConfig

    model.unet.requires_grad_(False)
    try:
        model.unet.add_adapter(LoraConfig(r=attack.lora_rank, lora_alpha=attack.lora_alpha,
                                          init_lora_weights="gaussian", target_modules=list(attack.lora_targets)))
    except ValueError as err:
        raise MetaunlearnError(f"attack '{attack.name}': bad lora_targets {attack.lora_targets}: {err}") from None
    params = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
    if not params:
        raise MetaunlearnError(f"attack '{attack.name}': lora_targets {attack.lora_targets} match no UNet module")
    return params


def run_attack(config: StudyConfig, attack: AttackConfig, model: DiffusionModel, data: ConceptData,
               detector: Detector, seed: int, label: str, progress: bool = True,
               sample_dir: Path | None = None) -> dict:
    """Finetune `model` in place as the attacker would and return its curve:
    concept rates at every step of `attack.eval_at` (0 = before the attack).
    With `sample_dir`, the samples of the first and last evaluation go there as
    samples-step<N>.png (the report's before/after grids, at no extra sampling)."""
    from tqdm.auto import tqdm

    images = attacker_data(data, attack)
    accelerator = make_accelerator(config)
    model.to(accelerator.device)
    trainable = _trainable(model, attack)
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable.values(), lr=attack.lr, weight_decay=1e-2))
    roles, forget = evaluation_roles(config), forget_concepts(config)
    points, losses = [], []
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        model.unet.eval()
        keep = sample_dir is not None and step in (attack.eval_at[0], attack.eval_at[-1])
        rates = evaluate_concepts(model, detector, roles, forget, config.evaluation, progress=False,
                                  return_images=keep)
        if keep:
            rates, samples, _ = rates
            save_samples(samples, config.evaluation.samples_per_prompt, Path(sample_dir) / f"samples-step{step}.png")
        points.append({"step": step, "forget_rate": rates["forget_rate"],
                       "related_accuracy": rates["related_accuracy"],
                       "unrelated_accuracy": rates["unrelated_accuracy"],
                       "loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                       "seconds": round(time.perf_counter() - start, 2)})

    bar = tqdm(range(attack.steps), desc=f"attack {attack.name} ({label}, seed {seed})", leave=False,
               disable=not progress)
    for step in bar:
        if step in attack.eval_at:
            evaluate(step)
        gen = step_generator(ATTACK_SEED_SPACE + seed, step)
        latents, cond = images.sample(attack.batch_size, gen)
        model.unet.train()
        with accelerator.autocast():
            loss = model.denoising_loss(latents, cond, generator=gen)
        if not torch.isfinite(loss):
            raise MetaunlearnError(f"attack '{attack.name}' diverged (loss {loss.item()}) at step {step}; "
                                   f"lower its lr ({attack.lr})")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    if attack.steps in attack.eval_at:
        evaluate(attack.steps)
    bar.close()
    model.unet.eval().requires_grad_(False)
    return {"attack": attack.model_dump(mode="json"), "seed": seed, "model": label, "points": points,
            "trainable_parameters": sum(p.numel() for p in trainable.values()),
            "seconds": round(time.perf_counter() - start, 2)}


def attack_dir(config: StudyConfig, label: str, attack: AttackConfig, seed: int) -> Path:
    return config.run_dir() / "attacks" / label / f"{attack.name}-seed{seed}"


def attack_and_save(config: StudyConfig, attack: AttackConfig, load: Callable[[], DiffusionModel],
                    data: ConceptData, detector: Detector, seed: int, label: str, fingerprint: str,
                    progress: bool = True) -> dict:
    """Run one attack into its folder (curve.json, curve.png), or return the
    finished curve when the same attack on the same model already ran."""
    out = attack_dir(config, label, attack, seed)
    done = read_json(out / "curve.json")
    if done.get("fingerprint") == fingerprint:
        return done
    model = load()  # a fresh copy of the released weights for every attack
    curve = run_attack(config, attack, model, data, detector, seed, label, progress, sample_dir=out)
    curve["fingerprint"] = fingerprint
    if attack.save_final:
        _save_final(model, attack, out)
    atomic_write_json(out / "curve.json", curve)
    plot_curves([curve], out / "curve.png", title=f"{attack.name} on {label} (seed {seed})")
    return curve


def _save_final(model: DiffusionModel, attack: AttackConfig, out: Path) -> None:
    if attack.kind == "lora":
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(out / "lora", unet_lora_layers=get_peft_model_state_dict(model.unet))
    else:
        from .runfiles import save_model_atomic

        save_model_atomic(model, out / "model")
