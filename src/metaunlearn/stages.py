"""The stages of a study, each reading and writing files in the run folder:

    runs/<name>/data/<split>/...                  concept data (latents + prompt embeddings)
    runs/<name>/unlearn/<variant>-seed<s>/model   released model (save_pretrained)
    runs/<name>/eval/<label>.json                 concept rates of a model

The CLI commands and the study runner call these; they hold no state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import StudyConfig
from .data import ConceptData, prepare_concept_data
from .errors import MetaunlearnError
from .model import DiffusionModel
from .worlds import resolve_model_source


def resolve_device(config: StudyConfig) -> str:
    import torch

    device = config.model.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model(config: StudyConfig, source: str | Path | None = None) -> DiffusionModel:
    """The study's original model, or another folder (an unlearned model) with the same settings."""
    import torch

    dtype = getattr(torch, config.model.dtype)
    return DiffusionModel.load(source or resolve_model_source(config.model.source),
                               device=resolve_device(config), dtype=dtype)


def original_source(config: StudyConfig) -> Path | str:
    return resolve_model_source(config.model.source)


def concept_data(config: StudyConfig, model: DiffusionModel, split: str = "train",
                 progress: bool = True) -> ConceptData:
    return prepare_concept_data(config, model, split, config.run_dir() / "data", progress=progress)


def variant_name(config: StudyConfig) -> str:
    if config.method.name == "none":
        return "meta-only"
    return f"{config.method.name}-meta" if config.meta.enabled else config.method.name


def unlearn_dir(config: StudyConfig, seed: int) -> Path:
    return config.run_dir() / "unlearn" / f"{variant_name(config)}-seed{seed}"


def run_unlearn(config: StudyConfig, seed: int, progress: bool = True) -> Path:
    """Base method (+ meta objective when enabled) on the original model."""
    from .train import unlearn

    model = load_model(config)
    data = concept_data(config, model, "train", progress)
    objectives = {}
    if config.meta.enabled:
        raise MetaunlearnError("meta.enabled: the meta objective is not implemented yet; set meta.enabled=false")
    start = time.perf_counter()
    out = unlearn(config, model, data, unlearn_dir(config, seed), seed, objectives=objectives, progress=progress)
    _record_time(unlearn_dir(config, seed), time.perf_counter() - start)
    return out


def _record_time(folder: Path, seconds: float) -> None:
    timing = folder / "timing.json"
    if not timing.exists():  # a skipped (finished) stage keeps its first timing
        timing.write_text(json.dumps({"seconds": round(seconds, 2)}))


def run_evaluate(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                 progress: bool = True) -> tuple[dict, Path]:
    """Concept rates of a model (the original when model_dir is None) into eval/<label>.json."""
    from .evaluation.concept_rates import evaluate_concepts, evaluation_roles, forget_concepts, write_results
    from .evaluation.detectors import make_detector

    source = model_dir or original_source(config)
    if label is None:
        path = Path(source)
        label = "original" if model_dir is None else (path.parent.name if path.name == "model" else path.name)
    model = load_model(config, source)
    detector = make_detector(config.evaluation.detector, source, world_dir=original_source(config))
    results = evaluate_concepts(model, detector, evaluation_roles(config), forget_concepts(config),
                                config.evaluation, progress=progress)
    results["model"] = str(source)
    out = config.run_dir() / "eval" / f"{label}.json"
    write_results(results, out)
    return results, out
