"""Relearning attacks: what an adversary runs on a released model.

An attack kind is a plugin (`ATTACKS`): an `Attack` subclass that says which
weights the attacker trains and how its result is saved; the finetuning
itself runs on the shared engine with the attack's optimizer settings and the
plain denoising loss on the attacker's held-out images (the `attack` split,
never seen by unlearning or the meta objective): of the forget concept
(relearning), or of a benign role (the paper's CLEAN setting). The model is
evaluated in process at the requested steps, instead of saving a full copy per
step (3.4 GB each at SD scale), and the attack returns its curve.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import MAX_SEED, AttackConfig, StudyConfig
from ..data import ConceptData, RoleData
from ..engine import Engine, Objective, make_accelerator
from ..layout import write_bytes
from ..errors import MetaunlearnError
from ..metrics import Evaluator
from ..model import DiffusionModel
from ..plots import save_samples
from ..registry import ATTACKS, Options

# Attack s draws from engine seed ATTACK_SEED_SPACE + s: past every unlearning seed, so it never replays an
# unlearning run's draws
ATTACK_SEED_SPACE = MAX_SEED + 1  # 1,000,000, as before the seeds' range was tied to it


class Attack:
    """One attack kind. Built as `cls(config)`; `self.options` holds its own settings."""

    def __init__(self, config: AttackConfig):
        self.config = config
        self.options: Options = config.options()

    def trainable(self, model: DiffusionModel) -> dict[str, torch.nn.Parameter]:
        """The tensors the attacker trains (made trainable here; new ones, such as an
        adapter, are initialised from torch's global generator, seeded by the caller)."""
        raise NotImplementedError

    def objectives(self, model: DiffusionModel, images: RoleData) -> dict[str, Objective]:
        """What the attacker minimises: the denoising loss on its images."""
        from ..unlearn import denoising_objective

        return {"attack": denoising_objective(model, images, "denoise")}

    def save(self, model: DiffusionModel, out: Path) -> None:
        """Save the attacked weights into `out` (with `save_final`)."""
        raise NotImplementedError


def make_attack(config: AttackConfig) -> Attack:
    return ATTACKS.get(config.kind, f"attack '{config.name}' kind").impl(config)


def attacker_data(data: ConceptData, attack: AttackConfig) -> RoleData:
    """The attacker's images when `attack.data` names a role: that role's `attack` split."""
    if not isinstance(attack.data, str):
        raise MetaunlearnError(f"attack '{attack.name}' brings its own data: prepare it with stages.attack_images")
    if data.split != "attack":
        raise MetaunlearnError(f"attacks use the held-out 'attack' split, got '{data.split}'")
    role = getattr(data, attack.data)
    if role is None or len(role) == 0:
        raise MetaunlearnError(f"attack '{attack.name}' needs concepts.{attack.data} data in the attack split, "
                               "and there is none")
    return role


def run_attack(config: StudyConfig, attack: AttackConfig, model: DiffusionModel, images: RoleData,
               evaluator: Evaluator, seed: int, label: str, progress: bool = True,
               sample_dir: Path | None = None, before: tuple[dict, Path] | None = None) -> dict:
    """Finetune `model` in place on the attacker's `images` and return its curve: the
    metric values at every step of `attack.eval_at` (0 = before the attack). With
    `sample_dir`, the samples of the first and last evaluation go there as
    samples-step<N>.png (the report's before/after grids, at no extra sampling).
    `before`: the released model's evaluation (results, sample grid) made with the same
    settings, taken as step 0 instead of sampling the same model with the same seeds again."""
    kind = make_attack(attack)
    accelerator = make_accelerator(config.model)
    model.to(accelerator.device)
    # an adapter's initial weights follow the attack seed, and nothing else's draws do: manual_seed seeds
    # every generator (peft draws on the CPU, others may draw on the GPU), and the fork puts them all back
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(ATTACK_SEED_SPACE + seed)
        trainable = kind.trainable(model)
    engine = Engine(model.unet, trainable, kind.objectives(model, images), attack,
                    ATTACK_SEED_SPACE + seed, accelerator, hint=f"attack '{attack.name}' diverged; lower its lr "
                                                                  f"({attack.lr:g})")
    points: list[dict] = []
    start = time.perf_counter()

    def evaluate(done: int) -> None:
        if done not in attack.eval_at:
            return
        grid = Path(sample_dir) / f"samples-step{done}.png" if sample_dir is not None else None
        if done == 0 and before is not None:
            results = before[0]
            if grid is not None:
                write_bytes(grid, before[1].read_bytes())
        else:
            results, samples = evaluator.evaluate(model, progress=False)
            if grid is not None and done in (attack.eval_at[0], attack.eval_at[-1]):
                save_samples(samples.images, samples.per_prompt, grid)
        recent = engine.losses[-10:]
        points.append({"step": done, "values": results["values"],
                       "loss": sum(recent) / len(recent) if recent else None,
                       "seconds": round(time.perf_counter() - start, 2)})

    engine.run(after=evaluate, desc=f"attack {attack.name} ({label}, seed {seed})", progress=progress)
    model.unet.eval().requires_grad_(False)
    return {"attack": attack.model_dump(mode="json"), "seed": seed, "model": label, "points": points,
            "specs": [v.as_dict() for v in evaluator.values],
            "trainable_parameters": sum(p.numel() for p in trainable.values()),
            "seconds": round(time.perf_counter() - start, 2)}
