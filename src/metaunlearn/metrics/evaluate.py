"""Evaluating a model: sample every evaluation prompt of every role once, with
seeds that depend only on the prompt's position (so every model, at every
attack step, is judged on the same noise: differences are paired comparisons),
and let every configured metric judge the samples."""

from __future__ import annotations

import torch

from ..config import ROLES, StudyConfig
from ..errors import MetaunlearnError
from ..registry import METRICS
from .base import Context, Metric, Samples, Value

SEED_STRIDE = 1000  # seeds of prompt k: seed_offset + k * SEED_STRIDE + i, i < samples_per_prompt


def evaluation_roles(config: StudyConfig, world=None) -> dict[str, list[str]]:
    """Role -> evaluation prompts: the role's prompts, else its classes' prompts in
    the built-in world. Roles with neither (empty, or only an image folder) are left out."""
    roles = {}
    for role in ROLES:
        spec = getattr(config.concepts, role)
        prompts = list(spec.prompts)
        if not prompts and spec.classes and world is not None:
            prompts = [p for name in spec.classes for p in world.class_prompts(name)]
        if prompts:
            roles[role] = prompts
    return roles


def forget_concepts(config: StudyConfig) -> list[str]:
    """The forget role's classes, else its prompts: what a forget-role sample is checked for."""
    forget = config.concepts.forget
    return list(forget.classes) if forget.classes else list(forget.prompts)


def evaluation_seeds(n_prompts: int, samples_per_prompt: int, seed_offset: int) -> list[int]:
    """Seeds in prompt-major order; they depend only on a prompt's position."""
    if samples_per_prompt > SEED_STRIDE:
        raise MetaunlearnError(f"evaluation.samples_per_prompt is {samples_per_prompt}; at most {SEED_STRIDE} "
                               "keeps the seeds of different prompts apart")
    return [seed_offset + k * SEED_STRIDE + i for k in range(n_prompts) for i in range(samples_per_prompt)]


def settings_key(config: StudyConfig) -> str:
    """What evaluation results depend on besides the model (the report checks it)."""
    return config.fingerprint("model", "concepts", "evaluation")


class Evaluator:
    """The study's metrics over the study's evaluation prompts."""

    def __init__(self, config: StudyConfig, context: Context, metrics: list[Metric] | None = None):
        self.config, self.context = config, context
        ev = config.evaluation
        self.metrics = metrics if metrics is not None else [
            METRICS.get(name, "evaluation.metrics").impl(ev.options(name), context) for name in ev.metrics]
        keys = [v.key for v in self.values]
        if len(set(keys)) != len(keys):
            raise MetaunlearnError(f"evaluation.metrics report the same value twice: {keys}")
        self.roles = evaluation_roles(config, context.world)
        self.entries = [(role, prompt) for role, prompts in self.roles.items() for prompt in prompts]

    @property
    def values(self) -> list[Value]:
        return [v for m in self.metrics for v in m.values]

    def sample(self, model, params=None, progress: bool = True) -> Samples:
        ev = self.config.evaluation
        n = ev.samples_per_prompt
        prompts = [prompt for _, prompt in self.entries for _ in range(n)]
        seeds = evaluation_seeds(len(self.entries), n, ev.seed_offset)
        if prompts:
            images = model.sample(prompts, seeds, steps=ev.steps, guidance_scale=ev.guidance_scale,
                                  batch_size=ev.batch_size, progress=progress, params=params)
        else:
            images = torch.empty(0, 3, model.image_size, model.image_size)
        return Samples(self.entries, images, n, forget_concepts(self.config))

    def evaluate(self, model, params=None, progress: bool = True) -> tuple[dict, Samples]:
        """JSON-ready results of every metric on `model` (with `params`, name -> tensor,
        in place of its UNet weights when given), and the samples they judged."""
        samples = self.sample(model, params, progress)
        values, details = {}, {}
        for name, metric in zip(self.config.evaluation.metrics, self.metrics):
            result = metric.compute(samples, model)
            values.update({v.key: result.values.get(v.key) for v in metric.values})
            details[name] = result.details
        ev = self.config.evaluation
        return {"values": values, "specs": [v.as_dict() for v in self.values], "details": details,
                "prompts": [list(entry) for entry in self.entries],
                "settings": {"samples_per_prompt": ev.samples_per_prompt, "steps": ev.steps,
                             "guidance_scale": ev.guidance_scale, "seed_offset": ev.seed_offset},
                "settings_key": settings_key(self.config)}, samples
