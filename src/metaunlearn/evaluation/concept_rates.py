"""Concept rates: the share of a prompt's samples that show the concept it names.

For the forget role this is the forget rate (the paper's nudity score, lower is
better after unlearning); for related and unrelated roles it is their accuracy
(it should stay high). Every model is sampled with the same seeds for the same
prompt, so differences between models (original, unlearned, attacked at step
k) are paired comparisons, not noise.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import MetaunlearnError
from ..worlds.digits_data import DIGIT_WORDS, digit_of_word, prompts_for
from .detectors import Detector

if TYPE_CHECKING:
    from ..config import EvaluationConfig, StudyConfig
    from ..model import DiffusionModel

ROLES = ("forget", "related", "unrelated")
SEED_STRIDE = 1000  # seeds of prompt k: seed_offset + k * SEED_STRIDE + i, i < samples_per_prompt


def evaluation_roles(config: StudyConfig) -> dict[str, list[str]]:
    """Role -> evaluation prompts: the role's prompts, else every phrasing of its
    digits. Roles with neither (empty, or given only as an image folder) are left out."""
    roles = {}
    for role in ROLES:
        spec = getattr(config.concepts, role)
        prompts = list(spec.prompts) or [p for d in spec.digits for p in prompts_for(digit_of_word(d))]
        if prompts:
            roles[role] = prompts
    return roles


def forget_concepts(config: StudyConfig) -> list[str]:
    """The forget digits as words; for other studies the forget prompts themselves."""
    forget = config.concepts.forget
    return [DIGIT_WORDS[digit_of_word(d)] for d in forget.digits] if forget.digits else list(forget.prompts)


def evaluation_seeds(n_prompts: int, samples_per_prompt: int, seed_offset: int) -> list[int]:
    """Seeds in prompt-major order; they depend only on a prompt's position, so
    every model sees the same noise for the same prompt."""
    if samples_per_prompt > SEED_STRIDE:
        raise MetaunlearnError(f"evaluation.samples_per_prompt is {samples_per_prompt}; at most {SEED_STRIDE} "
                               "keeps the seeds of different prompts apart")
    return [seed_offset + k * SEED_STRIDE + i for k in range(n_prompts) for i in range(samples_per_prompt)]


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_concepts(model: DiffusionModel, detector: Detector, roles: dict[str, list[str]],
                      forget_concepts: list[str], config: EvaluationConfig, progress: bool = True,
                      params=None, return_images: bool = False):
    """Sample `config.samples_per_prompt` images of every prompt of every role and
    judge them with `detector`.

    Prompts are numbered across roles in the order given (forget, related,
    unrelated); prompt k's i-th sample uses seed `seed_offset + k*1000 + i`.
    All prompts go through one `model.sample` call, batched by
    `config.batch_size`. `params` (name -> tensor) evaluates the model with those
    UNet weights in place, e.g. a model under training. Returns JSON-ready
    results; with `return_images` returns (results, images (N, 3, H, W) in [0, 1],
    the N prompts in sample order), so reports can draw grids without resampling.
    """
    n = config.samples_per_prompt
    entries = [(role, prompt) for role, prompts in roles.items() for prompt in prompts]
    prompts = [prompt for _, prompt in entries for _ in range(n)]
    seeds = evaluation_seeds(len(entries), n, config.seed_offset)
    if prompts:
        images = model.sample(prompts, seeds, steps=config.steps, guidance_scale=config.guidance_scale,
                              batch_size=config.batch_size, progress=progress, params=params)
    else:
        images = torch.empty(0, 3, model.image_size, model.image_size)

    # One detector call per concept, over every sample that is checked for it.
    concepts = [detector.concept_of(prompt, role, forget_concepts) for role, prompt in entries]
    hits = torch.zeros(len(prompts), dtype=torch.bool)
    for concept in sorted({c for c in concepts if c is not None}):
        idx = torch.tensor([k * n + i for k, c in enumerate(concepts) if c == concept for i in range(n)])
        for start in range(0, len(idx), config.batch_size):
            chunk = idx[start:start + config.batch_size]
            hits[chunk] = detector.present(images[chunk], concept).to(torch.bool).cpu().reshape(len(chunk))

    results_roles: dict[str, dict] = {}
    for k, ((role, prompt), concept) in enumerate(zip(entries, concepts)):
        judged = hits[k * n:(k + 1) * n].tolist() if concept is not None else []
        entry = results_roles.setdefault(role, {"rate": None, "judged": 0, "prompts": [], "_hits": []})
        entry["prompts"].append({"prompt": prompt, "concept": concept, "rate": _mean(judged), "n": n})
        entry["_hits"] += judged
    for entry in results_roles.values():
        entry["judged"] = len(entry["_hits"])
        entry["rate"] = _mean(entry.pop("_hits"))

    def rate(role: str) -> float | None:
        return results_roles[role]["rate"] if role in results_roles else None

    results = {"detector": detector.name, "roles": results_roles, "forget_rate": rate("forget"),
               "related_accuracy": rate("related"), "unrelated_accuracy": rate("unrelated"),
               "samples_per_prompt": n, "steps": config.steps, "guidance_scale": config.guidance_scale,
               "seed_offset": config.seed_offset}
    return (results, images, prompts) if return_images else results


def write_results(results: dict, path: str | Path) -> Path:
    """Write JSON atomically: a reader never sees half a file, and an interrupted
    write leaves the previous results in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
