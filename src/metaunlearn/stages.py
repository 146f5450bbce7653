"""The stages of a study, each reading and writing files in the run folder
(paths, fingerprints and done-checks: layout.py). Every stage skips work whose
inputs did not change. The CLI commands and the study runner call these; they
hold no state.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import imagefolder, layout
from .config import ROLES, AttackConfig, RoleConfig, StudyConfig, prompt_file_digests
from .data import ConceptData, prepare_concept_data
from .errors import ConfigError
from .layout import ORIGINAL, RunLayout, read_json, write_json
from .model import DiffusionModel
from .worlds import resolve_model_source, world_for


def resolve_device(config: StudyConfig) -> str:
    from .engine import available_device

    return available_device(config.model.device)


def original_source(config: StudyConfig) -> Path | str:
    return resolve_model_source(config.model)


def load_model(config: StudyConfig, source: str | Path | None = None) -> DiffusionModel:
    """The study's original model, or another folder (an unlearned model) with the same settings."""
    import torch

    return DiffusionModel.load(source or original_source(config), device=resolve_device(config),
                               dtype=getattr(torch, config.model.dtype))


def concept_data(config: StudyConfig, model: DiffusionModel | None = None, split: str = "train",
                 progress: bool = True) -> ConceptData:
    """A split of the concept data, made with the original model (loaded only if the cache misses)."""
    return prepare_concept_data(config, model or (lambda: load_model(config)), split,
                                RunLayout.of(config).data_root(), progress=progress,
                                log=print if progress else (lambda *_: None))


def preflight(config: StudyConfig, unlearns: bool = True, attacks: list[AttackConfig] | None = None) -> None:
    """What later stages read, checked before the first one (a mistake found after hours of training
    would lose them): the evaluation prompts and their files, image folders, when models are unlearned
    the forget rate a method that judges its edits needs, and each metric's own inputs (FID's reference
    folders, the packages of its detector or features). `attacks`: those that will run (default: the
    study's own)."""
    from . import methods, metrics  # noqa: F401  (their plugins register themselves)
    from .metrics.durability import FORGET_RATE
    from .metrics.evaluate import evaluation_entries
    from .registry import METHODS, METRICS
    from .unlearn import JUDGE_NEEDS_RATE, check_one_process_settings

    world = world_for(config.model)
    evaluation_entries(config, world)
    attacks = config.attacks if attacks is None else attacks
    across = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched across processes (torchrun sets it)
    if attacks and across:
        # each process would finetune on its own batches with gradients averaged (a batch the processes'
        # count times the configured one, which the curve's fingerprint does not hold) and sample every
        # evaluation; a study's attacks go in parallel on Ray instead
        raise ConfigError("attacks run in one process: launch `metaunlearn unlearn` across processes, and the "
                          "attacks without accelerate (a study's stages run in parallel with `metaunlearn run "
                          "--executor ray`)")
    _check_image_folders(config, unlearns, attacks)
    # a metric's class declares the values it always returns (the forget rate among them for concept_rate
    # and plugins like it); the run-time check (unlearn.forget_judge) asks the built metrics the same
    rates = any(FORGET_RATE in {v.key for v in METRICS.get(name, "evaluation.metrics").impl.values}
                for name in config.evaluation.metrics)
    if unlearns and METHODS.get(config.method.name, "method.name").impl.judges_edits and not rates:
        raise ConfigError(JUDGE_NEEDS_RATE)
    if unlearns and across:
        check_one_process_settings(config)
    for name in config.evaluation.metrics:
        METRICS.get(name, "evaluation.metrics").impl.check(config.evaluation.options(name), config, world)


def _check_image_folders(config: StudyConfig, unlearns: bool, attacks: list[AttackConfig]) -> None:
    """The image folders the stages to come read, split by split (else first read once the model has loaded
    and been evaluated): the roles' train split when models are unlearned, their attack split when an
    attacker finetunes on a role, and an attacker's own folder."""
    splits = ["train"] * unlearns + ["attack"] * layout.needs_attack_split(attacks)
    attacked = {a.data for a in attacks if isinstance(a.data, str)}  # the roles attackers finetune on
    for name in ROLES:
        role = getattr(config.concepts, name)
        for split in splits if role.images else []:
            items = imagefolder.read_items(role.images, split, f"concepts.{name}.images")
            if split == "attack" and name in attacked and not role.classes and not items:
                raise ConfigError(f"attacks finetune on concepts.{name}'s attack split, but its image folder "
                                  f"'{role.images}' has no attack/ subfolder (a folder without train/, test/, "
                                  "attack/ subfolders is train data only)")
    for attack in attacks:
        own, where = attack.data, f"attacks.{attack.name}.data.images"
        if isinstance(own, RoleConfig) and own.images:
            whole = not imagefolder.has_split_folders(Path(own.images))  # a flat folder is all the attacker's data
            if not imagefolder.read_items(own.images, "train" if whole else "attack", where) and not own.classes:
                raise ConfigError(f"{where}: '{own.images}' has split subfolders but no attack/ one; the "
                                  "attacker finetunes on its attack split")


def run_unlearn(config: StudyConfig, seed: int, progress: bool = True) -> Path:
    """Base method (+ meta objective when enabled) on the original model; returns
    at once when the same run already finished."""
    from .unlearn import unlearn

    folder = RunLayout.of(config).unlearn(layout.unlearn_label(config, seed))
    if layout.unlearn_done(config, seed):
        return folder / layout.MODEL
    fingerprint = layout.unlearn_fingerprint(config, seed)
    model = load_model(config)
    data = concept_data(config, model, "train", progress=progress)
    # a finished model of these inputs that a try of others left in place is restored, not trained: its
    # model card and timing.json stay the training's
    return unlearn(config, model, data, folder, seed, fingerprint, progress=progress)


def evaluator(config: StudyConfig):
    """The study's metrics, with what they need to know about the original model."""
    from .metrics import Context, Evaluator

    return Evaluator(config, Context(config, world_for(config.model), original_source(config),
                                     load_original=lambda: load_model(config),
                                     cache_dir=RunLayout.of(config).eval_cache()))


def run_evaluate(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                 progress: bool = True) -> tuple[dict, Path]:
    """Every metric of a model (the original when model_dir is None) into
    eval/<label>.json, with a grid of its samples in eval/<label>.png; skipped
    when that model was already evaluated with these settings."""
    from .plots import save_samples

    source = model_dir or original_source(config)
    label = label or layout.model_label(model_dir)
    runs = RunLayout.of(config)
    out = runs.eval(label)
    if layout.evaluation_done(config, source, label):
        return read_json(out), out
    results, samples = evaluator(config).evaluate(load_model(config, source), progress=progress,
                                                  original=model_dir is None)
    save_samples(samples.images, samples.per_prompt, runs.eval_grid(label))
    results.update(model=str(source), fingerprint=layout.evaluation_fingerprint(config, source),
                   model_identity=layout.model_identity(source),  # which weights: the report checks it
                   prompt_files=prompt_file_digests(config))  # for a report made where the files are not
    write_json(out, results)
    return results, out


def attack_images(config: StudyConfig, attack: AttackConfig, data: ConceptData | None = None,
                  progress: bool = True):
    """The attacker's images: a role's held-out attack split, or the attack's own concept
    (made once with the original model and cached under data/attack-roles/)."""
    from .attacks import attacker_data
    from .data import prepare_role

    if isinstance(attack.data, str):
        return attacker_data(data or concept_data(config, split="attack", progress=progress), attack)
    folder = RunLayout.of(config).data_root() / "attack-roles"
    return prepare_role(config, f"attacks.{attack.name}.data", attack.data, lambda: load_model(config), "attack",
                        folder, progress=progress)


def attack_split(config: StudyConfig, attacks: list[AttackConfig], progress: bool = True) -> ConceptData | None:
    """The role data of the attack split when some attacker finetunes on it, else None (not even
    loaded: attackers with their own data need none, and an image folder may have no attack split)."""
    return concept_data(config, split="attack", progress=progress) if layout.needs_attack_split(attacks) else None


def run_one_attack(config: StudyConfig, attack: AttackConfig, seed: int, model_dir: str | Path | None = None,
                   label: str | None = None, data: ConceptData | None = None, metrics=None,
                   progress: bool = True) -> dict:
    """One attack with one seed on one released model (the original when model_dir is None),
    into attacks/<label>/<attack>-seed<s>/; returns the finished curve when it already ran."""
    from .attacks import make_attack, run_attack
    from .metrics.evaluate import attack_settings_key
    from .plots import plot_curves

    source = model_dir or original_source(config)
    label = label or layout.model_label(model_dir)
    out = RunLayout.of(config).attack(label, attack.name, seed)
    fingerprint = layout.attack_fingerprint(config, attack, seed, source)
    if layout.attack_done(config, attack, seed, source, label):
        return read_json(out / layout.CURVE)
    images = attack_images(config, attack, data, progress)
    model = load_model(config, source)  # a fresh copy of the released weights for every attack
    runs = RunLayout.of(config)  # step 0 is the released model: its evaluation, when made, is reused
    before = (read_json(runs.eval(label)), runs.eval_grid(label)) if layout.evaluation_done(config, source, label) \
        else None
    curve = run_attack(config, attack, model, images, metrics or evaluator(config), seed, label, progress,
                       sample_dir=out, before=before)
    curve["fingerprint"], curve["model_identity"] = fingerprint, layout.model_identity(source)
    curve["settings_key"] = attack_settings_key(config)
    if attack.save_final:
        make_attack(attack).save(model, out)
    plot_curves([curve], out / "curve.png", title=f"{attack.name} on {label} (seed {seed})")
    write_json(out / layout.CURVE, curve)  # last: the attack's done record
    return curve


def run_attacks(config: StudyConfig, model_dir: str | Path | None = None, label: str | None = None,
                progress: bool = True) -> list[dict]:
    """Every attack of the study on one released model (the original when model_dir
    is None: the reference curves), with the seeds `metaunlearn run` gives it."""
    from .plots import by_attack, plot_curves

    label = label or layout.model_label(model_dir)
    unlearn_seed = layout.unlearn_seed_of(model_dir)
    data = attack_split(config, config.attacks, progress)
    metrics = evaluator(config)
    curves = [run_one_attack(config, attack, seed, model_dir, label, data, metrics, progress)
              for attack in config.attacks for seed in layout.attack_seeds(config, attack, unlearn_seed)]
    if curves:
        plot_curves(curves, RunLayout.of(config).attacks(label) / "curves.png", title=f"attacks on {label}",
                    key=by_attack)
    return curves


__all__ = ["ORIGINAL", "concept_data", "evaluator", "load_model", "original_source", "resolve_device",
           "run_attacks", "run_evaluate", "run_one_attack", "run_unlearn"]
