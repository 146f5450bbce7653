"""`metaunlearn run`: every stage of a study, in order, into one run folder.

model -> concept data (train, attack) -> evaluation of the original -> unlearning
(each variant x seed) -> evaluation of each unlearned model -> attacks on each
unlearned model and on the original (reference curves) -> report.

Each stage skips itself when its artifacts match its inputs (fingerprints kept
by the stages), so an interrupted study resumes where it stopped and a changed
value redoes only what depends on it. A stage that raises is logged and listed
in failures.json; the stages that need it are left out, the others go on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import stages
from .config import AttackConfig, StudyConfig, dump_config
from .runfiles import atomic_write_json, read_json

TIMINGS, FAILURES, ENVIRONMENT, LOG, STUDY_FILE = "timings.json", "failures.json", "environment.json", \
    "study.log", "study.yaml"


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], object]
    needs: tuple[str, ...] = ()


@dataclass
class Outcome:
    run_dir: Path
    report: Path | None
    failures: list[dict] = field(default_factory=list)


def unlearned_models(config: StudyConfig) -> list[tuple[str, str, int, StudyConfig]]:
    """(variant, label, seed, variant config) of every unlearned model of the study."""
    out = []
    for variant in config.variants:
        vcfg = stages.variant_config(config, variant)
        for seed in config.seeds:
            out.append((variant, stages.unlearn_dir(vcfg, seed).name, seed, vcfg))
    return out


def attack_seeds(config: StudyConfig, attack: AttackConfig, unlearn_seed: int | None) -> list[int]:
    """The attack's own seeds, else the unlearning run's seed (one attack per unlearned
    model, so cost stays linear in seeds). The original model is the reference that
    tells relearning from an attack that destroys everything: its first seed suffices."""
    if attack.seeds:
        return list(attack.seeds)
    return list(config.seeds[:1]) if unlearn_seed is None else [unlearn_seed]


def environment(config: StudyConfig) -> dict:
    """What it takes to repeat the run: package versions and the machine."""
    import importlib.metadata as md
    import os
    import platform

    import torch

    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "metaunlearn"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": stages.resolve_device(config), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _model_stage(config: StudyConfig, log: Callable[[str], None]) -> Stage:
    source = config.model.source
    if source != "digits":  # a folder or hub id: loaded by each stage, nothing to build
        return Stage("model", lambda: True, lambda: None)
    from .worlds.digits import REPORT_FILE, DigitsWorldConfig, cache_root, get_world

    world = DigitsWorldConfig()
    cached = cache_root() / "worlds" / f"digits-{world.key()}" / REPORT_FILE
    return Stage("model", cached.is_file, lambda: get_world(world, log=log))


def plan(config: StudyConfig, log: Callable[[str], None] = lambda _: None) -> list[Stage]:
    """Every stage of the study, in order. Stages draw no progress bars of their
    own (quiet=False): the study's one bar shows where it is."""
    quiet = False
    out = [_model_stage(config, log)]
    for split in ("train", "attack"):
        out.append(Stage(f"data/{split}", lambda s=split: stages.data_cached(config, s),
                          lambda s=split: stages.concept_data(config, split=s, progress=quiet), ("model",)))
    out.append(Stage("evaluate/original", lambda: stages.evaluation_done(config),
                      lambda: stages.run_evaluate(config, progress=quiet), ("model",)))
    models = unlearned_models(config)
    for _, label, seed, vcfg in models:
        out.append(Stage(f"unlearn/{label}", lambda c=vcfg, s=seed: stages.unlearn_done(c, s),
                          lambda c=vcfg, s=seed: stages.run_unlearn(c, s, progress=quiet), ("data/train",)))
    for _, label, seed, vcfg in models:
        model_dir = stages.unlearn_dir(vcfg, seed) / "model"
        out.append(Stage(f"evaluate/{label}", lambda c=vcfg, m=model_dir: stages.evaluation_done(c, m),
                          lambda c=vcfg, m=model_dir: stages.run_evaluate(c, m, progress=quiet),
                          (f"unlearn/{label}",)))
    for _, label, seed, vcfg in [(None, "original", None, config)] + models:
        model_dir = None if seed is None else stages.unlearn_dir(vcfg, seed) / "model"
        needs = ("data/attack",) + (() if seed is None else (f"unlearn/{label}",))
        for attack in config.attacks:
            for s in attack_seeds(config, attack, seed):
                out.append(Stage(f"attack/{label}/{attack.name}-seed{s}",
                                  lambda c=vcfg, a=attack, s=s, m=model_dir: stages.attack_done(c, a, s, m),
                                  lambda c=vcfg, a=attack, s=s, m=model_dir: stages.run_one_attack(
                                      c, a, s, m, progress=quiet), needs))
    return out


def run_study(config: StudyConfig, progress: bool = True) -> Outcome:
    """Run (or resume) the study; a failing stage is recorded, never fatal to the others."""
    from tqdm.auto import tqdm

    from .report import write_report

    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / STUDY_FILE)
    atomic_write_json(run_dir / ENVIRONMENT, environment(config))
    timings = read_json(run_dir / TIMINGS)
    failures: list[dict] = []
    atomic_write_json(run_dir / FAILURES, failures)

    def log(text: str) -> None:
        with open(run_dir / LOG, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}\n")

    steps = plan(config, log) + [Stage("report", lambda: False, lambda: write_report(run_dir))]
    bad: set[str] = set()  # failed, or left out because something they need failed
    log(f"study {config.name}: {len(steps)} stages")
    bar = tqdm(steps, desc="study", unit="stage", disable=not progress, dynamic_ncols=True)
    for i, step in enumerate(bar):
        bar.set_description(f"{step.name} ({i + 1}/{len(steps)})")
        missing = [n for n in step.needs if n in bad]
        if missing:
            bad.add(step.name)
            log(f"blocked {step.name}: needs {', '.join(missing)}")
            continue
        try:
            if step.done():
                log(f"skip    {step.name} (done)")
                continue
            log(f"start   {step.name}")
            start = time.perf_counter()
            step.run()
        except KeyboardInterrupt:
            log(f"stopped {step.name}: interrupted")
            raise
        except Exception as err:  # noqa: BLE001 - any failure is reported, the other stages go on
            bad.add(step.name)
            failures.append({"stage": step.name, "error": f"{type(err).__name__}: {err}".splitlines()[0],
                             "traceback": traceback.format_exc()})
            atomic_write_json(run_dir / FAILURES, failures)
            log(f"FAILED  {step.name}: {failures[-1]['error']}")
            continue
        timings[step.name] = round(time.perf_counter() - start, 2)
        atomic_write_json(run_dir / TIMINGS, timings)
        log(f"finish  {step.name} ({timings[step.name]:.1f} s)")
    bar.close()
    log(f"study {config.name}: {'done' if not failures else f'{len(failures)} failure(s)'}")
    report = run_dir / "report.html"
    return Outcome(run_dir, report if report.is_file() and "report" not in bad else None, failures)
