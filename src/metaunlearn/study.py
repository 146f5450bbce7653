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

from . import layout, stages
from .config import StudyConfig
from .layout import (
    ENVIRONMENT,
    FAILURES,
    LOG,
    ORIGINAL,
    STUDY_FILE,
    TIMINGS,
    RunLayout,
    read_json,
    write_json,
    write_text,
)


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], object]
    needs: tuple[str, ...] = ()


def stage_lock(config: StudyConfig, name: str):
    """Held while a stage is checked and run, under either executor: a worker a killed Ray driver left
    behind finishes its stage before a resumed run looks at it, and never writes beside it."""
    from .layout import exclusive

    return exclusive(config.run_dir() / ".locks" / f"{name.replace('/', '--')}.lock")


@dataclass
class Outcome:
    run_dir: Path
    report: Path | None
    failures: list[dict] = field(default_factory=list)


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
            "device": stages.resolve_device(config), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model_source": config.model.source,  # and whether it was a folder here, not a Hub id
            "source_local": Path(config.model.source).expanduser().exists()}


def _model_stage(config: StudyConfig, log: Callable[[str], None]) -> Stage:
    from .worlds import world_for

    world = world_for(config.model)
    if world is None:  # a folder or hub id: loaded by each stage, nothing to build
        return Stage("model", lambda: True, lambda: None)
    return Stage("model", world.is_built, lambda: world.folder(log=log))


def plan(config: StudyConfig, log: Callable[[str], None] = lambda _: None) -> list[Stage]:
    """Every stage of the study, in order. Stages draw no progress bars of their
    own (quiet=False): the study's one bar shows where it is."""
    quiet = False
    runs = RunLayout.of(config)
    original = stages.original_source
    out = [_model_stage(config, log)]
    for split in ("train", "attack") if layout.needs_attack_split(config.attacks) else ("train",):
        out.append(Stage(f"data/{split}", lambda s=split: layout.data_done(config, s),
                          lambda s=split: stages.concept_data(config, split=s, progress=quiet), ("model",)))
    out.append(Stage(f"evaluate/{ORIGINAL}", lambda: layout.evaluation_done(config, original(config), ORIGINAL),
                      lambda: stages.run_evaluate(config, progress=quiet), ("model",)))
    models = layout.unlearned_models(config)
    for m in models:
        out.append(Stage(f"unlearn/{m.label}", lambda m=m: layout.unlearn_done(m.config, m.seed),
                          lambda m=m: stages.run_unlearn(m.config, m.seed, progress=quiet), ("data/train",)))
    for m in models:
        model_dir = runs.model(m.label)
        out.append(Stage(f"evaluate/{m.label}", lambda m=m, d=model_dir: layout.evaluation_done(m.config, d, m.label),
                          lambda m=m, d=model_dir: stages.run_evaluate(m.config, d, progress=quiet),
                          (f"unlearn/{m.label}",)))
    targets = [(ORIGINAL, None, config, None)] + [(m.label, m.seed, m.config, runs.model(m.label)) for m in models]
    for label, seed, vcfg, model_dir in targets:
        # after the model's evaluation, whose images and numbers are the attack's step 0 (under Ray as well)
        model_needs = (f"evaluate/{label}",)
        for attack in config.attacks:
            needs = (("data/attack",) if layout.needs_attack_split([attack]) else ()) + model_needs
            for s in layout.attack_seeds(config, attack, seed):
                out.append(Stage(f"attack/{label}/{attack.name}-seed{s}",
                                  lambda c=vcfg, a=attack, s=s, d=model_dir, lb=label: layout.attack_done(
                                      c, a, s, d or original(c), lb),
                                  lambda c=vcfg, a=attack, s=s, d=model_dir: stages.run_one_attack(
                                      c, a, s, d, progress=quiet), needs))
    return out


class Book:
    """A study run's bookkeeping, the same under every executor: study.yaml and environment.json
    at the start, study.log lines, timings.json after each finished stage, failures.json after each
    failure (its log line first: it survives a failed write), and the stages left out because
    something they need failed."""

    def __init__(self, config: StudyConfig, names: list[str]):
        self.config, self.run_dir = config, config.run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / STUDY_FILE, config.to_yaml())
        write_json(self.run_dir / ENVIRONMENT, environment(config))
        # the stages of this study: an earlier run's others (seeds or attacks since removed) are not its cost
        self.timings = {k: v for k, v in read_json(self.run_dir / TIMINGS).items() if k in names}
        stages = len(names)
        self.failures: list[dict] = []
        self.bad: set[str] = set()  # failed, or left out because something they need failed
        write_json(self.run_dir / FAILURES, self.failures)
        self.log(f"study {config.name}: {stages} stages")

    def log(self, text: str) -> None:
        with open(self.run_dir / LOG, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}\n")

    def blocked(self, step: Stage) -> bool:
        missing = [n for n in step.needs if n in self.bad]
        if missing:
            self.bad.add(step.name)
            self.log(f"blocked {step.name}: needs {', '.join(missing)}")
        return bool(missing)

    def finished(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 2)
        write_json(self.run_dir / TIMINGS, self.timings)
        self.log(f"finish  {name} ({self.timings[name]:.1f} s)")

    def failed(self, name: str, error: str, trace: str) -> None:
        self.bad.add(name)
        self.failures.append({"stage": name, "error": error, "traceback": trace})
        self.log(f"FAILED  {name}: {error}")
        write_json(self.run_dir / FAILURES, self.failures)

    def close(self) -> Outcome:
        self.log(f"study {self.config.name}: {'done' if not self.failures else f'{len(self.failures)} failure(s)'}")
        report = self.run_dir / "report.html"
        return Outcome(self.run_dir, report if report.is_file() and "report" not in self.bad else None, self.failures)


def error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def report_stage(config: StudyConfig) -> Stage:
    from .report import write_report

    return Stage("report", lambda: False, lambda: write_report(config.run_dir()))


def run_study(config: StudyConfig, progress: bool = True) -> Outcome:
    """Run (or resume) the study; a failing stage is recorded, never fatal to the others."""
    from tqdm.auto import tqdm

    stages.preflight(config)
    steps = [*plan(config, lambda text: book.log(text)), report_stage(config)]
    book = Book(config, [s.name for s in steps])
    bar = tqdm(steps, desc="study", unit="stage", disable=not progress, dynamic_ncols=True)
    for i, step in enumerate(bar):
        bar.set_description(f"{step.name} ({i + 1}/{len(steps)})")
        if book.blocked(step):
            continue
        try:
            with stage_lock(config, step.name):
                if step.done():
                    book.log(f"skip    {step.name} (done)")
                    continue
                book.log(f"start   {step.name}")
                start = time.perf_counter()
                step.run()
        except KeyboardInterrupt:
            book.log(f"stopped {step.name}: interrupted")
            raise
        except Exception as err:  # noqa: BLE001 - any failure is reported, the other stages go on
            book.failed(step.name, error_line(err), traceback.format_exc())
            continue
        book.finished(step.name, time.perf_counter() - start)
    bar.close()
    return book.close()
