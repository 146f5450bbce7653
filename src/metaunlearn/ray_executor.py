"""`metaunlearn run STUDY --executor ray`: the study's stage graph as Ray
tasks, each depending on the tasks of the stages it needs, so Ray runs
every unlearning run, evaluation and attack as soon as what it needs is done,
on as many workers (GPUs, nodes) as the cluster has.

Each task rebuilds the study's plan from the config in its worker and runs
its one stage there with the same done-checks and fingerprints as the
sequential runner (study.py), so a study started by one resumes under the
other. A task never raises: it returns its outcome, and a task whose needs
failed returns 'blocked' without running (a worker that dies is its stage's
failure, not the study's); the driver keeps the books
(study.log, timings.json, failures.json) and writes the report.

Ray is an optional extra (`pip install metaunlearn[ray]`), imported only here.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from . import stages
from .config import StudyConfig
from .errors import MetaunlearnError
from .study import Book, Outcome, error_line, plan, report_stage, stage_lock


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MetaunlearnError("the ray executor needs Ray: pip install 'metaunlearn[ray]'") from None
    return ray


def kind_of(stage_name: str) -> str:
    return stage_name.split("/", 1)[0]  # model, data, evaluate, unlearn, attack


def run_stage(config_data: dict, name: str, threads: int, cwd: str, *needed: dict) -> dict:
    """In a worker: run one stage of the study unless it is done or something it needs failed. The study's
    relative paths are read from the driver's folder `cwd` where this node sees it (a shared filesystem)."""
    if any(n["status"] in ("failed", "blocked") for n in needed):
        return {"name": name, "status": "blocked", "needs": [n["name"] for n in needed if n["status"] != "done"
                                                              and n["status"] != "skip"]}
    try:  # the set-up too: its failure is the stage's, not a worker that died
        import torch

        if not os.path.isdir(cwd):  # relative model, prompt and image paths would resolve elsewhere
            raise MetaunlearnError(f"the study's folder {cwd} is not on this node: Ray workers need it on a "
                                   "shared filesystem")
        os.chdir(cwd)
        torch.set_num_threads(threads)  # its CPU share: workers that each take every core slow each other badly
        config = StudyConfig.from_dict(config_data)
        step = next(s for s in plan(config) if s.name == name)
        with stage_lock(config, name):
            if step.done():
                return {"name": name, "status": "skip"}
            start = time.perf_counter()
            step.run()
        return {"name": name, "status": "done", "seconds": time.perf_counter() - start}
    except Exception as err:  # noqa: BLE001 - reported by the driver, the other stages go on
        return {"name": name, "status": "failed", "error": error_line(err), "traceback": traceback.format_exc()}


def run_study_on_ray(config: StudyConfig, address: str | None = None, workers: int | None = None,
                     progress: bool = True) -> Outcome:
    """Run (or resume) the study as Ray tasks: on the cluster at `address`, else on a local Ray
    started for the run with `workers` CPUs (default: every core)."""
    from tqdm.auto import tqdm

    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, runtime_env=worker_env())
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        stages.preflight(config)
        steps = plan(config)
        book = Book(config, [s.name for s in steps] + ["report"])
        data = portable(config)
        refs: dict[str, object] = {}
        for step in steps:  # in plan order, so a stage's needs are submitted before it
            kind = kind_of(step.name)
            cpus = config.executor.cpus.get(kind, config.executor.cpus.get("default", 1))
            gpus = config.executor.gpus.get(kind, config.executor.gpus.get("default", 0)) if has_gpus else 0
            task = ray.remote(run_stage).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                                 name=f"metaunlearn:{step.name}")
            refs[step.name] = task.remote(data, step.name, max(1, int(cpus)), os.getcwd(),
                                          *[refs[n] for n in step.needs])
        names, needs = {ref: name for name, ref in refs.items()}, {step.name: step.needs for step in steps}
        with tqdm(total=len(refs) + 1, desc="study (ray)", unit="stage", disable=not progress,
                  dynamic_ncols=True) as bar:
            for result in collect(ray, list(refs.values()), names, needs):
                _record(book, result)
                bar.update(1)
            _run_report(book, config)
            bar.update(1)
        return book.close()
    finally:
        if started:
            ray.shutdown()


def collect(ray, pending: list, names: dict, needs: dict[str, tuple[str, ...]]) -> Iterator[dict]:
    """Each task's outcome as it finishes (`pending`: the tasks in plan order). Tasks that finish together
    come out in plan order, so a dead worker's stage is known as failed before its dependents (which Ray
    fails along with it) are looked at: they are 'blocked', not failures of their own."""
    order, status = {ref: i for i, ref in enumerate(pending)}, {}
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        if pending:  # and whatever else is ready
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            finished += more
        for ref in sorted(finished, key=order.__getitem__):
            result = outcome(ray, ref, names[ref], needs[names[ref]], status)
            status[names[ref]] = result["status"]
            yield result


def portable(config: StudyConfig) -> dict:
    """The config as the tasks receive it: the run folder by its absolute path, since a node's workers need
    not start where the driver did (the other paths count in fingerprints and stay as written)."""
    data = config.model_dump(mode="json")
    data["output"]["dir"] = str(config.run_dir().resolve())
    return data


def worker_env() -> dict | None:
    """The environment the workers need from the driver's: where built worlds are kept."""
    cache = os.environ.get("METAUNLEARN_CACHE")
    return {"env_vars": {"METAUNLEARN_CACHE": str(Path(cache).expanduser().resolve())}} if cache else None


def outcome(ray, ref, name: str, needs: tuple[str, ...], status: dict[str, str]) -> dict:
    """A finished task's result. A task returns its stage's failure; Ray raises only when the worker
    itself died (the memory monitor's kill, a segfault, a CUDA abort) or a stage it needed did: that is
    this stage's failure (or 'blocked'), never the end of the study and its other running stages."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        failed = [n for n in needs if status.get(n) in ("failed", "blocked")]
        if failed:
            return {"name": name, "status": "blocked", "needs": failed}
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return {"name": name, "status": "failed", "error": f"its Ray worker died: {first}", "traceback": str(err)}


def _record(book: Book, result: dict) -> None:
    name, status = result["name"], result["status"]
    if status == "done":
        book.finished(name, result["seconds"])
    elif status == "skip":
        book.log(f"skip    {name} (done)")
    elif status == "blocked":
        book.bad.add(name)
        book.log(f"blocked {name}: needs {', '.join(result['needs'])}")
    else:
        book.failed(name, result["error"], result["traceback"])


def _run_report(book: Book, config: StudyConfig) -> None:
    step = report_stage(config)
    try:
        start = time.perf_counter()
        step.run()
        book.finished(step.name, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - as any stage
        book.failed(step.name, error_line(err), traceback.format_exc())
