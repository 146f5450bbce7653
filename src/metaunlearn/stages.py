"""The stages of a study, each reading and writing files in the run folder:

    runs/<name>/data/<split>/...                  concept data (latents + prompt embeddings)
    runs/<name>/unlearn/<variant>-seed<s>/model   released model (save_pretrained)
    runs/<name>/eval/<label>.{json,png}           concept rates of a model, a grid of its samples
    runs/<name>/attacks/<label>/<attack>-seed<s>/ relearning curve, sample grids

Every stage skips work whose inputs (by fingerprint) did not change.

The CLI commands and the study runner call these; they hold no state.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .config import AttackConfig, StudyConfig
from .data import ConceptData, prepare_concept_data
from .model import DiffusionModel
from .runfiles import atomic_write_json, read_json
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
    return prepare_concept_data(config, model or (lambda: load_model(config)), split, config.run_dir() / "data",
                                progress=progress, log=print if progress else (lambda *_: None))


def data_cached(config: StudyConfig, split: str) -> bool:
    """Whether the split's cache already serves this config (what prepare_concept_data checks)."""
    from .data import FORMAT, MANIFEST, _folder_signatures

    manifest = read_json(config.run_dir() / "data" / split / MANIFEST)
    return (manifest.get("format"), manifest.get("fingerprint"), manifest.get("folders")) == (
        FORMAT, config.fingerprint("model", "concepts", "data"), _folder_signatures(config))


def variant_config(config: StudyConfig, variant: str) -> StudyConfig:
    """The config of one variant of a study: 'base' (meta off) or 'meta' (meta on)."""
    return config.model_copy(update={"meta": config.meta.model_copy(update={"enabled": variant == "meta"})})


def variant_name(config: StudyConfig) -> str:
    if config.method.name == "none":
        return "meta-only"
    return f"{config.method.name}-meta" if config.meta.enabled else config.method.name


def unlearn_dir(config: StudyConfig, seed: int) -> Path:
    return config.run_dir() / "unlearn" / f"{variant_name(config)}-seed{seed}"


def unlearn_fingerprint(config: StudyConfig, seed: int) -> str:
    """What an unlearned model depends on: the meta section only when meta is on, so
    tuning meta leaves a finished base model alone."""
    sections = ("model", "concepts", "data", "method") + (("meta",) if config.meta.enabled else ())
    return f"{config.fingerprint(*sections)}-{seed}"


def unlearn_done(config: StudyConfig, seed: int) -> bool:
    status = read_json(unlearn_dir(config, seed) / "run.json")
    # runs made before the meta section was dropped from base fingerprints stay valid
    legacy = f"{config.fingerprint('model', 'concepts', 'data', 'method', 'meta')}-{seed}"
    return status.get("status") == "done" and status.get("fingerprint") in (unlearn_fingerprint(config, seed), legacy)


def run_unlearn(config: StudyConfig, seed: int, progress: bool = True) -> Path:
    """Base method (+ meta objective when enabled) on the original model; returns
    at once when the same run already finished."""
    from .train import unlearn

    folder = unlearn_dir(config, seed)
    if unlearn_done(config, seed):
        return folder / "model"
    model = load_model(config)
    data = concept_data(config, model, "train", progress=progress)
    start = time.perf_counter()
    out = unlearn(config, model, data, folder, seed, fingerprint=unlearn_fingerprint(config, seed),
                  progress=progress)
    # the time of the run that finished it (a resumed run counts only its own part)
    atomic_write_json(folder / "timing.json", {"seconds": round(time.perf_counter() - start, 2)})
    return out


def model_identity(source: str | Path) -> str:
    """A released model's identity: its unlearning run's fingerprint when it has one, else its path."""
    return read_json(Path(source).parent / "run.json").get("fingerprint", str(source))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def eval_path(config: StudyConfig, label: str) -> Path:
    return config.run_dir() / "eval" / f"{label}.json"


def evaluation_fingerprint(config: StudyConfig, source: str | Path) -> str:
    return _digest(model_identity(source), config.fingerprint("model", "concepts", "evaluation"))


def evaluation_done(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None) -> bool:
    path = eval_path(config, label or model_label(model_dir))
    source = model_dir or original_source(config)
    return read_json(path).get("fingerprint") == evaluation_fingerprint(config, source) and \
        path.with_suffix(".png").is_file()


def make_model_detector(config: StudyConfig, source: str | Path):
    from .evaluation.detectors import make_detector

    return make_detector(config.evaluation.detector, source, world_dir=original_source(config))


def run_evaluate(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                 progress: bool = True) -> tuple[dict, Path]:
    """Concept rates of a model (the original when model_dir is None) into
    eval/<label>.json, with a grid of its samples in eval/<label>.png; skipped
    when that model was already evaluated with these settings."""
    from .evaluation.concept_rates import evaluate_concepts, evaluation_roles, forget_concepts, write_results
    from .plots import save_samples

    source = model_dir or original_source(config)
    label = label or model_label(model_dir)
    out = eval_path(config, label)
    if evaluation_done(config, model_dir, label):
        return read_json(out), out
    model = load_model(config, source)
    results, images, _ = evaluate_concepts(model, make_model_detector(config, source), evaluation_roles(config),
                                           forget_concepts(config), config.evaluation, progress=progress,
                                           return_images=True)
    save_samples(images, config.evaluation.samples_per_prompt, out.with_suffix(".png"))
    results.update(model=str(source), fingerprint=evaluation_fingerprint(config, source))
    write_results(results, out)
    return results, out


def model_label(model_dir: str | Path | None) -> str:
    """'original' for the study's model, else the run folder's name (unlearn/<label>/model)."""
    if model_dir is None:
        return "original"
    path = Path(model_dir)
    return path.parent.name if path.name == "model" else path.name


def attack_fingerprint(config: StudyConfig, attack: AttackConfig, seed: int, source: str | Path) -> str:
    return _digest(attack.model_dump(mode="json"), seed, model_identity(source),
                   config.fingerprint("model", "concepts", "data", "evaluation"))


def attack_done(config: StudyConfig, attack: AttackConfig, seed: int, model_dir: str | Path | None = None,
                label: str | None = None) -> bool:
    from .attacks import attack_dir

    source = model_dir or original_source(config)
    done = read_json(attack_dir(config, label or model_label(model_dir), attack, seed) / "curve.json")
    return done.get("fingerprint") == attack_fingerprint(config, attack, seed, source)


def run_one_attack(config: StudyConfig, attack: AttackConfig, seed: int, model_dir: str | Path | None = None,
                   label: str | None = None, data: ConceptData | None = None, detector=None,
                   progress: bool = True) -> dict:
    """One attack with one seed on one released model (the original when model_dir is None)."""
    from .attacks import attack_and_save

    source = model_dir or original_source(config)
    data = data or concept_data(config, split="attack", progress=progress)
    detector = detector or make_model_detector(config, source)
    return attack_and_save(config, attack, lambda: load_model(config, source), data, detector, seed,
                           label or model_label(model_dir), attack_fingerprint(config, attack, seed, source), progress)


def run_attacks(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                progress: bool = True) -> list[dict]:
    """Every attack of the study, for every seed, on one released model (the
    original when model_dir is None: the reference curves)."""
    from .plots import by_attack, plot_curves

    label = label or model_label(model_dir)
    source = model_dir or original_source(config)
    data = concept_data(config, split="attack", progress=progress)
    detector = make_model_detector(config, source)
    curves = [run_one_attack(config, attack, seed, model_dir, label, data, detector, progress)
              for attack in config.attacks for seed in attack.seeds or config.seeds]
    if curves:
        plot_curves(curves, config.run_dir() / "attacks" / label / "curves.png", title=f"attacks on {label}",
                    key=by_attack)
    return curves
