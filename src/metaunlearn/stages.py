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


def concept_data(config: StudyConfig, model: DiffusionModel | None = None, split: str = "train",
                 progress: bool = True) -> ConceptData:
    """A split of the concept data, made with the original model (loaded only if the cache misses)."""
    return prepare_concept_data(config, model or (lambda: load_model(config)), split,
                                config.run_dir() / "data", progress=progress)


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
    data = concept_data(config, model, "train", progress=progress)
    start = time.perf_counter()
    out = unlearn(config, model, data, unlearn_dir(config, seed), seed, progress=progress)
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
    label = label or model_label(model_dir)
    model = load_model(config, source)
    detector = make_detector(config.evaluation.detector, source, world_dir=original_source(config))
    results = evaluate_concepts(model, detector, evaluation_roles(config), forget_concepts(config),
                                config.evaluation, progress=progress)
    results["model"] = str(source)
    out = config.run_dir() / "eval" / f"{label}.json"
    write_results(results, out)
    return results, out


def model_label(model_dir: str | Path | None) -> str:
    """'original' for the study's model, else the run folder's name (unlearn/<label>/model)."""
    if model_dir is None:
        return "original"
    path = Path(model_dir)
    return path.parent.name if path.name == "model" else path.name


def run_attacks(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                progress: bool = True) -> list[dict]:
    """Every attack of the study, for every seed, on one released model (the
    original when model_dir is None: the reference curves)."""
    import hashlib

    from .attacks import attack_and_save
    from .evaluation.detectors import make_detector
    from .plots import by_attack, plot_curves
    from .runfiles import read_json

    original = original_source(config)
    source = model_dir or original
    label = label or model_label(model_dir)
    data = concept_data(config, split="attack", progress=progress)
    detector = make_detector(config.evaluation.detector, source, world_dir=original)
    # the released model's identity: its unlearning run's fingerprint when it has one
    identity = read_json(Path(source).parent / "run.json").get("fingerprint", str(source))
    curves = []
    for attack in config.attacks:
        for seed in attack.seeds or config.seeds:
            blob = json.dumps([attack.model_dump(mode="json"), seed, identity, config.fingerprint(
                "model", "concepts", "data", "evaluation")], sort_keys=True)
            fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
            curves.append(attack_and_save(config, attack, lambda: load_model(config, source), data, detector,
                                          seed, label, fingerprint, progress))
    if curves:
        plot_curves(curves, config.run_dir() / "attacks" / label / "curves.png", title=f"attacks on {label}",
                    key=by_attack)
    return curves
