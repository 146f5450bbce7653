"""Evaluating a model: sample every evaluation prompt of every role once, with
seeds that depend only on the prompt's position, or the prompt file's own
seeds (so every model, at every attack step, is judged on the same noise:
differences are paired comparisons), and let every configured metric judge
the samples.

A role's evaluation prompts are `evaluation.prompts.<role>` (a file or a list:
prompts unlearning never saw), else the role's own prompts (and prompt file),
else its classes' prompts in a built-in world."""

from __future__ import annotations

import contextlib

import torch

from ..config import ROLES, StudyConfig
from ..errors import MetaunlearnError
from ..prompt_files import PromptEntry, read_prompt_file
from ..registry import METRICS
from .base import Context, Metric, Samples, Value

SEED_STRIDE = 1000  # seeds of prompt k: seed_offset + k * SEED_STRIDE + i, i < samples_per_prompt


def evaluation_entries(config: StudyConfig, world=None) -> dict[str, list[PromptEntry]]:
    """Role -> evaluation prompts with their file seeds and columns: `evaluation.prompts` of the
    role, else the role's prompts and prompt file, else its classes' prompts in the built-in world.
    Roles with none of these (empty, or only an image folder) are left out."""
    roles = {}
    for role in ROLES:
        spec, given = getattr(config.concepts, role), config.evaluation.prompts.get(role)
        if isinstance(given, str):
            entries = read_prompt_file(given)
        elif given:
            entries = [PromptEntry(p) for p in given]
        else:
            entries = spec.entries()
            if not entries and spec.classes and world is not None:
                entries = [PromptEntry(p) for name in spec.classes for p in world.class_prompts(name)]
        if entries:
            roles[role] = entries
    return roles


def evaluation_roles(config: StudyConfig, world=None) -> dict[str, list[str]]:
    """Role -> evaluation prompts (see evaluation_entries)."""
    return {role: [e.prompt for e in entries] for role, entries in evaluation_entries(config, world).items()}


def forget_concepts(config: StudyConfig) -> list[str]:
    """The forget role's classes, else its prompts (its prompt file's too): what a forget-role sample is
    checked for."""
    forget = config.concepts.forget
    return list(forget.classes) if forget.classes else forget.all_prompts()


def evaluation_seeds(n_prompts: int, samples_per_prompt: int, seed_offset: int,
                     given: list[int | None] | None = None) -> list[int]:
    """Seeds in prompt-major order: sample i of prompt k uses its file seed s as s + i when it has
    one, else seed_offset + k * SEED_STRIDE + i (depending only on the prompt's position)."""
    if samples_per_prompt > SEED_STRIDE:
        raise MetaunlearnError(f"evaluation.samples_per_prompt is {samples_per_prompt}; at most {SEED_STRIDE} "
                               "keeps the seeds of different prompts apart")
    given = given or [None] * n_prompts
    return [(seed_offset + k * SEED_STRIDE if given[k] is None else given[k]) + i
            for k in range(n_prompts) for i in range(samples_per_prompt)]


def settings_key(config: StudyConfig) -> str:
    """What evaluation results depend on besides the model (the report checks it)."""
    return config.fingerprint("model", "concepts", "evaluation")


def attack_settings_key(config: StudyConfig) -> str:
    """What an attack's curve depends on besides the attack, its seed and the model (the report checks it):
    the evaluation's settings and the data (an attacker's images come from the data section)."""
    return config.fingerprint("model", "concepts", "data", "evaluation")


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
        self.roles = evaluation_entries(config, context.world)
        listed = [(role, e) for role, entries in self.roles.items() for e in entries]
        self.entries = [(role, e.prompt) for role, e in listed]
        self.file_seeds = [e.seed for _, e in listed]
        self.columns = [e.extra for _, e in listed]
        self._original: Samples | None = None

    @property
    def values(self) -> list[Value]:
        return [v for m in self.metrics for v in m.values]

    def sample(self, model, params=None, progress: bool = True, original: bool = False) -> Samples:
        ev = self.config.evaluation
        n = ev.samples_per_prompt
        prompts = [prompt for _, prompt in self.entries for _ in range(n)]
        seeds = evaluation_seeds(len(self.entries), n, ev.seed_offset, self.file_seeds)
        half = ev.half_precision and torch.device(model.device).type == "cuda"
        if prompts:
            with torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext():
                images = model.sample(prompts, seeds, steps=ev.steps, guidance_scale=ev.guidance_scale,
                                      batch_size=ev.batch_size, progress=progress, params=params)
            images = images.float()
        else:
            images = torch.empty(0, 3, model.image_size, model.image_size)
        return Samples(self.entries, images, n, forget_concepts(self.config), seeds[::n] if n else [],
                       self.columns, original, self)

    def original_samples(self) -> Samples:
        """The original model's samples of every evaluation prompt (what reference-based metrics
        compare with), made once per evaluator: loaded and sampled only when a metric asks."""
        if self._original is None:
            if self.context.load_original is None:
                raise MetaunlearnError("this evaluation has no original model to compare with")
            self._original = self.sample(self.context.load_original(), progress=False, original=True)
        return self._original

    def evaluate(self, model, params=None, progress: bool = True, original: bool = False) -> tuple[dict, Samples]:
        """JSON-ready results of every metric on `model` (with `params`, name -> tensor,
        in place of its UNet weights when given), and the samples they judged. `original`:
        the model is the study's original (its samples are then the reference ones)."""
        samples = self.sample(model, params, progress, original)
        if original:
            self._original = samples
        values, details = {}, {}
        for name, metric in zip(self.config.evaluation.metrics, self.metrics):
            result = metric.compute(samples, model)
            values.update({v.key: result.values.get(v.key) for v in metric.values})
            details[name] = result.details
        ev = self.config.evaluation
        return {"values": values, "specs": [v.as_dict() for v in self.values], "details": details,
                "prompts": [list(entry) for entry in self.entries],
                "prompt_seeds": samples.seeds,
                **({"prompt_columns": self.columns} if any(self.columns) else {}),
                "settings": {"samples_per_prompt": ev.samples_per_prompt, "steps": ev.steps,
                             "guidance_scale": ev.guidance_scale, "seed_offset": ev.seed_offset,
                             "seeds": "sample i of a prompt: its first seed + i",
                             "half_precision": ev.half_precision, "sampler": "DDIM, eta 0"},
                "settings_key": settings_key(self.config)}, samples
